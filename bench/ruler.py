#!/usr/bin/env python3
"""RULER-style synthetic tasks (multikey, multivalue, vartrack) x lengths x methods.

`pydhsa ruler` from a source checkout (same flags; see `--help` and bench/README.md): the work is done by
pydhsa.evals.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ruler", *sys.argv[1:]]))
