#!/usr/bin/env python3
"""Time one attention layer: DHSA (our select + attn ops) versus ggml's dense flash_attn_ext and the mask route.

Every configuration runs the three modes of `pydhsa.op.run_attention` on the same inputs:

- dense: upstream `ggml_flash_attn_ext` with the causal mask (what llama.cpp runs without DHSA);
- dhsa:  our `ggml_dhsa_select` + `ggml_dhsa_attn` (selection included in the time);
- mask:  our selection turned into a -inf mask for `ggml_flash_attn_ext` (the time includes the selection and
         the C++ mask build; dense flash attention over a sparse mask).
- dhsa-own / dhsa-fattn (GPU): the dhsa op with its attention forced through our kernel, or through upstream's
         sparse MMA flash attention fed with the selection's index lists ("dhsa" takes the engine's default,
         our kernel; a configuration the fattn route does not cover shows "-").

The queries are one ubatch at the end of the keys (q_pos0 = n_kv - n_q: the last ubatch of a prefill). Inputs
are random float16 with structure: keys follow piecewise-drifting means (segments of 16-128 keys whose mean
drifts), queries are noisy copies of earlier key means, values are random. After --warmup untimed rounds, each
repeat runs dense, dhsa and mask back to back (interleaved, so machine noise hits all three alike); the table
shows medians, speedup = median dense / median dhsa of the same configuration and run, and the attention
density of the selection (computed / causal query-key pairs, from the returned ranges).

Only directly measured times are reported. On the CPU the selection's own share is not split out (the dhsa op
runs selection and attention in one graph); `--modes ...,select` times the selection graph alone.

On a GPU (`--device cuda`, a CUDA build of the engine): each mode is one call that uploads the inputs once and
runs the graph --warmup + --repeats times; its time is the median of the repeats (synchronous graph
computations), so the repeats of different modes are not interleaved. The default modes add "select", and the
table shows the selection's share of the dhsa op's time. The GPU's name, clocks and driver (nvidia-smi, as
found) are recorded in the JSON. bench/cuda_device.sh runs the issue's grid on a GPU machine.

    python bench/attention.py                    # full grid (see bench/README.md for the time it takes)
    python bench/attention.py --quick            # small grid for a smoke test (< 1 minute)
    python bench/attention.py --n-kv 8192 --heads 4/1 --budgets 0.3 --repeats 3
    python bench/attention.py --device cuda --n-kv 8k,32k,64k,128k --d 128,256 --heads 8/4,16/8 --repeats 20

Progress goes to stderr, the table to stdout, and all raw timings plus machine information to a JSON file
(default bench/results/attention-<timestamp>.json, written atomically).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# As the other bench scripts: the Python side from this checkout (the native libraries are found in the installed
# package, see pydhsa/_native.py); the JSON records both locations and the git commit.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("flash", "dhsa", "dhsa-own", "dhsa-fattn", "mask", "select")
MODE_LABEL = {"flash": "dense", "dhsa": "dhsa", "dhsa-own": "dhsa own", "dhsa-fattn": "dhsa fattn", "mask": "mask",
              "select": "select"}
# Modes whose time is compared with dense (speedup = median dense / median mode).
TIMED_AGAINST_DENSE = ("dhsa", "dhsa-own", "dhsa-fattn", "mask")

QUICK = dict(n_kv=[2048, 4096], n_q=512, heads=[(4, 1), (8, 4)], budgets=[0.1, 0.3], repeats=3, warmup=1)


# ------------------------------------------------------------------------------------------------
# Shared helpers (bench/prefill.py and bench/cuda_prefill.py import these)
# ------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def parse_int_list(s: str) -> List[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        out.append(int(float(part) * mult))
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers")
    return out


def parse_float_list(s: str) -> List[float]:
    out = [float(p) for p in s.split(",") if p.strip()]
    if not out or any(not 0.0 < b <= 1.0 for b in out):
        raise argparse.ArgumentTypeError("budgets must be in (0, 1]")
    return out


def parse_heads(s: str) -> List[Tuple[int, int]]:
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            h, hk = (int(x) for x in part.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"heads must look like H/H_KV (e.g. 4/1), got {part!r}") from None
        if h < 1 or hk < 1 or h % hk:
            raise argparse.ArgumentTypeError(f"H must be a positive multiple of H_KV, got {part!r}")
        out.append((h, hk))
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list like 4/1,8/4")
    return out


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(threads: int) -> Dict[str, Any]:
    """Platform, CPU, cores, threads, pydhsa version and build flags, git commit (where available)."""
    info: Dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "loadavg_start": _loadavg(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpu_affinity"] = None
    try:
        import pydhsa
        from pydhsa import _native
        info["pydhsa_version"] = getattr(pydhsa, "__version__", None)
        info["pydhsa_path"] = str(Path(pydhsa.__file__).resolve().parent)
        lib = _native.load()
        info["system_info"] = _native.ffi.string(lib.pydhsa_system_info()).decode("utf-8", "replace").strip()
        info["lib_dir"] = str(_native.lib_dir())
    except Exception as e:  # the benchmark itself will fail loudly later; keep the info partial here
        info["pydhsa_error"] = f"{type(e).__name__}: {e}"
    info["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = None if status is None else bool(status)
    return info


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to PATH.tmp, fsync, then rename over PATH (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_out(prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{prefix}-{stamp}.json"


def make_inputs(n_q: int, n_kv: int, n_head: int, n_head_kv: int, d: int, seed: int = 0,
                q_pos0: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q [n_q, H, d] float32 (float16-representable), K, V [n_kv, H_kv, d] float16.

    Keys: segments of 16..128 positions, each with a mean that drifts from the previous one (random walk with
    decay), plus noise; per KV head independently. Queries: for each query row, a noisy mix of the means of
    a few earlier segments (so some chunks clearly matter and selection has something to find), scaled to the
    typical magnitude of post-norm projections. Values: standard normal.
    """
    rng = np.random.default_rng(seed)
    q_pos0 = n_kv - n_q if q_pos0 is None else q_pos0
    # Segment structure shared by all heads, means per head.
    cuts = [0]
    while cuts[-1] < n_kv:
        cuts.append(min(n_kv, cuts[-1] + int(rng.integers(16, 129))))
    n_seg = len(cuts) - 1
    means = np.empty((n_seg, n_head_kv, d), dtype=np.float32)
    m = rng.standard_normal((n_head_kv, d)).astype(np.float32)
    for s in range(n_seg):
        m = 0.8 * m + 0.6 * rng.standard_normal((n_head_kv, d)).astype(np.float32)
        means[s] = m
    seg_of = np.repeat(np.arange(n_seg), np.diff(cuts))
    K = means[seg_of] + 0.5 * rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    V = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    # Queries: each row looks at 3 random earlier segments (causally visible) of its KV head's group.
    G = n_head // n_head_kv
    pos = q_pos0 + np.arange(n_q)
    last_seg = seg_of[np.minimum(pos, n_kv - 1)]
    Q = 0.5 * rng.standard_normal((n_q, n_head, d)).astype(np.float32)
    for k in range(3):
        pick = (rng.random(n_q) * (last_seg + 1)).astype(np.int64)  # [0, last_seg]
        Q += np.repeat(means[pick], G, axis=1) / 3.0                # head h uses KV head h // G
    Q = Q.astype(np.float16).astype(np.float32)
    return Q, K.astype(np.float16), V.astype(np.float16)


