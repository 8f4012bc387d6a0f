#!/usr/bin/env python3
"""Needle-in-a-Haystack grid (lengths x depths x methods).

`pydhsa niah` from a source checkout (same flags; see `--help` and bench/README.md): the work is done by
pydhsa.evals.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["niah", *sys.argv[1:]]))
