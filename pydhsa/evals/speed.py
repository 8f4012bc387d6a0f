"""``pydhsa bench`` (and bench/prefill.py): prefill tok/s, time to first token, decode tok/s and peak RSS at
several context lengths, every configuration in a fresh worker process (peak RSS is process-wide), methods
interleaved inside each repeat, medians and ratios to dense measured in the same run."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import niah
from .machine import collect_meta, model_file_meta
from .methods import Method, parse_lengths, parse_methods, parse_overrides
from .plots import plot_speed
from .progress_bar import Progress
from .runner import CTX_MARGIN, TokenMemo, model_id, target_tokens
from .store import ResultStore, record_done
from .suites import apply_quick, default_out_dir, resolve_model
from .summary import mean, median, write_json


def _rss_now() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss() -> Optional[int]:
    try:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(v if sys.platform == "darwin" else v * 1024)
    except (ImportError, OSError):
        return None


def speed_worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One measured configuration (meant to run in a fresh process): load the model, build a haystack prompt of
    ``length`` tokens, prefill it and generate ``n_gen`` tokens greedily."""
    from ..api import DEFAULT_CACHE_TYPE, Model
    t0 = time.perf_counter()
    model = Model(cfg["model_path"])
    t_load = (time.perf_counter() - t0) * 1e3
    rss_load = _rss_now()
    cache = {"type_k": cfg.get("type_k", DEFAULT_CACHE_TYPE), "type_v": cfg.get("type_v", DEFAULT_CACHE_TYPE)}
    method = parse_methods(cfg["method"])[0]
    overrides = cfg.get("overrides") or {}
    dhsa = method.config(model.dhsa_file_values(), overrides)
    n_gen = int(cfg["n_gen"])
    target = target_tokens(int(cfg["length"]), n_gen, model.info.n_ctx_train)
    memo = TokenMemo(lambda s: model.tokenize(s, add_special=True))
    p = niah.build_prompt(memo.count, target, 0.5, niah.NEEDLES[0], cfg.get("haystack_dir"))
    tokens = memo.tokens(p.text)
    memo.memo.clear()
    if cfg.get("warmup", True):  # thread pools, weight repacking, first-touch of the weights
        with model.session(n_ctx=64, n_threads=cfg["threads"], dhsa=None, **cache) as s:
            for _ in s.generate(tokens[:16], max_tokens=2, temperature=0, seed=0):
                pass
    n_ctx = len(tokens) + n_gen + CTX_MARGIN
    with model.session(n_ctx=n_ctx, n_threads=cfg["threads"], n_batch=cfg.get("n_batch", 2048),
                       n_ubatch=cfg.get("n_ubatch", 512), dhsa=dhsa, **cache) as s:
        t_start = time.perf_counter()
        gen = s.generate(tokens, max_tokens=n_gen, temperature=0, seed=0)
        t_first = None
        n_pieces = 0
        for _ in gen:
            if t_first is None:
                t_first = time.perf_counter()
            n_pieces += 1
        t_end = time.perf_counter()
        tm = s.timings()
        dens = s.dhsa_density()
    res = {"length": int(cfg["length"]), "method": cfg["method"], "n_prompt": len(tokens), "n_ctx": n_ctx,
           "t_load_ms": t_load, "t_prefill_ms": tm.t_prefill_ms, "n_prefill": tm.n_prefill,
           "t_generate_ms": tm.t_generate_ms, "n_generate": tm.n_generate,
           "prefill_tok_s": tm.prefill_tok_s, "decode_tok_s": tm.generate_tok_s,
           "ttft_ms": ((t_first or t_end) - t_start) * 1e3, "wall_ms": (t_end - t_start) * 1e3,
           "wall_decode_tok_s": (n_pieces - 1) / (t_end - t_first) if t_first and n_pieces > 1 and t_end > t_first
           else None,
           "peak_rss_bytes": tm.peak_rss_bytes, "ru_maxrss_bytes": _ru_maxrss(), "rss_after_load_bytes": rss_load,
           "density": dens.overall if dens is not None else None,
           # the layers that ran DHSA (bench/prefill.py's Amdahl bound counts them)
           "density_per_layer": {str(k): v for k, v in dens.per_layer.items()} if dens is not None else None,
           "dhsa_config": dhsa.as_dict() if dhsa is not None else None}
    model.close()
    return res


