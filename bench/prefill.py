#!/usr/bin/env python3
"""Whole-prompt prefill, dense versus DHSA, on a GGUF model (default: the embedded Gemma 3 270M, CPU).

For each prompt length (default 4K, 8K, 16K, 32K tokens):

1. Prompt: a Needle-in-a-Haystack prompt from the haystack essays (pydhsa.niah.build_prompt), sized with the
   model's own tokenizer, built once per length; n_ctx = tokens + --ctx-pad (capped at the training context,
   and the target is lowered so that the prompt still fits).
2. Speed: --repeats rounds; each round prefills the prompt once dense and once per DHSA budget, every run in a
   fresh session on the same loaded Model, the order alternating between rounds (dense first, then DHSA
   first) so that drifts in machine load hit both alike. Reported: medians of prefill tok/s (the engine's own
   prefill timer), the ratio DHSA/dense of those medians, and the DHSA attention density the engine reports
   (computed / causal query-key pairs of the layers that ran DHSA).
3. Amdahl bound (unless --no-amdahl): the attention time of the layers DHSA replaces is estimated with the op
   machinery of bench/attention.py: for every ubatch of the prompt (--n-ubatch queries against the keys so
   far), time run_attention(mode="flash") and run_attention(mode="dhsa") on random structured inputs of the
   model's global-layer shape, sum over ubatches and multiply by the number of layers that ran DHSA (taken from
   the engine's density report). Ubatches with fewer keys than min_context count the flash time for both
   (the engine runs dense there), and the prompt's dense tail is passed as dense_from as the engine does.
   Sliding-window layers and everything else are counted as unchanged. Then
       attention share = T_attn_flash / T_dense
       op speedup      = T_attn_flash / T_attn_dhsa
       Amdahl bound    = T_dense / (T_dense - T_attn_flash + T_attn_flash / op_speedup)
   with T_dense the median dense prefill time; reported with the achieved end-to-end ratio, achieved / bound
   and the share of the possible gain reached, (achieved - 1) / (bound - 1).
4. Peak memory (unless --no-rss): peak RSS is process-wide, so each configuration (dense, each budget) is also
   run once in a fresh subprocess (this script with --one) that loads the model, prefills once and reports
   its peak RSS (getrusage), plus its RSS high-water mark after loading the model. DHSA's peak is compared with
   dense's (target: within 5%).

    python bench/prefill.py                      # full run (long: see bench/README.md)
    python bench/prefill.py --quick              # smoke test: one 2K prompt, min_context 1024, 1 round
    python bench/prefill.py --lengths 8k --budgets 0.1,0.3 --repeats 5

Progress goes to stderr, the table to stdout, everything (raw runs, estimates, machine information) to a JSON
file (default bench/results/prefill-<timestamp>.json), rewritten atomically after every length.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as A  # noqa: E402  (bench/attention.py: shared machinery)

log = A.log
median = A.median

QUICK = dict(lengths=[2048], budgets=[0.3], repeats=1, min_context=1024)


def proc_status_bytes(field: str) -> Optional[int]:
    """VmHWM / VmRSS of this process from /proc/self/status, in bytes (None where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def dhsa_config(args, budget: float):
    from pydhsa.dhsa_params import DhsaConfig
    return DhsaConfig(budget=budget, boundary=args.boundary, min_context=args.min_context,
                      dense_tail=args.dense_tail, layers=args.layers)


def mode_key(budget: Optional[float]) -> str:
    return "dense" if budget is None else f"dhsa@{budget:g}"


# ------------------------------------------------------------------------------------------------
# One prefill (in process, or alone in a subprocess with --one)
# ------------------------------------------------------------------------------------------------

def prefill_once(model, tokens: Sequence[int], n_ctx: int, budget: Optional[float], args) -> Dict[str, Any]:
    cfg = None if budget is None else dhsa_config(args, budget)
    session = model.session(n_ctx=n_ctx, n_threads=args.threads, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                            dhsa=cfg, type_k=args.cache_type_k, type_v=args.cache_type_v)
    try:
        rss_before = proc_status_bytes("VmRSS")
        t0 = time.perf_counter()
        session.prefill(tokens)
        wall_ms = (time.perf_counter() - t0) * 1e3
        t = session.timings()
        dens = session.dhsa_density()
    finally:
        session.close()
    return {
        "mode": "dense" if budget is None else "dhsa",
        "budget": budget,
        "n_prefill": t.n_prefill,
        "t_prefill_ms": t.t_prefill_ms,
        "wall_ms": wall_ms,
        "tok_s": t.prefill_tok_s,
        "density": None if dens is None else dens.overall,
        "density_per_layer": None if dens is None else {str(k): v for k, v in dens.per_layer.items()},
        "peak_rss_bytes": t.peak_rss_bytes,
        "rss_before_prefill_bytes": rss_before,
    }


def run_one(args) -> int:
    """--one: load the model, prefill the tokens once, print one JSON line (for a clean peak RSS)."""
    from pydhsa import Model
    tokens = json.loads(Path(args.tokens_file).read_text())
    budget = None if args.one_mode == "dense" else args.one_budget
    with Model(args.model) as model:
        hwm_load = proc_status_bytes("VmHWM")
        rec = prefill_once(model, tokens, args.n_ctx, budget, args)
    rec["hwm_after_load_bytes"] = hwm_load
    print(json.dumps(rec), flush=True)
    return 0


def rss_subprocess(tokens_file: Path, n_ctx: int, budget: Optional[float], args) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--tokens-file", str(tokens_file),
           "-ctk", args.cache_type_k, "-ctv", args.cache_type_v,
           "--one-mode", "dense" if budget is None else "dhsa", "--n-ctx", str(n_ctx), "--model", str(args.model),
           "--threads", str(args.threads), "--n-batch", str(args.n_batch), "--n-ubatch", str(args.n_ubatch),
           "--boundary", args.boundary, "--min-context", str(args.min_context), "--dense-tail",
           str(args.dense_tail), "--layers", args.layers]
    if budget is not None:
        cmd += ["--one-budget", repr(budget)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"--one subprocess failed with status {r.returncode}: {' '.join(cmd)}")
    lines = [l for l in r.stdout.splitlines() if l.strip().startswith("{")]
    if not lines:
        raise RuntimeError(f"--one subprocess printed no result: {r.stdout[-500:]!r}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Attention-time estimate (the Amdahl bound)
# ------------------------------------------------------------------------------------------------

def ubatches(n_tokens: int, n_ubatch: int) -> List[tuple]:
    """(q_pos0, n_q) of every ubatch of a prompt prefilled from an empty cache."""
    return [(s, min(n_ubatch, n_tokens - s)) for s in range(0, n_tokens, n_ubatch)]


def _interpolate(values: Dict[int, float], n: int) -> List[float]:
    """Fill unmeasured ubatch indices linearly between measured neighbours (attention time ~ linear in n_kv)."""
    known = sorted(values)
    out = []
    for u in range(n):
        if u in values:
            out.append(values[u])
            continue
        lo = max((k for k in known if k < u), default=None)
        hi = min((k for k in known if k > u), default=None)
        if lo is None or hi is None:
            out.append(values[lo if hi is None else hi])
        else:
            out.append(values[lo] + (values[hi] - values[lo]) * (u - lo) / (hi - lo))
    return out


def estimate_attention(n_tokens: int, n_head: int, n_head_kv: int, d: int, budgets: Sequence[float],
                       args) -> Dict[str, Any]:
    """Per-ubatch op times of one global layer over the whole prompt: flash and dhsa for each budget."""
    ubs = ubatches(n_tokens, args.n_ubatch)
    Q, K, V = A.make_inputs(n_tokens, n_tokens, n_head, n_head_kv, d, seed=args.seed, q_pos0=0)
    dense_from = n_tokens - args.dense_tail
    stride = max(1, args.attn_stride)
    # Ubatches from `first_sparse` on have enough keys for DHSA (the engine runs flash below min_context).
    first_sparse = next((u for u, (q0, nq) in enumerate(ubs) if q0 + nq >= args.min_context), len(ubs))
    measure = sorted({u for u in range(len(ubs)) if u % stride == 0} | {len(ubs) - 1}
                     | ({first_sparse} if first_sparse < len(ubs) else set()))
    cfgs = {b: dhsa_config(args, b) for b in budgets}
    # The op runner stores K and V in one type: the K cache type (selection and most of the reads).
    kv = {"kv_type": args.cache_type_k if args.cache_type_k in ("f16", "bf16", "q8_0") else None}
    # Untimed warm-up: flash on the first ubatch, dhsa on the first one with enough keys.
    q0, nq = ubs[0]
    A.time_mode(Q[q0:q0 + nq], K[:q0 + nq], V[:q0 + nq], "flash", None, args.threads, q_pos0=q0, **kv)
    if first_sparse < len(ubs) and budgets:
        q0, nq = ubs[first_sparse]
        A.time_mode(Q[q0:q0 + nq], K[:q0 + nq], V[:q0 + nq], "dhsa", cfgs[budgets[0]], args.threads, q_pos0=q0,
                    dense_from=dense_from, **kv)
    flash: Dict[int, float] = {}
    dhsa: Dict[float, Dict[int, float]] = {b: {} for b in budgets}
    op_density: Dict[float, Dict[int, float]] = {b: {} for b in budgets}
    raw: List[Dict[str, Any]] = []
    t_start = time.time()
    for i, u in enumerate(measure):
        q0, nq = ubs[u]
        n_kv = q0 + nq
        q, k, v = Q[q0:q0 + nq], K[:n_kv], V[:n_kv]
        ft, dt = [], {b: [] for b in budgets}
        dens = {}
        for rep in range(args.attn_repeats):
            ft.append(A.time_mode(q, k, v, "flash", None, args.threads, q_pos0=q0, **kv).elapsed_ms)
            for b in budgets:
                if n_kv < args.min_context:
                    continue  # the engine runs flash attention here
                res = A.time_mode(q, k, v, "dhsa", cfgs[b], args.threads, q_pos0=q0, dense_from=dense_from, **kv)
                dt[b].append(res.elapsed_ms)
                if b not in dens:
                    dens[b] = A.ranges_density(res.ranges, nq, q0, cfgs[b].q_block)
        flash[u] = median(ft)
        rec = {"ubatch": u, "q_pos0": q0, "n_q": nq, "n_kv": n_kv, "flash_ms": ft}
        for b in budgets:
            dhsa[b][u] = median(dt[b]) if dt[b] else flash[u]
            if b in dens:
                op_density[b][u] = dens[b]
            rec[f"dhsa@{b:g}_ms"] = dt[b] if dt[b] else None
            rec[f"dhsa@{b:g}_density"] = dens.get(b)
        raw.append(rec)
        if i % 8 == 0 or i == len(measure) - 1:
            log(f"prefill:   attention estimate {n_tokens} tokens: ubatch {u + 1}/{len(ubs)} (n_kv {n_kv}) "
                f"flash {flash[u]:.1f} ms " + " ".join(f"dhsa@{b:g} {dhsa[b][u]:.1f} ms" for b in budgets)
                + f" | {time.time() - t_start:.0f} s")
    flash_all = _interpolate(flash, len(ubs))
    out = {"n_ubatches": len(ubs), "measured_ubatches": measure, "stride": stride, "first_sparse_ubatch": first_sparse,
           "attn_repeats": args.attn_repeats, "dense_from": dense_from,
           "flash_ms_per_layer": sum(flash_all), "dhsa_ms_per_layer": {}, "op_density": {}, "raw": raw}
    for b in budgets:
        sparse_part = _interpolate({u - first_sparse: t for u, t in dhsa[b].items() if u >= first_sparse},
                                   len(ubs) - first_sparse) if first_sparse < len(ubs) else []
        out["dhsa_ms_per_layer"][f"{b:g}"] = sum(flash_all[:first_sparse]) + sum(sparse_part)
        # pair-weighted density of the op selection over the sparse ubatches (random inputs, not the model's)
        w = {u: ubs[u][1] * (2 * ubs[u][0] + ubs[u][1] + 1) / 2 for u in op_density[b]}
        tot = sum(w.values())
        out["op_density"][f"{b:g}"] = (sum(op_density[b][u] * w[u] for u in w) / tot) if tot else None
    return out


def amdahl(t_dense_ms: float, t_dhsa_ms: float, attn_flash_ms: float, attn_dhsa_ms: float) -> Dict[str, Any]:
    op_speedup = attn_flash_ms / attn_dhsa_ms if attn_dhsa_ms > 0 else None
    denom = t_dense_ms - attn_flash_ms + attn_dhsa_ms
    bound = t_dense_ms / denom if denom > 0 else None
    achieved = t_dense_ms / t_dhsa_ms if t_dhsa_ms > 0 else None
    res = {
        "t_dense_ms": t_dense_ms, "t_dhsa_ms": t_dhsa_ms,
        "attn_global_flash_ms": attn_flash_ms, "attn_global_dhsa_ms": attn_dhsa_ms,
        "attn_share": attn_flash_ms / t_dense_ms if t_dense_ms > 0 else None,
        "op_speedup": op_speedup, "bound": bound, "achieved": achieved,
        "achieved_over_bound": achieved / bound if achieved and bound else None,
        "gain_fraction": (achieved - 1) / (bound - 1) if achieved and bound and bound != 1 else None,
    }
    if res["attn_share"] is not None and res["attn_share"] >= 1.0:
        res["warning"] = "estimated attention time exceeds the whole dense prefill: the op estimate is off"
    return res


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def summarise(length_rec: Dict[str, Any], budgets: Sequence[float]) -> Dict[str, Any]:
    runs = length_rec["runs"]
    summ: Dict[str, Any] = {}
    for b in [None, *budgets]:
        rs = [r for r in runs if r["budget"] == b]
        dens = [r["density"] for r in rs if r["density"] is not None]
        summ[mode_key(b)] = {
            "median_tok_s": median([r["tok_s"] for r in rs]),
            "median_ms": median([r["t_prefill_ms"] for r in rs]),
            "density": median(dens) if dens else None,
            "n_runs": len(rs),
        }
    dense = summ["dense"]
    for b in budgets:
        s = summ[mode_key(b)]
        s["speedup"] = s["median_tok_s"] / dense["median_tok_s"] if dense["median_tok_s"] > 0 else None
        # dense ms / DHSA ms within each round (adjacent runs): less exposed to slow drifts in machine load
        paired = []
        for rnd in sorted({r["round"] for r in runs}):
            d = [r["t_prefill_ms"] for r in runs if r["round"] == rnd and r["budget"] is None]
            x = [r["t_prefill_ms"] for r in runs if r["round"] == rnd and r["budget"] == b]
            if d and x and x[0] > 0:
                paired.append(d[0] / x[0])
        s["paired_speedups"] = paired
        s["median_paired_speedup"] = median(paired) if paired else None
    return summ


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None or x != x else format(x, spec) + suffix


def print_table(lengths: List[Dict[str, Any]], budgets: Sequence[float]) -> None:
    hdr = ["tokens", "mode", "t/s", "ms", "speedup", "density", "attn share", "Amdahl bound", "x/bound",
           "gain/bound", "peak RSS MiB", "RSS vs dense"]
    rows = []
    for L in lengths:
        summ = L["summary"]
        rss = L.get("rss") or {}
        am = L.get("amdahl") or {}
        dense_rss = (rss.get("dense") or {}).get("peak_rss_bytes")
        for b in [None, *budgets]:
            k = mode_key(b)
            s = summ[k]
            a = am.get(k) or {}
            peak = (rss.get(k) or {}).get("peak_rss_bytes")
            rows.append([
                str(L["n_tokens"]), k, fmt(s["median_tok_s"], ".1f"), fmt(s["median_ms"], ".0f"),
                "1.00x" if b is None else fmt(s.get("speedup"), ".2f", "x"),
                "1" if b is None else fmt(s.get("density"), ".3f"),
                fmt(am.get("attn_share"), ".1%") if b is None else "",
                fmt(a.get("bound"), ".2f", "x"), fmt(a.get("achieved_over_bound"), ".0%"),
                fmt(a.get("gain_fraction") if a.get("bound") and a["bound"] >= 1.02 else None, ".0%"),
                fmt(peak / 2**20 if peak else None, ".0f"),
                "" if b is None else fmt((peak / dense_rss - 1) * 100 if peak and dense_rss else None, "+.1f", "%"),
            ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    left = {1}

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(line(hdr))
    print("|" + "|".join(("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Prefill speed and peak memory, dense versus DHSA, with the Amdahl bound from op timings.",
        epilog="--one/--tokens-file/--one-mode/--one-budget/--n-ctx are the internal subprocess mode used for "
               "peak-RSS measurements.")
    ap.add_argument("--model", "-m", default=None, help="GGUF model (default: the embedded Gemma 3 270M Q4_K_M)")
    ap.add_argument("--model-name", default=None, help="an embedded model instead (pydhsa.models: gemma3-270m, "
                                                       "qwen2.5-coder-0.5b)")
    ap.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (default f16)")
    ap.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type (default f16)")
    ap.add_argument("--lengths", type=A.parse_int_list, default=[4096, 8192, 16384, 32768], metavar="LIST",
                    help="prompt lengths in tokens, 'k' suffix allowed (default 4k,8k,16k,32k)")
    ap.add_argument("--budgets", type=A.parse_float_list, default=[0.3], metavar="LIST",
                    help="DHSA budgets, comma-separated (default 0.3)")
    ap.add_argument("--repeats", "-r", type=int, default=3, help="rounds of dense + DHSA runs per length (default 3)")
    ap.add_argument("--threads", "-t", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--n-batch", type=int, default=2048, help="logical batch (default 2048)")
    ap.add_argument("--n-ubatch", type=int, default=512, help="physical batch / ubatch (default 512)")
    ap.add_argument("--ctx-pad", type=int, default=64, help="n_ctx = prompt tokens + this (default 64)")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth in the NIAH prompt (default 0.5)")
    ap.add_argument("--needle", type=int, default=0, help="index into pydhsa.niah.NEEDLES (default 0)")
    ap.add_argument("--haystack-dir", default=None,
                    help="haystack essays (default: $PYDHSA_HAYSTACK_DIR or ../shared/data/niah/haystack)")
    ap.add_argument("--boundary", choices=("keysim", "fixed"), default="keysim", help="DHSA boundary (default keysim)")
    ap.add_argument("--min-context", type=int, default=2048,
                    help="DHSA min_context: fewer keys run dense (default 2048, the built-in default)")
    ap.add_argument("--dense-tail", type=int, default=64, help="DHSA dense_tail (default 64)")
    ap.add_argument("--layers", choices=("global", "all"), default="global", help="DHSA layers (default global)")
    ap.add_argument("--warmup-tokens", type=int, default=512,
                    help="untimed dense prefill of this many prompt tokens before the timed runs, to fault the "
                         "weights in (0 = none; default 512)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess runs")
    ap.add_argument("--no-amdahl", action="store_true", help="skip the attention-time estimate (Amdahl bound)")
    ap.add_argument("--attn-repeats", type=int, default=1,
                    help="timed op runs per ubatch in the attention estimate, median taken (default 1)")
    ap.add_argument("--attn-stride", type=int, default=1,
                    help="time every S-th ubatch only (plus the last) and interpolate the rest linearly "
                         "(default 1 = every ubatch)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random op inputs (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test preset: length 2048, budget 0.3, 1 round, min_context 1024 (overrides those)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result file (default bench/results/prefill-<timestamp>.json)")
    ap.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    # internal: one prefill in this process, for a clean peak RSS
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one-mode", choices=("dense", "dhsa"), default="dense", help=argparse.SUPPRESS)
    ap.add_argument("--one-budget", type=float, default=0.3, help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=0, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.model is None:
        from pydhsa.models import model_path
        args.model = str(model_path(args.model_name))
    if args.one:
        if not args.tokens_file or args.n_ctx < 1:
            ap.error("--one needs --tokens-file and --n-ctx")
        return run_one(args)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.repeats < 1 or args.threads < 1 or args.attn_repeats < 1 or args.ctx_pad < 0:
        ap.error("repeats, threads and attn-repeats must be >= 1, ctx-pad >= 0")

    from pydhsa import Model, niah
    info = A.machine_info(args.threads)
    out_path = None if args.no_json else (args.out or A.default_out("prefill"))
    t_start = time.time()
    model = Model(args.model)
    mi = model.info
    info_model = {"path": str(args.model), **{k: getattr(mi, k) for k in (
        "architecture", "description", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx_train", "n_swa",
        "n_params", "size_bytes")}}
    log(f"prefill: {mi.description} | {mi.n_layer} layers, {mi.n_head}/{mi.n_head_kv} heads, d {mi.head_dim}, "
        f"train ctx {mi.n_ctx_train} | {args.threads} threads | lengths {args.lengths} | budgets {args.budgets} | "
        f"{args.repeats} rounds | load {info.get('loadavg_start')}")

    count_tokens = lambda s: len(model.tokenize(s))  # noqa: E731
    needle = niah.NEEDLES[args.needle]
    results: List[Dict[str, Any]] = []

    def save():
        if out_path is None:
            return
        info["loadavg_now"] = A._loadavg()
        info["wall_s"] = round(time.time() - t_start, 1)
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if not k.startswith("one") and k not in ("tokens_file", "n_ctx")}
        A.write_json_atomic(out_path, {"benchmark": "prefill", "machine": info, "model": info_model,
                                       "params": params, "dhsa_config": {f"{b:g}": dhsa_config(args, b).as_dict()
                                                                          for b in args.budgets},
                                       "command": [sys.executable, *sys.argv], "results": results})

    warmed = False
    with tempfile.TemporaryDirectory(prefix="pydhsa-prefill-") as tmp:
        for length in args.lengths:
            target = min(length, mi.n_ctx_train - args.ctx_pad)
            t0 = time.time()
            prompt = niah.build_prompt(count_tokens, target, args.depth, needle, args.haystack_dir)
            tokens = model.tokenize(prompt.text)
            n_ctx = min(len(tokens) + args.ctx_pad, mi.n_ctx_train)
            if len(tokens) > n_ctx:
                raise SystemExit(f"prefill: prompt of {len(tokens)} tokens does not fit n_ctx {n_ctx}")
            log(f"prefill: length {length}: prompt {len(tokens)} tokens (target {target}), n_ctx {n_ctx}, "
                f"built in {time.time() - t0:.1f} s")
            tokens_file = Path(tmp) / f"tokens-{length}.json"
            tokens_file.write_text(json.dumps(tokens))
            rec: Dict[str, Any] = {"length": length, "target_tokens": target, "n_tokens": len(tokens),
                                   "n_ctx": n_ctx, "needle_depth": prompt.actual_depth, "runs": []}
            results.append(rec)

            if not warmed and args.warmup_tokens > 0:
                w = prefill_once(model, tokens[:args.warmup_tokens], n_ctx, None, args)
                log(f"prefill: warm-up: {w['n_prefill']} tokens dense in {w['t_prefill_ms']:.0f} ms")
                warmed = True

            configs = [None, *args.budgets]
            for rnd in range(args.repeats):
                order = configs if rnd % 2 == 0 else configs[::-1]
                for b in order:
                    r = prefill_once(model, tokens, n_ctx, b, args)
                    r["round"] = rnd
                    rec["runs"].append(r)
                    log(f"prefill: length {length} round {rnd + 1}/{args.repeats} {mode_key(b)}: "
                        f"{r['tok_s']:.1f} tok/s ({r['t_prefill_ms']:.0f} ms)"
                        + (f", density {r['density']:.3f}" if r["density"] is not None else ""))
                    save()
            rec["summary"] = summarise(rec, args.budgets)

            if not args.no_rss:
                rec["rss"] = {}
                for b in configs:
                    r = rss_subprocess(tokens_file, n_ctx, b, args)
                    rec["rss"][mode_key(b)] = r
                    log(f"prefill: length {length} peak RSS {mode_key(b)}: {r['peak_rss_bytes'] / 2**20:.0f} MiB "
                        f"(after load {(r.get('hwm_after_load_bytes') or 0) / 2**20:.0f} MiB; "
                        f"{r['tok_s']:.1f} tok/s)")
                    save()
                dense_peak = rec["rss"]["dense"]["peak_rss_bytes"]
                for b in args.budgets:
                    r = rec["rss"][mode_key(b)]
                    r["vs_dense"] = r["peak_rss_bytes"] / dense_peak - 1 if dense_peak else None
                    r["within_5pct"] = None if r["vs_dense"] is None else r["vs_dense"] <= 0.05

            if not args.no_amdahl:
                # Layers that ran DHSA, as the engine reports them (the global layers for layers=global).
                dhsa_layers = sorted({int(k) for r in rec["runs"] if r["density_per_layer"]
                                      for k in r["density_per_layer"]})
                est = estimate_attention(len(tokens), mi.n_head, mi.n_head_kv, mi.head_dim, args.budgets, args)
                am: Dict[str, Any] = {"dhsa_layers": dhsa_layers, "n_dhsa_layers": len(dhsa_layers),
                                      "estimate": est}
                n_l = len(dhsa_layers)
                t_dense = rec["summary"]["dense"]["median_ms"]
                am["attn_share"] = est["flash_ms_per_layer"] * n_l / t_dense if t_dense > 0 else None
                for b in args.budgets:
                    am[mode_key(b)] = amdahl(t_dense, rec["summary"][mode_key(b)]["median_ms"],
                                             est["flash_ms_per_layer"] * n_l, est["dhsa_ms_per_layer"][f"{b:g}"] * n_l)
                    a = am[mode_key(b)]
                    log(f"prefill: length {length} {mode_key(b)}: attention share {a['attn_share']:.1%}, "
                        f"op speedup {a['op_speedup']:.2f}x, Amdahl bound {a['bound']:.2f}x, "
                        f"achieved {a['achieved']:.2f}x")
                if not n_l:
                    log(f"prefill: length {length}: no layer ran DHSA (prompt below min_context?); bound = 1")
                rec["amdahl"] = am
            save()
            log(f"prefill: length {length} done in {time.time() - t0:.0f} s")

    model.close()
    print_table(results, args.budgets)
    save()
    if out_path is not None:
        log(f"prefill: wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
