"""The command-line flags of ``pydhsa niah``, ``pydhsa ruler`` and ``pydhsa bench`` (bench/niah.py,
bench/ruler.py and bench/prefill.py take the same), each defined once."""
from __future__ import annotations

import argparse

from ..models import DEFAULT_MODEL, is_chat_model, known_models
from .methods import DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_METHODS, DEFAULT_SPEED_LENGTHS
from .niah_grid import NIAH_MAX_TOKENS
from .ruler import RULER_TASKS


def _add_common(p: argparse.ArgumentParser, lengths: str, methods: str) -> None:
    from ..cli import add_cache_type_arguments
    p.add_argument("-m", "--model", default=None, metavar="FILE",
                   help=f"GGUF model file (default: the embedded model {DEFAULT_MODEL})")
    p.add_argument("--model-name", choices=known_models(), default=None,
                   help=f"an embedded model instead of -m, assembled once into the model cache "
                        f"(default {DEFAULT_MODEL})")
    add_cache_type_arguments(p)  # -ctk/-ctv; non-f16 cases are stored apart
    p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, comma separated, k = 1024 "
                                                      f"(default {lengths})")
    p.add_argument("--methods", default=methods, help="dense, dhsa:B (keysim) and fixed:B (block-sparse "
                                                      f"ablation), comma separated (default {methods})")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch size (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default 512)")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<suite>-<model>/)")
    p.add_argument("--dhsa-min-context", type=int, default=None, metavar="N",
                   help="override DHSA min_context (contexts with fewer keys run dense; 0 = always DHSA)")
    p.add_argument("--dhsa-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="override another DHSA parameter (repeatable), e.g. chunk_avg=64")
    p.add_argument("--haystack-dir", default=None, help="haystack essays (default: $PYDHSA_HAYSTACK_DIR or "
                                                        "../shared/data/niah/haystack)")
    p.add_argument("--quick", action="store_true", help="small smoke grid: lengths 1024,2048, methods "
                   "dense,dhsa:0.3, DHSA min_context 0 (explicit flags still win)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_accuracy(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers offloaded to the GPU in a CUDA/Metal build (-1 = all; default 0 = CPU only); "
                        "such cases are stored apart from CPU ones")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the model's chat template, the answer prefix opening the assistant's turn "
                        f"(default auto: on for {', '.join(n for n in known_models() if is_chat_model(n))} and for "
                        "a GGUF with a template whose name says instruct or chat); stored apart")
    p.add_argument("--seed", type=int, default=0, help="seed of the needle rotation / task generator (default 0)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always generate max tokens (default: stop once the score can no longer change)")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing; rewrite summary.json/.md and the plots from cases.jsonl")


def _remember_defaults(p: argparse.ArgumentParser) -> None:
    p.set_defaults(_defaults={a.dest: a.default for a in p._actions if a.dest != "help"})


def add_niah_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_LENGTHS)), DEFAULT_METHODS)
    _add_accuracy(p)
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="needle depths, fractions 0..1 or percentages (default 0,0.1,...,1)")
    p.add_argument("--max-tokens", type=int, default=NIAH_MAX_TOKENS, help="tokens to generate (default 24)")
    p.add_argument("--needles-per-cell", type=int, default=1,
                   help="needles (different prompts) per length x depth cell (default 1)")
    _remember_defaults(p)


def add_ruler_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_LENGTHS)), DEFAULT_METHODS)
    _add_accuracy(p)
    p.add_argument("--tasks", default=",".join(RULER_TASKS), help=f"tasks (default {','.join(RULER_TASKS)})")
    p.add_argument("--samples", type=int, default=None, help="samples per task x length (default 4; --quick 1)")
    p.add_argument("--n-keys", type=int, default=4, help="multikey: keys inserted, one asked (default 4)")
    p.add_argument("--n-values", type=int, default=4, help="multivalue: values of the key (default 4)")
    p.add_argument("--n-hops", type=int, default=4, help="vartrack: hops per chain (default 4: 5 variables)")
    p.add_argument("--n-chains", type=int, default=1, help="vartrack: chains, one asked (default 1)")
    _remember_defaults(p)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_SPEED_LENGTHS)), "dense,dhsa:0.3")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration, medians reported (default 3)")
    p.add_argument("--n-gen", type=int, default=64, help="tokens generated after the prefill (default 64)")
    p.add_argument("--resume", action="store_true", help="continue the latest run with the same settings")
    p.add_argument("--no-warmup", action="store_true", help="skip the tiny warm-up generation in each worker")
    _remember_defaults(p)