def worker_env() -> Dict[str, str]:
    """The environment of a worker: the pydhsa package of this process comes first on its path."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn_worker(cfg: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pydhsa.evals", "speed-worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=worker_env(), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"speed worker failed (status {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


SPEED_METRICS = ("prefill_tok_s", "t_prefill_ms", "ttft_ms", "decode_tok_s", "peak_rss_bytes")


def summarize_speed(runs: List[Dict[str, Any]], methods: Sequence[str], lengths: Sequence[int]) -> List[Dict[str, Any]]:
    """Median of each metric per (length, method) over the repeats, and ratios to dense at the same length:
    prefill/ttft speedup = dense time / method time, decode speedup = method tok/s / dense tok/s,
    rss_ratio = method peak RSS / dense peak RSS."""
    rows = []
    for L in lengths:
        med: Dict[str, Dict[str, Optional[float]]] = {}
        for m in methods:
            rs = [r for r in runs if r["length"] == L and r["method"] == m and not r.get("error")]
            if not rs:
                continue
            med[m] = {k: median([r[k] for r in rs if r.get(k) is not None]) for k in SPEED_METRICS}
            med[m]["density"] = mean([r["density"] for r in rs if r.get("density") is not None])
            med[m]["n_prompt"] = rs[0]["n_prompt"]
            med[m]["repeats"] = len(rs)
        dense = med.get("dense")
        for m, v in med.items():
            row = {"length": L, "method": m, **v}
            if dense and m != "dense":
                def ratio(a, b):
                    return a / b if a and b else None
                row["prefill_speedup"] = ratio(dense["t_prefill_ms"], v["t_prefill_ms"])
                row["ttft_speedup"] = ratio(dense["ttft_ms"], v["ttft_ms"])
                row["decode_speedup"] = ratio(v["decode_tok_s"], dense["decode_tok_s"])
                row["rss_ratio"] = ratio(v["peak_rss_bytes"], dense["peak_rss_bytes"])
            rows.append(row)
    return rows


def speed_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    m = meta.get("model", {})
    lines = ["# Speed and memory: dense versus DHSA", "",
             f"- model: `{m.get('file')}` | KV cache K {meta.get('type_k')}, V {meta.get('type_v')} | threads "
             f"{meta.get('threads')} | repeats {meta.get('repeats')} "
             f"(medians) | {meta.get('n_gen')} generated tokens",
             f"- machine: {meta.get('machine', {}).get('cpu')} | {meta.get('machine', {}).get('platform')}",
             f"- pydhsa {meta.get('pydhsa_version')} | git {meta.get('git_commit') or 'n/a'} | "
             f"{(meta.get('system_info') or '').strip()}", "",
             "| context | method | prompt | prefill tok/s | TTFT s | decode tok/s | peak RSS MiB | density | "
             "prefill x | TTFT x | decode x | RSS ratio |", "|---" * 12 + "|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    for r in rows:
        lines.append(f"| {r['length']} | {r['method']} | {r['n_prompt']} | {f(r['prefill_tok_s'], '.1f')} | "
                     f"{f(r['ttft_ms'] and r['ttft_ms'] / 1e3, '.2f')} | {f(r['decode_tok_s'], '.1f')} | "
                     f"{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} | {f(r.get('density'), '.3f')} | "
                     f"{f(r.get('prefill_speedup'), '.2f')} | {f(r.get('ttft_speedup'), '.2f')} | "
                     f"{f(r.get('decode_speedup'), '.2f')} | {f(r.get('rss_ratio'), '.2f')} |")
    return "\n".join(lines) + "\n"


def new_run_id(taken) -> str:
    """A timestamp id no record in the store has yet: two runs started within one second (another cache type
    right after the first) must not share an id, or the second would count the first one's cases as done."""
    base = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    run_id, n = base, 1
    while run_id in taken:
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def run_speed(args, spawn: Callable[[Dict[str, Any]], Dict[str, Any]] = None) -> int:
    """Every (length, repeat, method) in a fresh worker process; methods interleaved inside each repeat so
    slow drifts of the machine hit all methods alike. Raw runs go to runs.jsonl as they finish
    (``--resume`` continues the latest run), medians and ratios to speed.json / speed.md / speed.png."""
    from ..api import default_threads
    if args.quick:
        apply_quick(args, lengths="1024,2048", methods="dense,dhsa:0.3", min_context=0)
        if args.repeats == getattr(args, "_defaults", {}).get("repeats"):
            args.repeats = 1
        if args.n_gen == getattr(args, "_defaults", {}).get("n_gen"):
            args.n_gen = 16
    spawn = spawn or spawn_worker
    methods = parse_methods(args.methods)
    if not any(m.kind == "dense" for m in methods):
        methods = [Method("dense")] + methods  # ratios need dense measured in the same run
    lengths = parse_lengths(args.lengths)
    if args.repeats < 1 or args.n_gen < 1:
        raise ValueError("--repeats and --n-gen must be >= 1")
    overrides = parse_overrides(args.dhsa_min_context, args.dhsa_opt)
    model_path = resolve_model(args)[0].resolve()
    threads = args.threads or default_threads()
    out = Path(args.out or default_out_dir("speed", model_path))
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out / "runs.jsonl")
    setup = {"model": model_id(model_path, type_k=args.cache_type_k, type_v=args.cache_type_v),
             "threads": threads, "n_gen": args.n_gen,
             "n_batch": args.batch_size, "n_ubatch": args.ubatch_size, "overrides": overrides,
             "warmup": not args.no_warmup}
    records = store.records()
    run_ids = [r["run_id"] for r in records if r.get("setup") == json.loads(json.dumps(setup))]
    run_id = run_ids[-1] if args.resume and run_ids else new_run_id({r.get("run_id") for r in records})
    mids = [m.method_id(overrides) for m in methods]
    plan = [(L, rep, m, mid) for L in lengths for rep in range(args.repeats) for m, mid in zip(methods, mids)]
    todo = [p for p in plan if not record_done(store, {"run_id": run_id, "length": p[0], "repeat": p[1],
                                                        "method": p[3]})]
    meta = collect_meta(None, {"suite": "speed", "run_id": run_id, "threads": threads, "repeats": args.repeats,
                               "n_gen": args.n_gen, "n_batch": args.batch_size, "n_ubatch": args.ubatch_size,
                               "dhsa_overrides": overrides, "warmup": not args.no_warmup, "argv": sys.argv,
                               "type_k": args.cache_type_k, "type_v": args.cache_type_v,
                               "model": model_file_meta(model_path, threads)})
    bar = Progress(len(todo), sum(p[0] for p in todo), title="speed", enabled=not args.quiet)
    if todo != plan and not args.quiet:
        print(f"speed: resuming run {run_id}: {len(plan) - len(todo)} of {len(plan)} runs already done",
              file=sys.stderr)
    errors = 0
    interrupted = False
    try:
        for L, rep, m, mid in todo:
            bar.show(f"L={L} {mid} repeat {rep + 1}")
            cfg = {"model_path": str(model_path), "length": L, "method": m.label, "overrides": overrides,
                   "n_gen": args.n_gen, "threads": threads, "n_batch": args.batch_size, "n_ubatch": args.ubatch_size,
                   "warmup": not args.no_warmup, "haystack_dir": args.haystack_dir,
                   "type_k": args.cache_type_k, "type_v": args.cache_type_v}
            ident = {"run_id": run_id, "length": L, "repeat": rep, "method": mid}
            rec = {**ident, "key": store.key_of(ident), "setup": setup}
            try:
                res = spawn(cfg)
                res["method"] = mid
                rec.update({k: v for k, v in res.items() if k != "length"})
                msg = (f"L={L} {mid} #{rep + 1}: prefill {res['prefill_tok_s']:.1f} tok/s, decode "
                       f"{res['decode_tok_s']:.1f} tok/s, peak {res['peak_rss_bytes'] / 2**20:.0f} MiB")
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                rec["error"] = str(e)
                errors += 1
                msg = f"L={L} {mid} #{rep + 1}: ERROR {e}"
            store.add(rec)
            bar.advance(L, msg)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\npydhsa: interrupted; rerun with --resume to continue run {run_id}", file=sys.stderr)
    finally:
        bar.close()
    runs = [r for r in store.records() if r.get("run_id") == run_id]
    rows = summarize_speed(runs, mids, lengths)
    result = {"meta": meta, "rows": rows, "runs": runs}
    write_json(out / "speed.json", result)
    (out / "speed.md").write_text(speed_markdown(rows, meta), encoding="utf-8")
    if rows and not args.no_plots:
        try:
            plot_speed(rows, out / "speed.png", f"{model_path.name} | {meta['machine']['cpu']} | {threads} threads")
        except ImportError as e:
            print(f"pydhsa: no plot ({e}; pip install matplotlib)", file=sys.stderr)
    print(speed_markdown(rows, meta), end="")
    print(f"pydhsa: speed: results in {out}", file=sys.stderr)
    return 130 if interrupted else (1 if errors else 0)
