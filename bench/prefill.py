#!/usr/bin/env python3
"""Whole-prompt prefill, dense versus DHSA: `pydhsa bench`, plus the Amdahl bound of what DHSA could gain.

The measurement is `pydhsa bench`'s (pydhsa.evals.speed; same flags, same result files in --out): for each
context length a NIAH prompt of that many tokens, every (length, repeat, method) in a fresh worker process
(prefill, --n-gen greedy tokens, peak RSS), methods interleaved inside each repeat, medians and ratios to
dense of the same run in speed.json / speed.md / speed.png. There is one prefill benchmark; this script only
adds, unless --no-amdahl:

Amdahl bound: the time of the attention DHSA replaces cannot be switched off inside the engine, so it is
estimated with the op machinery of bench/attention.py: for every ubatch of the prompt (--ubatch-size queries
against the keys so far), time run_attention(mode="flash") and run_attention(mode="dhsa") on random structured
inputs of the model's shape, sum over ubatches and multiply by the number of layers that ran DHSA (from the
engine's per-layer density report). Ubatches with fewer keys than min_context count the flash time for both
(the engine runs dense there), and the prompt's dense tail is passed as dense_from as the engine does.
Sliding-window layers and everything else are counted as unchanged. Then
    attention share = T_attn_flash / T_dense
    op speedup      = T_attn_flash / T_attn_dhsa
    Amdahl bound    = T_dense / (T_dense - T_attn_flash + T_attn_flash / op_speedup)
with T_dense the median dense prefill time; reported with the achieved end-to-end ratio, achieved / bound and
the share of the possible gain reached, (achieved - 1) / (bound - 1), in amdahl.json and a table on stdout.

The op runner's random inputs and separate process make that attention time an estimate, and it has been
off in both directions (bench/README.md, Qwen2.5-Coder 0.5B). So the bound is also computed from the model
itself (--fit-lengths, default 1k,2k): short dense prompts in the same kind of worker give the per-token
prefill time t(n)/n at n tokens, fitted as
    t(n)/n = a + b * (n + 1) / 2          (a: work per token; b: attention work per query-key pair)
by least squares, and the in-model attention time of the measured prompt is T_dense - a * n: everything that
is not per-token work. Only the intercept a is used: b grows with the context on a q8_0 cache (measured in
bench/README.md), so b n (n + 1) / 2 would understate long prompts. That split assumes every layer's
attention grows with the context, true for models without sliding windows (Qwen, Llama), not for Gemma's
windowed layers (their work stops growing at the window and lands in a); the table shows both shares and
both bounds (the fit's with the op speedup of the estimate).

    python bench/prefill.py --quick                          # smoke test: 1K and 2K prompts, one repeat
    python bench/prefill.py --lengths 8k --methods dense,dhsa:0.1,dhsa:0.3 --repeats 5
    python bench/prefill.py --lengths 32k --no-amdahl        # exactly `pydhsa bench`
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
for p in (str(BENCH_DIR.parent), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)
import attention as A  # noqa: E402  (bench/attention.py: the op machinery)
from pydhsa.errors import PydhsaError  # noqa: E402
from pydhsa.evals.options import add_speed_arguments  # noqa: E402
from pydhsa.evals.speed import run_speed  # noqa: E402
from pydhsa.evals.suites import default_out_dir, resolve_model  # noqa: E402

log = A.log
median = A.median


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


def estimate_attention(n_tokens: int, n_head: int, n_head_kv: int, d: int, cfgs: Dict[str, Any],
                       args, threads: int) -> Dict[str, Any]:
    """Per-ubatch op times of one DHSA layer over the whole prompt: flash, and dhsa for each method's DhsaConfig
    (``cfgs``: {method id: config}, as the workers ran them)."""
    ubs = ubatches(n_tokens, args.ubatch_size)
    Q, K, V = A.make_inputs(n_tokens, n_tokens, n_head, n_head_kv, d, seed=args.seed, q_pos0=0)
    stride = max(1, args.attn_stride)
    # Ubatches from first_sparse[m] on have enough keys for DHSA (the engine runs flash below min_context).
    first_sparse = {m: next((u for u, (q0, nq) in enumerate(ubs) if q0 + nq >= c.min_context), len(ubs))
                    for m, c in cfgs.items()}
    measure = sorted({u for u in range(len(ubs)) if u % stride == 0} | {len(ubs) - 1}
                     | {u for u in first_sparse.values() if u < len(ubs)})
    # The op runner stores K and V in one type: the K cache type (selection and most of the reads).
    kv = {"kv_type": args.cache_type_k if args.cache_type_k in ("f16", "bf16", "q8_0") else None}

    def dhsa_ms(m: str, u: int):
        q0, nq = ubs[u]
        return A.time_mode(Q[q0:q0 + nq], K[:q0 + nq], V[:q0 + nq], "dhsa", cfgs[m], threads, q_pos0=q0,
                           dense_from=n_tokens - cfgs[m].dense_tail, **kv)

    # Untimed warm-up: flash on the first ubatch, dhsa on the first one with enough keys.
    q0, nq = ubs[0]
    A.time_mode(Q[q0:q0 + nq], K[:q0 + nq], V[:q0 + nq], "flash", None, threads, q_pos0=q0, **kv)
    for m, u in list(first_sparse.items())[:1]:
        if u < len(ubs):
            dhsa_ms(m, u)
    flash: Dict[int, float] = {}
    dhsa: Dict[str, Dict[int, float]] = {m: {} for m in cfgs}
    op_density: Dict[str, Dict[int, float]] = {m: {} for m in cfgs}
    raw: List[Dict[str, Any]] = []
    t_start = time.time()
    for i, u in enumerate(measure):
        q0, nq = ubs[u]
        n_kv = q0 + nq
        ft, dt = [], {m: [] for m in cfgs}
        for _ in range(args.attn_repeats):
            ft.append(A.time_mode(Q[q0:q0 + nq], K[:n_kv], V[:n_kv], "flash", None, threads, q_pos0=q0,
                                  **kv).elapsed_ms)
            for m, c in cfgs.items():
                if u < first_sparse[m]:
                    continue  # the engine runs flash attention here
                res = dhsa_ms(m, u)
                dt[m].append(res.elapsed_ms)
                if u not in op_density[m]:
                    op_density[m][u] = A.ranges_density(res.ranges, nq, q0, c.q_block)
        flash[u] = median(ft)
        rec = {"ubatch": u, "q_pos0": q0, "n_q": nq, "n_kv": n_kv, "flash_ms": ft}
        for m in cfgs:
            dhsa[m][u] = median(dt[m]) if dt[m] else flash[u]
            rec[f"{m}_ms"] = dt[m] or None
            rec[f"{m}_density"] = op_density[m].get(u)
        raw.append(rec)
        if i % 8 == 0 or i == len(measure) - 1:
            log(f"prefill: attention estimate {n_tokens} tokens: ubatch {u + 1}/{len(ubs)} (n_kv {n_kv}) "
                f"flash {flash[u]:.1f} ms " + " ".join(f"{m} {dhsa[m][u]:.1f} ms" for m in cfgs)
                + f" | {time.time() - t_start:.0f} s")
    flash_all = _interpolate(flash, len(ubs))
    out = {"n_ubatches": len(ubs), "measured_ubatches": measure, "stride": stride,
           "first_sparse_ubatch": first_sparse, "attn_repeats": args.attn_repeats,
           "flash_ms_per_layer": sum(flash_all), "dhsa_ms_per_layer": {}, "op_density": {}, "raw": raw}
    for m in cfgs:
        f = first_sparse[m]
        sparse_part = _interpolate({u - f: t for u, t in dhsa[m].items() if u >= f}, len(ubs) - f) \
            if f < len(ubs) else []
        out["dhsa_ms_per_layer"][m] = sum(flash_all[:f]) + sum(sparse_part)
        # pair-weighted density of the op selection over the sparse ubatches (random inputs, not the model's)
        w = {u: ubs[u][1] * (2 * ubs[u][0] + ubs[u][1] + 1) / 2 for u in op_density[m]}
        tot = sum(w.values())
        out["op_density"][m] = (sum(op_density[m][u] * w[u] for u in w) / tot) if tot else None
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


def fit_attention(fit_speed: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """a and b of t(n)/n = a + b (n + 1) / 2 from the dense rows of a short-prompt speed run (see the module
    docstring), in ms; None with fewer than two lengths."""
    pts = [(r["n_prompt"], r["t_prefill_ms"]) for r in fit_speed["rows"] if r["method"] == "dense"
           and r.get("t_prefill_ms")]
    if len({n for n, _ in pts}) < 2:
        return None
    xs = [(n + 1) / 2 for n, _ in pts]
    ys = [t / n for n, t in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"a_ms_per_token": my - b * mx, "b_ms_per_pair": b, "points": [list(p) for p in pts]}


def attention_ms_from_fit(fit: Dict[str, Any], n_tokens: int, t_dense_ms: float) -> float:
    """The context-dependent part of a dense prefill of n_tokens that took t_dense_ms: all but a * n."""
    return max(0.0, t_dense_ms - fit["a_ms_per_token"] * n_tokens)


# ------------------------------------------------------------------------------------------------
# From pydhsa bench's results to the bound
# ------------------------------------------------------------------------------------------------

def amdahl_results(speed: Dict[str, Any], shape: Dict[str, int], args, threads: int,
                   fit: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Per length: the attention estimate and, per DHSA method, the bound next to the achieved speedup (the
    medians of speed.json's rows; the configs and DHSA layers from its runs); with ``fit``, also the bound from
    the in-model attention time of the length fit (key "fit" of each method)."""
    from pydhsa.dhsa_params import config_from_values
    runs = [r for r in speed["runs"] if not r.get("error")]
    rows = {(r["length"], r["method"]): r for r in speed["rows"]}
    results = []
    for length in sorted({r["length"] for r in speed["rows"]}):
        dense = rows.get((length, "dense"))
        sparse = [m for (L, m) in rows if L == length and m != "dense"]
        if dense is None or not sparse:
            continue
        cfgs, layers = {}, {}
        for m in sparse:
            mine = [r for r in runs if r["length"] == length and r["method"] == m]
            cfgs[m] = config_from_values(mine[0]["dhsa_config"])
            layers[m] = sorted({int(k) for r in mine for k in (r.get("density_per_layer") or {})})
        est = estimate_attention(dense["n_prompt"], shape["n_head"], shape["n_head_kv"], shape["head_dim"], cfgs,
                                 args, threads)
        rec: Dict[str, Any] = {"length": length, "n_tokens": dense["n_prompt"], "estimate": est, "methods": {}}
        for m in sparse:
            n_l = len(layers[m])
            rec["methods"][m] = {"dhsa_layers": layers[m], **amdahl(
                dense["t_prefill_ms"], rows[(length, m)]["t_prefill_ms"], est["flash_ms_per_layer"] * n_l,
                est["dhsa_ms_per_layer"][m] * n_l)}
            if fit is not None and n_l:
                # The fit measures all layers' attention; the op estimate says how much DHSA cuts one layer's.
                share_dhsa = n_l / shape["n_layer"]
                attn = attention_ms_from_fit(fit, dense["n_prompt"], dense["t_prefill_ms"]) * share_dhsa
                speedup = rec["methods"][m]["op_speedup"]
                rec["methods"][m]["fit"] = amdahl(dense["t_prefill_ms"], rows[(length, m)]["t_prefill_ms"], attn,
                                                  attn / speedup if speedup else attn)
            if not n_l:
                log(f"prefill: length {length} {m}: no layer ran DHSA (prompt below min_context?); bound = 1")
        results.append(rec)
    return results


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None or x != x else format(x, spec) + suffix


