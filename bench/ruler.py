#!/usr/bin/env python3
"""RULER-style synthetic tasks (multikey, multivalue, vartrack) x lengths x methods.

Same flags as `pydhsa ruler`; see `--help` and bench/README.md.
The work is done by pydhsa.evals; this script only makes it runnable from a source checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa.evals import main_ruler  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_ruler())
