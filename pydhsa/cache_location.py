"""Where pydhsa keeps what it downloads or assembles (models, the upstream sdist): $PYDHSA_CACHE_DIR, else
$XDG_CACHE_HOME/pydhsa, else ~/.cache/pydhsa.

Standard library only: native/fetch_upstream.py loads this file by its path at build time, before the package
is importable, so that the build and the package agree on one folder."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("PYDHSA_CACHE_DIR"):
        return Path(os.environ["PYDHSA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pydhsa"
