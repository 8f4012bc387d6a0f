"""The accuracy suites end to end (``pydhsa niah`` and ``pydhsa ruler``): resolve the model, open the
runner, run the resumable grid into ``cases.jsonl`` and write the summary."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..models import DEFAULT_MODEL
from .grid import run_grid
from .machine import collect_meta
from .methods import Method, parse_depths, parse_lengths, parse_methods, parse_overrides
from .niah_grid import niah_specs
from .prompts import PromptSpec
from .ruler import ruler_specs
from .runner import ModelRunner
from .store import ResultStore
from .summary import summary_markdown, write_json, write_summary


def _repo_root() -> Optional[Path]:
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "bench").is_dir() else None


def default_out_dir(suite: str, model_path: Union[str, Path]) -> Path:
    """bench/results/<suite>-<model file stem>/ under the repository (source checkout) or the working
    directory (installed package)."""
    base = _repo_root() or Path.cwd()
    return base / "bench" / "results" / f"{suite}-{Path(model_path).stem}"


def resolve_model(args) -> Tuple[Path, Optional[str]]:
    """The checked model file of -m FILE / --model-name NAME (default: the embedded DEFAULT_MODEL) and the
    registry name (None for a file). Also checks the -ctk/-ctv names, so that a bad one fails before loading."""
    from ..api import cache_type_id
    from ..gguf_info import check_model_path
    from ..models import model_path
    if args.model and args.model_name:
        raise ValueError("give either -m/--model FILE or --model-name NAME, not both")
    cache_type_id(args.cache_type_k), cache_type_id(args.cache_type_v)
    name = None if args.model else (args.model_name or DEFAULT_MODEL)
    return check_model_path(Path(args.model) if args.model else model_path(name)), name


def _open_runner(args):
    path, name = resolve_model(args)
    overrides = parse_overrides(args.dhsa_min_context, args.dhsa_opt)
    return ModelRunner(path, n_threads=args.threads, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                       overrides=overrides, n_gpu_layers=args.n_gpu_layers, type_k=args.cache_type_k,
                       type_v=args.cache_type_v, chat=args.chat, model_name=name)


def _run_accuracy_suite(suite: str, args, make_specs: Callable[[Any], List[PromptSpec]], methods: List[Method],
                        runner=None, out_dir: Optional[Path] = None) -> int:
    own = runner is None
    if own:
        runner = _open_runner(args)
    try:
        out = Path(out_dir or args.out or default_out_dir(suite, runner.model_path))
        out.mkdir(parents=True, exist_ok=True)
        store = ResultStore(out / "cases.jsonl")
        meta = collect_meta(runner, {"suite": suite, "argv": sys.argv, "args": _args_dict(args),
                                     "dhsa_overrides": runner.overrides})
        write_json(out / "meta.json", meta)
        counts = {"run": 0, "skipped": 0, "errors": 0, "total": 0}
        interrupted = False
        if not getattr(args, "summarize_only", False):
            try:
                counts = run_grid(make_specs(runner), methods, runner, store, overrides=runner.overrides,
                                  model_id=runner.model_id, early_stop=not args.no_early_stop, title=suite,
                                  progress=not args.quiet,
                                  extra={"threads": runner.n_threads, "n_gpu_layers": runner.n_gpu_layers,
                                         "type_k": runner.type_k, "type_v": runner.type_v,
                                         "chat_template": runner.chat})
            except KeyboardInterrupt:
                interrupted = True
                print(f"\npydhsa: interrupted; finished cases are kept in {store.path}, rerun the same command "
                      f"to resume", file=sys.stderr)
        records = [r for r in store.records() if r.get("model") == runner.model_id]  # this model and settings
        summary = write_summary(out, records, meta, suite, plots=not args.no_plots)
        print(summary_markdown(summary, f"{suite}: {out}"), end="")
        print(f"pydhsa: {suite}: {counts['run']} cases run, {counts['skipped']} already done, "
              f"{counts['errors']} errors; results in {out}", file=sys.stderr)
        if interrupted:
            return 130
        return 1 if counts["errors"] else 0
    finally:
        if own:
            runner.close()


def _args_dict(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "handler" and not k.startswith("_") and not callable(v)}


def run_niah(args, runner=None) -> int:
    if args.quick:
        apply_quick(args, lengths="1024,2048", depths="0.1,0.5,0.9", methods="dense,dhsa:0.3", min_context=0)
    methods = parse_methods(args.methods)
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    if args.needles_per_cell < 1:
        raise ValueError("--needles-per-cell must be >= 1")

    def make(r):
        return niah_specs(lengths, depths, seed=args.seed, needles_per_cell=args.needles_per_cell,
                          max_tokens=args.max_tokens, n_ctx_train=r.n_ctx_train, haystack_dir=args.haystack_dir)
    return _run_accuracy_suite("niah", args, make, methods, runner)


def run_ruler(args, runner=None) -> int:
    if args.quick:
        apply_quick(args, lengths="1024,2048", methods="dense,dhsa:0.3", min_context=0)
        args.samples = 1 if args.samples is None else args.samples
    methods = parse_methods(args.methods)
    lengths = parse_lengths(args.lengths)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    samples = 4 if args.samples is None else args.samples
    if samples < 1:
        raise ValueError("--samples must be >= 1")
    task_args = {"n_keys": args.n_keys, "n_values": args.n_values, "n_hops": args.n_hops, "n_chains": args.n_chains}
    if min(task_args.values()) < 1 or args.n_keys < 1:
        raise ValueError("--n-keys, --n-values, --n-hops and --n-chains must be >= 1")

    def make(r):
        return ruler_specs(tasks, lengths, samples, seed=args.seed, n_ctx_train=r.n_ctx_train,
                           haystack_dir=args.haystack_dir, task_args=task_args)
    return _run_accuracy_suite("ruler", args, make, methods, runner)


def apply_quick(args, lengths=None, depths=None, methods=None, min_context=None) -> None:
    """--quick: a small smoke grid; flags given explicitly still win."""
    defaults = getattr(args, "_defaults", {})
    if lengths and args.lengths == defaults.get("lengths"):
        args.lengths = lengths
    if depths and getattr(args, "depths", None) == defaults.get("depths"):
        args.depths = depths
    if methods and args.methods == defaults.get("methods"):
        args.methods = methods
    if min_context is not None and args.dhsa_min_context is None:
        args.dhsa_min_context = min_context