def ranges_density(ranges, n_q: int, q_pos0: int, q_block: int) -> float:
    """Computed / causal query-key pairs over all rows and KV heads (pydhsa.reference.attention_density,
    vectorised)."""
    done = causal = 0
    for b, per_head in enumerate(ranges):
        r0, r1 = b * q_block, min(n_q, (b + 1) * q_block)
        p = q_pos0 + np.arange(r0, r1, dtype=np.int64)
        for rl in per_head:
            if rl:
                se = np.asarray(rl, dtype=np.int64)
                s, e = se[:, 0], se[:, 1]
                done += int(np.clip(np.minimum(e[None, :], p[:, None] + 1) - s[None, :], 0, None).sum())
            causal += int((p + 1).sum())
    return done / causal if causal else float("nan")


def time_mode(Q, K, V, mode: str, cfg, threads: int, q_pos0: Optional[int] = None,
              dense_from: Optional[int] = None, device: str = "cpu", n_repeat: int = 1,
              warm_cache: bool = False, kv_type: Optional[str] = None):
    """One call of run_attention; returns the OpResult (elapsed_ms is the engine's compute time, the median
    of n_repeat runs after a warm-up when n_repeat > 1). kv_type: the K/V cache type (default: K's dtype)."""
    from pydhsa.op import run_attention
    return run_attention(Q, K, V, mode=mode, config=cfg, q_pos0=q_pos0, n_threads=threads, dense_from=dense_from,
                         device=device, n_repeat=n_repeat, warm_cache=warm_cache, kv_type=kv_type)