def print_amdahl_table(results: List[Dict[str, Any]]) -> None:
    hdr = ["tokens", "method", "dense ms", "method ms", "speedup", "attn share", "op speedup", "Amdahl bound",
           "x/bound", "gain/bound", "attn share (fit)", "bound (fit)", "x/bound (fit)"]
    lines = []
    for rec in results:
        for m, a in rec["methods"].items():
            f = a.get("fit") or {}
            lines.append([str(rec["n_tokens"]), m, fmt(a["t_dense_ms"], ".0f"), fmt(a["t_dhsa_ms"], ".0f"),
                          fmt(a["achieved"], ".2f", "x"), fmt(a["attn_share"], ".1%"), fmt(a["op_speedup"], ".2f", "x"),
                          fmt(a["bound"], ".2f", "x"), fmt(a["achieved_over_bound"], ".0%"),
                          fmt(a["gain_fraction"] if a["bound"] and a["bound"] >= 1.02 else None, ".0%"),
                          fmt(f.get("attn_share"), ".1%"), fmt(f.get("bound"), ".2f", "x"),
                          fmt(f.get("achieved_over_bound"), ".0%")])
    A.print_markdown_table(hdr, lines, left={1})


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Prefill speed and peak memory, dense versus DHSA (`pydhsa bench`), with the Amdahl bound "
                    "from op timings.")
    add_speed_arguments(ap)
    ap.add_argument("--no-amdahl", action="store_true", help="skip the attention-time estimate (Amdahl bound)")
    ap.add_argument("--attn-repeats", type=int, default=1,
                    help="timed op runs per ubatch in the attention estimate, median taken (default 1)")
    ap.add_argument("--attn-stride", type=int, default=1,
                    help="time every S-th ubatch only (plus the last) and interpolate the rest linearly "
                         "(default 1 = every ubatch)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random op inputs (default 0)")
    ap.add_argument("--fit-lengths", default="1k,2k",
                    help="short dense prompts whose times give the in-model attention time (module docstring); "
                         "run like the main lengths, into OUT/length-fit (default 1k,2k; 'none' skips the fit)")
    return ap


