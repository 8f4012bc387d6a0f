"""The resumable grid: every (prompt, method) case not yet stored is run, scored and appended to the store;
each prompt is built once and all pending methods run on it before the next one."""
from __future__ import annotations

import datetime
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import niah
from .methods import Method
from .progress_bar import Progress
from .prompts import PromptSpec
from .scoring import score_prompt, stop_rule
from .store import ResultStore, record_done


def grid_cases(specs: Sequence[PromptSpec], methods: Sequence[Method]) -> List[Tuple[PromptSpec, Method]]:
    """The run order: each prompt with all methods, prompt after prompt."""
    return [(spec, m) for spec in specs for m in methods]


def case_fields(spec: PromptSpec, method: Method, overrides: Optional[Dict[str, Any]], model_id: str) -> Dict[str, Any]:
    return {**spec.fields, "method": method.method_id(overrides), "model": model_id}


def run_grid(specs: Sequence[PromptSpec], methods: Sequence[Method], runner, store: ResultStore, *,
             overrides: Optional[Dict[str, Any]] = None, model_id: Optional[str] = None, early_stop: bool = True,
             title: str = "", progress: bool = True, stream=None,
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Run every (prompt, method) case not yet in ``store``; append one record per case.

    Prompts are built (and tokenized) once, only when some method still needs them, and all pending
    methods run on a prompt before the next one is built. A case that raises is stored with an
    ``error`` field and retried on the next run. Returns counts: run, skipped, errors.
    """
    stream = stream or sys.stderr
    model_id = model_id or getattr(runner, "model_id", "model")
    pending: List[Tuple[PromptSpec, List[Tuple[Method, str]]]] = []
    n_total = n_skipped = 0
    for spec in specs:
        todo = []
        for m in methods:
            n_total += 1
            key = store.key_of(case_fields(spec, m, overrides, model_id))
            if record_done(store, key):
                n_skipped += 1
            else:
                todo.append((m, key))
        if todo:
            pending.append((spec, todo))
    n_todo = n_total - n_skipped
    bar = Progress(n_todo, sum(s.weight * len(t) for s, t in pending), title=title, stream=stream,
                   enabled=progress)
    if progress and n_skipped:
        stream.write(f"{title}: {n_skipped} of {n_total} cases already in {store.path}, skipped\n")
    counts = {"run": 0, "skipped": n_skipped, "errors": 0, "total": n_total}
    try:
        for spec, todo in pending:
            bar.show(f"building prompt {_spec_label(spec.fields)}")
            try:
                prompt = spec.build(runner)
            except Exception as e:  # a prompt that cannot be built fails all its cases
                for m, key in todo:
                    store.add({**case_fields(spec, m, overrides, model_id), "key": key, "error": repr(e),
                               **(extra or {})})
                    counts["errors"] += 1
                    bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: ERROR {e}")
                continue
            for m, key in todo:
                bar.show(f"{_spec_label(spec.fields)} {m.label} ({len(prompt.tokens)} tokens)")
                rec = {**case_fields(spec, m, overrides, model_id), "key": key, "method_label": m.label,
                       "kind": m.kind, "budget": m.budget, "n_prompt": len(prompt.tokens),
                       "expected": prompt.expected, "max_tokens": prompt.max_tokens, **prompt.info,
                       **(extra or {})}
                try:
                    cfg = runner.config(m) if hasattr(runner, "config") else None
                    rec["dhsa_config"] = cfg.as_dict() if cfg is not None else None
                    g = runner.generate(prompt.tokens, m, prompt.max_tokens,
                                        stop_rule(prompt) if early_stop else None)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    rec["error"] = repr(e)
                    store.add(rec)
                    counts["errors"] += 1
                    bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: ERROR {e}")
                    continue
                ok, frac = score_prompt(prompt, g.text)
                rec.update(generated=g.text, answer=niah.answer_span(g.text), correct=bool(ok), recall=frac,
                           t_prefill_ms=g.t_prefill_ms, t_generate_ms=g.t_generate_ms, n_generate=g.n_generate,
                           ttft_ms=g.ttft_ms, wall_ms=g.wall_ms, peak_rss_bytes=g.peak_rss_bytes,
                           density=g.density, time=datetime.datetime.now().isoformat(timespec="seconds"))
                store.add(rec)
                counts["run"] += 1
                bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: "
                                         f"{'OK  ' if ok else 'MISS'} {niah.answer_span(g.text)[:40]!r}")
    finally:
        bar.close()
    return counts


def _spec_label(fields: Dict[str, Any]) -> str:
    parts = []
    if "task" in fields:
        parts.append(str(fields["task"]))
    if "length" in fields:
        parts.append(f"L={fields['length']}")
    if "depth" in fields:
        parts.append(f"d={fields['depth']:.2f}")
    if "sample" in fields:
        parts.append(f"#{fields['sample']}")
    return " ".join(parts)
