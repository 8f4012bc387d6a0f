#!/usr/bin/env python3
"""Speed and peak memory, dense versus DHSA, each configuration in a fresh process.

Same flags as `pydhsa bench`; see `--help` and bench/README.md.
The work is done by pydhsa.evals; this script only makes it runnable from a source checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa.evals import main_speed  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_speed())
