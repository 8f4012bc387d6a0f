#!/usr/bin/env python3
"""Resident memory over many cycles: does creating and freeing sessions and models leak?

    python bench/leaks.py                         # 200 DHSA sessions x 4K-token prefill, 20 model loads
    python bench/leaks.py --sessions 20 --tokens 1024 --models 5 --out /tmp/leaks.json

Phase 1 loads the model once, then `--sessions` times: a DHSA session (budget 0.3, min_context 512, so the
DHSA kernel, its selection and its segment cache all run), a prefill of `--tokens` tokens of the NIAH
haystack, one generated token, and the session freed. Phase 2, `--models` times: the model loaded, one
short dense session, the model freed. The resident set size (VmRSS from /proc/self/status, Linux) is read
after every cycle; the verdict compares the last cycle with the first (the first cycle pays the one-time
allocations: thread pool, ggml's graph buffers, glibc arenas). The issue's bound: within 2 MiB.

Writes the curves and the machine to --out (JSON) and prints a summary; exit status 1 when a phase grew
by more than --limit-mib. Run it alone: it is a measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydhsa import Model  # noqa: E402
from pydhsa.dhsa_params import DhsaConfig  # noqa: E402
from pydhsa.models import model_path  # noqa: E402
from pydhsa.niah import default_haystack_dir  # noqa: E402

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def haystack_tokens(model: Model, n: int) -> list[int]:
    text = "\n".join(p.read_text() for p in sorted(default_haystack_dir().glob("*.txt")))
    tokens = model.tokenize(text)
    if len(tokens) < n:
        raise SystemExit(f"the haystack has {len(tokens)} tokens, fewer than --tokens {n}")
    return tokens[:n]


def session_cycles(path: Path, n_cycles: int, n_tokens: int, threads: int) -> list[int]:
    dhsa = DhsaConfig(budget=0.3, min_context=512)
    curve = []
    with Model(path) as model:
        tokens = haystack_tokens(model, n_tokens)
        for i in range(n_cycles):
            with model.session(n_ctx=n_tokens + 64, n_threads=threads, dhsa=dhsa) as s:
                s.prefill(tokens)
                list(s.generate(max_tokens=1, temperature=0.0))
            gc.collect()
            curve.append(rss_bytes())
            print(f"\rsessions {i + 1}/{n_cycles}: RSS {curve[-1] / MIB:.1f} MiB", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return curve


def model_cycles(path: Path, n_cycles: int, threads: int) -> list[int]:
    curve = []
    for i in range(n_cycles):
        with Model(path) as model:
            with model.session(n_ctx=256, n_threads=threads) as s:
                list(s.generate("The capital of France is", max_tokens=2, temperature=0.0))
        gc.collect()
        curve.append(rss_bytes())
        print(f"\rmodels {i + 1}/{n_cycles}: RSS {curve[-1] / MIB:.1f} MiB", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return curve


def verdict(name: str, curve: list[int], limit_mib: float) -> dict:
    growth = (curve[-1] - curve[0]) / MIB
    peak = (max(curve) - curve[0]) / MIB
    ok = growth <= limit_mib
    print(f"{name}: {len(curve)} cycles, RSS after the first {curve[0] / MIB:.1f} MiB, after the last "
          f"{curve[-1] / MIB:.1f} MiB: {growth:+.2f} MiB (largest {peak:+.2f} MiB) -> "
          f"{'within' if ok else 'OVER'} {limit_mib} MiB")
    return {"cycles": len(curve), "rss_mib": [round(v / MIB, 3) for v in curve], "growth_mib": round(growth, 3),
            "max_growth_mib": round(peak, 3), "within_limit": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=4096, help="prefill length of each session (default 4096)")
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--limit-mib", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None, help="write the curves here (JSON)")
    args = ap.parse_args(argv)
    path = args.model or model_path(quiet=True)
    t0 = time.monotonic()
    result = {"model": str(path), "machine": platform.platform(), "processor": platform.processor(),
              "tokens": args.tokens, "limit_mib": args.limit_mib}
    if args.sessions:
        result["sessions"] = verdict("sessions", session_cycles(path, args.sessions, args.tokens, args.threads),
                                     args.limit_mib)
    if args.models:
        result["models"] = verdict("models", model_cycles(path, args.models, args.threads), args.limit_mib)
    result["seconds"] = round(time.monotonic() - t0, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(result[k]["within_limit"] for k in ("sessions", "models") if k in result) else 1


if __name__ == "__main__":
    sys.exit(main())
