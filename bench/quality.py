#!/usr/bin/env python3
"""Selection quality at long context: KL divergence from dense attention of each selection method, on real
models and real text (`pydhsa perplexity --kl-divergence`, one window of --ctx tokens per text).

For every (model, text, method, budget) case this runs `pydhsa perplexity` in its own process (the engine's
memory is returned between cases) and keeps its JSON under --out as `<model>-<text>-<method>-<budget>.json`;
a case whose file exists is not run again, so the grid can be stopped and resumed. The summary table
(`summary.md` in --out, also printed) lists, for positions that ran sparse: mean, 99th-percentile KLD, top-1
agreement and the measured density (computed / causal pairs of the DHSA layers), and for each keysim case the
ratio of its mean KLD to fixed blocks' at the same budget.

Texts: "haystack" (the NIAH essays, ../shared/data/niah/haystack, in file-name order) and "pydoc" (the topic
texts of Python's own documentation, pydoc_data.topics, in key order: technical prose no test tunes on).

    python bench/quality.py --models gemma3-270m,qwen2.5-coder-0.5b --texts haystack,pydoc --budgets 0.1,0.2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def text_file(name: str, cache: Path) -> Path:
    """The named text as a UTF-8 file under cache (made once)."""
    path = cache / f"{name}.txt"
    if path.exists():
        return path
    if name == "haystack":
        from pydhsa.niah import default_haystack_dir
        files = sorted(Path(default_haystack_dir()).glob("*.txt"))
        if not files:
            raise SystemExit(f"no haystack essays in {default_haystack_dir()}")
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    elif name == "pydoc":
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
    else:
        raise SystemExit(f"unknown text {name!r} (haystack, pydoc)")
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def method_flags(method: str) -> List[str]:
    """`boundary[/name=value...]` (e.g. keysim/chunk_max=64) as --dhsa-* flags."""
    boundary, *opts = method.split("/")
    flags = ["--dhsa-boundary", boundary]
    for opt in opts:
        name, _, value = opt.partition("=")
        flags += [f"--dhsa-{name.replace('_', '-')}", value]
    return flags


def method_label(method: str) -> str:
    """The method as a file-name part (no '-', which separates the fields)."""
    return method.replace("/", "+").replace("=", "")


def run_case(model: str, text: Path, method: str, budget: float, args, out: Path) -> Optional[dict]:
    cmd = [sys.executable, "-m", "pydhsa", "perplexity", "--model-name", model, "-f", str(text),
           "-c", str(args.ctx), "--chunks", "1", "-b", str(args.batch), "--kl-divergence", "-q",
           "-t", str(args.threads), "--dhsa-budget", str(budget), *method_flags(method), "--json", str(out)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"quality: FAILED {out.name}: {res.stderr[-2000:]}", file=sys.stderr)
        return None
    print(f"quality: {out.name} in {time.time() - t0:.0f} s", file=sys.stderr)
    return json.loads(out.read_text())


def summary(out_dir: Path) -> str:
    rows = []
    docs: Dict[tuple, dict] = {}
    for f in sorted(out_dir.glob("*.json")):
        d = json.loads(f.read_text())
        model, text, method, budget = f.stem.rsplit("-", 3)
        docs[(model, text, method, budget)] = d
    lines = ["| model | text | method | budget | density | mean KLD | 99% KLD | top-1 agree | KLD / fixed |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (model, text, method, budget), d in sorted(docs.items()):
        s = d.get("sparse") or {}
        fixed = docs.get((model, text, "fixed", budget), {}).get("sparse") or {}
        ratio = (s["kld_mean"] / fixed["kld_mean"]) if s and fixed and fixed.get("kld_mean") else None
        lines.append(f"| {model} | {text} | {method} | {budget} | "
                     f"{d['density']:.3f} | {s.get('kld_mean', float('nan')):.4f} | {s.get('kld_p99', float('nan')):.4f} | "
                     f"{s.get('top1_agree', float('nan')):.1%} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    rows.append("\n".join(lines))
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b", help="embedded model names")
    ap.add_argument("--texts", default="haystack,pydoc", help="texts: haystack, pydoc")
    ap.add_argument("--methods", default="fixed,keysim",
                    help="boundary methods, each optionally with DHSA settings: keysim/chunk_max=64 (default fixed,keysim)")
    ap.add_argument("--budgets", default="0.1,0.2", help="DHSA budgets")
    ap.add_argument("--ctx", type=int, default=16384, help="window length in tokens (default 16384)")
    ap.add_argument("--batch", type=int, default=512, help="tokens per evaluation call (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "quality-16k", help="result folder")
    ap.add_argument("--summarize-only", action="store_true", help="only rewrite summary.md from the JSON files")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        for name in args.texts.split(","):  # text-major: both models on the first text come first
            text = text_file(name, Path("/tmp/pydhsa-quality-texts"))
            for model in args.models.split(","):
                for budget in [float(b) for b in args.budgets.split(",")]:
                    for method in args.methods.split(","):
                        out = args.out / f"{model}-{name}-{method_label(method)}-{budget:g}.json"
                        if not out.exists():
                            run_case(model, text, method, budget, args, out)
                        (args.out / "summary.md").write_text(summary(args.out))
    table = summary(args.out)
    (args.out / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
