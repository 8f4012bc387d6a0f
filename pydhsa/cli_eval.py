"""`pydhsa niah`, `pydhsa ruler` and `pydhsa bench`: the evaluation suites of pydhsa.evals on the command line.

    pydhsa niah  [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--chat auto|on|off] [--lengths ...]
                 [--depths ...] [--methods ...] [-t N] [--out DIR] [--quick] ...
    pydhsa ruler [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--chat auto|on|off] [--lengths ...]
                 [--tasks ...] [--samples N] [--methods ...] [-t N] [--out DIR] ...
    pydhsa bench [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--lengths ...] [--methods ...] [--repeats N]
                 [-t N] [--out DIR] [--quick] ...

Each parser's flags are defined once in pydhsa.evals (shared with bench/niah.py, bench/ruler.py,
bench/speed.py). Bad values raise ValueError, which `pydhsa` reports as one line with status 2.
"""
from __future__ import annotations


def add_eval_parsers(subparsers) -> None:
    """Add the `niah`, `ruler` and `bench` subcommands to the `pydhsa` command's subparsers."""
    from . import evals

    p = subparsers.add_parser(
        "niah", help="Needle-in-a-Haystack accuracy grid (lengths x depths x methods)",
        description="Needle-in-a-Haystack grid: context lengths x needle depths x attention methods "
                    "(dense, dhsa:B, fixed:B). Resumable: finished cases in OUT/cases.jsonl are skipped. "
                    "Writes summary.json, summary.md and heatmap PNGs.")
    evals.add_niah_arguments(p)
    p.set_defaults(handler=evals.cmd_niah)

    p = subparsers.add_parser(
        "ruler", help="RULER-style synthetic tasks (multikey, multivalue, vartrack) x lengths x methods",
        description="RULER-style synthetic retrieval and tracking tasks generated from a seed, inserted into the "
                    "haystack: tasks x context lengths x methods. Resumable like `pydhsa niah`.")
    evals.add_ruler_arguments(p)
    p.set_defaults(handler=evals.cmd_ruler)

    p = subparsers.add_parser(
        "bench", help="prefill/decode speed and peak memory, dense versus DHSA",
        description="Prefill tok/s, time to first token, decode tok/s and peak RSS at several context lengths, "
                    "each configuration in a fresh process; medians of --repeats runs and ratios to dense "
                    "measured in the same run. Writes speed.json, speed.md and speed.png.")
    evals.add_speed_arguments(p)
    p.set_defaults(handler=evals.cmd_speed)