def gpu_info() -> Optional[Dict[str, Any]]:
    """The GPU as nvidia-smi reports it (name, driver, clocks now and at most, power limit), or None."""
    fields = ["name", "driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "temperature.gpu", "memory.total"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return dict(zip(fields, (v.strip() for v in out.stdout.strip().splitlines()[0].split(","))))


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def bench_config(Q, K, V, budget: float, args, cfg_extra: Dict[str, Any]) -> Dict[str, Any]:
    from pydhsa.dhsa_params import DhsaConfig
    cfg = DhsaConfig(budget=budget, min_context=0, **cfg_extra)
    n_q, n_kv = Q.shape[0], K.shape[0]
    q_pos0 = n_kv - n_q
    modes = [m for m in MODES if m in args.modes]
    times: Dict[str, List[float]] = {m: [] for m in modes}
    warm: Dict[str, List[float]] = {m: [] for m in modes}
    density = None
    sparse = None
    max_diff = None
    outs: Dict[str, np.ndarray] = {}
    # CPU: interleaved calls (machine noise hits every mode alike). GPU: one call per mode that times its
    # repeats inside the engine (uploading 128K keys per repeat would dominate the run).
    gpu = args.device != "cpu"
    rounds = [(0, args.repeats)] if gpu else [(rep, 1) for rep in range(args.warmup + args.repeats)]
    from pydhsa.errors import PydhsaError
    not_applicable = set()
    for rep, n_repeat in rounds:
        for mode in modes:
            if mode in not_applicable:
                continue
            try:
                res = time_mode(Q, K, V, mode, cfg, args.threads, device=args.device, n_repeat=n_repeat,
                                warm_cache=args.warm_cache)
            except PydhsaError as e:
                if mode != "dhsa-fattn":
                    raise
                log(f"  dhsa-fattn: {e}")
                not_applicable.add(mode)
                continue
            (warm if rep < args.warmup and not gpu else times)[mode].append(res.elapsed_ms)
            if mode not in outs and mode != "select":
                outs[mode] = res.out
                if res.ranges is not None and (density is None or mode == "dhsa"):
                    density = ranges_density(res.ranges, n_q, q_pos0, cfg.q_block)
                    sparse = res.sparse
    if "dhsa" in outs and "mask" in outs:
        max_diff = float(np.max(np.abs(outs["dhsa"] - outs["mask"])))
    med = {m: median(times[m]) if times[m] else None for m in modes}
    row = {
        "budget": budget,
        "median_ms": {MODE_LABEL[m]: med[m] for m in modes},
        "times_ms": {MODE_LABEL[m]: times[m] for m in modes},
        "warmup_ms": {MODE_LABEL[m]: warm[m] for m in modes},
        "density": density,
        "sparse": sparse,
        # The mask route uses one mask for all heads (the union of the KV heads' selections), so it equals
        # DHSA only for H_KV = 1; the difference is a sanity check, not a tolerance test.
        "max_abs_diff_dhsa_vs_mask": max_diff,
    }
    if "flash" in modes:
        row["speedups"] = {MODE_LABEL[m]: med["flash"] / med[m] if med[m] else None
                           for m in TIMED_AGAINST_DENSE if m in modes}
    if "flash" in modes and "dhsa" in modes:
        row["speedup"] = row["speedups"]["dhsa"]
        row["speedup_per_repeat"] = [f / s for f, s in zip(times["flash"], times["dhsa"]) if s > 0]
    if "flash" in modes and "mask" in modes:
        row["mask_speedup"] = row["speedups"]["mask"]
    fastest_dhsa = min((med[m] for m in ("dhsa", "dhsa-own", "dhsa-fattn") if m in modes and med[m]), default=None)
    if "select" in modes and fastest_dhsa:
        row["select_share"] = med["select"] / fastest_dhsa  # of the fastest DHSA mode
    return row


def fmt_ms(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{x:.1f}"


def print_markdown_table(hdr: List[str], lines: List[List[str]], left: Sequence[int] = ()) -> None:
    """A markdown table on stdout, columns padded to their widest cell; columns in `left` are left-aligned,
    the others right-aligned (numbers)."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) if i in left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(fmt(hdr))
    print("|" + "|".join(("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|")
    for l in lines:
        print(fmt(l))
    sys.stdout.flush()


def print_table(rows: List[Dict[str, Any]]) -> None:
    with_select = any(r.get("select_share") is not None for r in rows)
    precise = any(v is not None and v < 10 for r in rows for v in r["median_ms"].values())
    ms = (lambda x: "-" if x is None or x != x else f"{x:.3f}") if precise else fmt_ms
    labels = [MODE_LABEL[m] for m in MODES if m != "select" and any(MODE_LABEL[m] in r["median_ms"] for r in rows)]
    compared = [l for l in labels if l != "dense" and any(l in r.get("speedups", {}) for r in rows)]
    hdr = (["n_kv", "n_q", "d", "heads", "budget"] + [f"{l} ms" for l in labels] +
           [f"{l} speedup" for l in compared] + ["density"] + (["select share"] if with_select else []))
    speedup = lambda x: "-" if x is None else f"{x:.2f}x"
    lines = []
    for r in rows:
        m = r["median_ms"]
        lines.append([
            str(r["n_kv"]), str(r["n_q"]), str(r["d"]), f"{r['n_head']}/{r['n_head_kv']}", f"{r['budget']:g}",
            *(ms(m.get(l)) for l in labels), *(speedup(r.get("speedups", {}).get(l)) for l in compared),
            "-" if r.get("density") is None else f"{r['density']:.3f}",
        ] + (["-" if r.get("select_share") is None else f"{100 * r['select_share']:.1f}%"] if with_select else []))
    print_markdown_table(hdr, lines, left={0, 1, 2, 3})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Time the DHSA attention op against ggml flash_attn_ext (dense) and the mask route.",
        epilog="Speedup = median dense ms / median dhsa ms of the same configuration in the same run. "
               "Density = computed / causal query-key pairs of the selection.")
    ap.add_argument("--n-kv", type=parse_int_list, default=[4096, 8192, 16384, 32768], metavar="LIST",
                    help="key counts, comma-separated, 'k' suffix allowed (default 4096,8192,16384,32768)")
    ap.add_argument("--n-q", type=int, default=512, help="queries (one ubatch, at the end of the keys; default 512)")
    ap.add_argument("--d", type=parse_int_list, default=[256], metavar="LIST", help="head sizes (default 256)")
    ap.add_argument("--heads", type=parse_heads, default=[(4, 1), (8, 4)], metavar="H/HKV,...",
                    help="query heads / KV heads pairs (default 4/1,8/4)")
    ap.add_argument("--budgets", type=parse_float_list, default=[0.1, 0.3, 0.5], metavar="LIST",
                    help="DHSA budgets in (0, 1] (default 0.1,0.3,0.5; 1 = dense ranges through the DHSA kernel)")
    ap.add_argument("--threads", "-t", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", "-r", type=int, default=5, help="timed repeats per configuration (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds per configuration (default 1)")
    ap.add_argument("--modes", default=None,
                    help="modes to run, comma-separated from " + ",".join(MODES) + " (default flash,dhsa,mask; "
                         "with --device cuda flash,dhsa-own,dhsa-fattn,select)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="with --device cuda: keep the selection caches of complete 512-key segments between the "
                         "repeats (the steady state of a long prefill or decode; default: every run cold)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the ops run (default cpu; cuda needs a CUDA build of the engine and a GPU)")
    ap.add_argument("--boundary", choices=("keysim", "fixed"), default="keysim",
                    help="DHSA chunk boundary method (default keysim)")
    ap.add_argument("--seed", type=int, default=0, help="random input seed (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="small preset for validation: n_kv 2048,4096, n_q 512, heads 4/1,8/4, budgets 0.1,0.3, "
                         "1 warm-up + 3 repeats (overrides those flags)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result file (default bench/results/attention-<timestamp>.json)")
    ap.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.modes is None:
        args.modes = "flash,dhsa-own,dhsa-fattn,select" if args.device == "cuda" else "flash,dhsa,mask"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {','.join(MODES)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.n_q < 1 or min(args.d) < 1:
        ap.error("repeats, threads, n-q and d must be >= 1, warmup >= 0")
    too_small = [n for n in args.n_kv if n < args.n_q]
    if too_small:
        ap.error(f"--n-kv values must be >= --n-q ({args.n_q}): {too_small}")

    info = machine_info(args.threads)
    info["device"] = args.device
    if args.device == "cuda":
        info["gpu"] = gpu_info()
    cfg_extra = {"boundary": args.boundary}
    log(f"attention: {platform.node()} | {info.get('cpu_model')} | {args.threads} threads | "
        f"n_kv {args.n_kv} | n_q {args.n_q} | heads {args.heads} | budgets {args.budgets} | "
        f"{args.warmup} warm-up + {args.repeats} repeats | load {info.get('loadavg_start')}")
    rows: List[Dict[str, Any]] = []
    t_start = time.time()
    out_path = None if args.no_json else (args.out or default_out("attention"))
    params = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()}
    grid = [(d, h, hk, n_kv) for d in args.d for (h, hk) in args.heads for n_kv in args.n_kv]
    for (d, h, hk, n_kv) in grid:
        Q, K, V = make_inputs(args.n_q, n_kv, h, hk, d, seed=args.seed)
        for budget in args.budgets:
            t0 = time.time()
            row = {"n_kv": n_kv, "n_q": args.n_q, "n_head": h, "n_head_kv": hk, "d": d}
            row.update(bench_config(Q, K, V, budget, args, cfg_extra))
            rows.append(row)
            if out_path is not None:  # after every row: a long run that is stopped keeps what it measured
                write_json_atomic(out_path, {"benchmark": "attention", "machine": info, "params": params,
                                             "command": [sys.executable, *sys.argv], "results": rows})
            m = row["median_ms"]
            log(f"attention: n_kv={n_kv} d={d} heads={h}/{hk} budget={budget:g}: "
                + " ".join(f"{k} {v:.3f} ms" for k, v in m.items() if v is not None)
                + "".join(f" | {k} {v:.2f}x" for k, v in row.get("speedups", {}).items() if v)
                + (f" | density {row['density']:.3f}" if row.get("density") is not None else "")
                + f" | {time.time() - t0:.1f} s")
        del Q, K, V
    info["loadavg_end"] = _loadavg()
    info["wall_s"] = round(time.time() - t_start, 1)
    print_table(rows)
    if out_path is not None:
        write_json_atomic(out_path, {"benchmark": "attention", "machine": info, "params": params,
                                     "command": [sys.executable, *sys.argv], "results": rows})
        log(f"attention: wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
