"""The full malformed-GGUF run: every case of the corpus through `pydhsa info`, `pydhsa run`, `pydhsa convert`
and `Model(...)`, on a tiny random model and on the embedded Gemma 3 270M; prints a table per model and
writes every outcome to a JSON file. Exit status 1 when any run ended in a defect (see harness.py).

    python tests/reliability/run_corpus.py                      # tiny llama + tiny qwen2 + Gemma 3 270M
    python tests/reliability/run_corpus.py --models tiny-llama --random 100 --json /tmp/corpus.json

CI runs a subset of the same corpus (tests/reliability/test_gguf_corpus.py). On the 2-core CI machine the
full run takes about 15 minutes, most of it `run` and `Model(...)` on copies of the 253 MB Gemma file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from gguf_corpus import GgufLayoutMap, malformed_cases  # noqa: E402
from harness import TOOLS, run_corpus, summary  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen2", "gemma3-270m")


def base_model(name: str, workdir: Path) -> Path:
    """The valid file a model's corpus is made from."""
    if name == "gemma3-270m":
        from pydhsa.models import model_path
        return model_path(quiet=True)
    from random_gguf import write_random_model
    arch = name.removeprefix("tiny-")
    return write_random_model(workdir / f"{name}.gguf", arch, n_layer=2, n_head=4, n_head_kv=2, head_dim=32,
                              n_ff=64, n_vocab=320)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--random", type=int, default=40, help="seeded random truncations, flips and random-byte "
                    "cases, each (default 40)")
    ap.add_argument("--boundaries", type=int, default=None, help="at most this many truncation points per model "
                    "(default: all; Gemma 3 270M has about 1,400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--json", type=Path, default=None, help="write every outcome here")
    args = ap.parse_args(argv)
    results, defects = {}, 0
    with tempfile.TemporaryDirectory(prefix="pydhsa-corpus-") as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            base = GgufLayoutMap.read(base_model(name, workdir))
            cases = list(malformed_cases(base, seed=args.seed, random_cases=args.random, boundaries=args.boundaries))
            t0 = time.monotonic()
            outcomes = run_corpus(cases, workdir, tools=args.tools.split(","), progress=True)
            print(f"\n## {name}: {len(cases)} malformed files, {time.monotonic() - t0:.0f} s\n")
            print(summary(outcomes))
            bad = [o for o in outcomes if o.defect]
            for o in bad:
                print(f"  DEFECT {o.case} / {o.tool}: {o.verdict} ({o.detail})")
            defects += len(bad)
            results[name] = [o.__dict__ for o in outcomes]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