def run(args) -> int:
    if args.attn_repeats < 1 or args.attn_stride < 1:
        raise ValueError("--attn-repeats and --attn-stride must be >= 1")
    model_path = resolve_model(args)[0].resolve()
    args.out = args.out or str(default_out_dir("prefill", model_path))
    status = run_speed(args)
    if args.no_amdahl or status == 130:
        return status
    from pydhsa import Model
    from pydhsa.api import default_threads
    out = Path(args.out)
    speed = json.loads((out / "speed.json").read_text(encoding="utf-8"))
    with Model(model_path) as model:
        shape = {k: getattr(model.info, k) for k in ("n_layer", "n_head", "n_head_kv", "head_dim")}
    threads = args.threads or default_threads()
    fit = length_fit(args, out) if args.fit_lengths.lower() != "none" else None
    results = amdahl_results(speed, shape, args, threads, fit)
    A.write_json_atomic(out / "amdahl.json", {
        "benchmark": "prefill-amdahl", "speed_run": speed["meta"].get("run_id"), "model_shape": shape,
        "threads": threads, "ubatch": args.ubatch_size, "attn_repeats": args.attn_repeats,
        "attn_stride": args.attn_stride, "seed": args.seed, "command": [sys.executable, *sys.argv],
        "length_fit": fit, "results": results})
    print_amdahl_table(results)
    log(f"prefill: Amdahl bound in {out / 'amdahl.json'}")
    return status


def length_fit(args, out: Path) -> Optional[Dict[str, Any]]:
    """Dense runs at --fit-lengths with the main run's settings (repeats, threads, cache types, --resume),
    in OUT/length-fit, and the fit of their medians."""
    fit_args = argparse.Namespace(**vars(args))
    fit_args.lengths, fit_args.methods, fit_args.out = args.fit_lengths, "dense", str(out / "length-fit")
    fit_args.n_gen, fit_args.quick = 1, False
    if run_speed(fit_args) != 0:
        log("prefill: the length-fit runs failed; no in-model bound")
        return None
    fit = fit_attention(json.loads((out / "length-fit" / "speed.json").read_text(encoding="utf-8")))
    if fit is None:
        log("prefill: the length fit needs two distinct prompt lengths; no in-model bound")
    return fit


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, PydhsaError) as e:
        print(f"prefill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
