#!/usr/bin/env python3
"""Needle-in-a-Haystack grid (lengths x depths x methods).

Same flags as `pydhsa niah`; see `--help` and bench/README.md.
The work is done by pydhsa.evals; this script only makes it runnable from a source checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa.evals import main_niah  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_niah())
