"""`pydhsa niah`, `pydhsa ruler` and `pydhsa bench`: the evaluation suites of pydhsa.evals on the command line.

    pydhsa niah  [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--chat auto|on|off] [--lengths ...]
                 [--depths ...] [--methods ...] [-t N] [--out DIR] [--quick] ...
    pydhsa ruler [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--chat auto|on|off] [--lengths ...]
                 [--tasks ...] [--samples N] [--methods ...] [-t N] [--out DIR] ...
    pydhsa bench [-m FILE | --model-name NAME] [-ctk T] [-ctv T] [--lengths ...] [--methods ...] [--repeats N]
                 [-t N] [--out DIR] [--quick] ...

Each parser's flags are defined once in pydhsa.evals.options (bench/niah.py, bench/ruler.py and bench/prefill.py
run these same commands). Bad values raise ValueError, which `pydhsa` reports as one line with status 2.
"""
from __future__ import annotations

# (command, help, description, name of the flag adder in pydhsa.evals.options, name of the runner in pydhsa.evals)
EVAL_COMMANDS = (
    ("niah", "Needle-in-a-Haystack accuracy grid (lengths x depths x methods)",
     "Needle-in-a-Haystack grid: context lengths x needle depths x attention methods (dense, dhsa:B, fixed:B). "
     "Resumable: finished cases in OUT/cases.jsonl are skipped. Writes summary.json, summary.md and heatmap PNGs.",
     "add_niah_arguments", "run_niah"),
    ("ruler", "RULER-style synthetic tasks (multikey, multivalue, vartrack) x lengths x methods",
     "RULER-style synthetic retrieval and tracking tasks generated from a seed, inserted into the haystack: "
     "tasks x context lengths x methods. Resumable like `pydhsa niah`.",
     "add_ruler_arguments", "run_ruler"),
    ("bench", "prefill/decode speed and peak memory, dense versus DHSA",
     "Prefill tok/s, time to first token, decode tok/s and peak RSS at several context lengths, each "
     "configuration in a fresh process; medians of --repeats runs and ratios to dense measured in the same run. "
     "Writes speed.json, speed.md and speed.png.",
     "add_speed_arguments", "run_speed"),
)


def add_eval_parsers(subparsers) -> None:
    """Add the `niah`, `ruler` and `bench` subcommands to the `pydhsa` command's subparsers."""
    from . import evals

    for command, help_text, description, add_arguments, run in EVAL_COMMANDS:
        p = subparsers.add_parser(command, help=help_text, description=description)
        getattr(evals, add_arguments)(p)
        p.set_defaults(handler=getattr(evals, run))
