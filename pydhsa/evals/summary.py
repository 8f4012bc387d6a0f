"""The result files of an accuracy suite: accuracies per method, length and depth or task (summary.json)
and their markdown tables (summary.md), plots delegated to pydhsa.evals.plots."""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .methods import KIND_ORDER
from .plots import plot_niah_heatmaps, plot_ruler


def _method_order(records: Iterable[Dict[str, Any]]) -> List[str]:
    seen: Dict[str, Tuple] = {}
    for r in records:
        mid = r["method"]
        if mid not in seen:
            seen[mid] = (KIND_ORDER.get(r.get("kind"), 9), r.get("budget") or 0.0, mid)
    return sorted(seen, key=lambda m: seen[m])


def mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize(records: Iterable[Dict[str, Any]], row_field: Optional[str] = None) -> Dict[str, Any]:
    """Accuracy per method x length (and per ``row_field`` value x length when given: depth for NIAH,
    task for RULER), with counts, mean recall, median prefill speed and mean DHSA density.

    Cases with an ``error`` are left out of the accuracies and counted in ``errors``.
    """
    records = list(records)
    recs = [r for r in records if not r.get("error")]
    errors = sum(1 for r in records if r.get("error"))
    methods = _method_order(recs)
    lengths = sorted({int(r["length"]) for r in recs})
    out: Dict[str, Any] = {"methods": methods, "lengths": lengths, "n_cases": len(recs), "errors": errors,
                           "accuracy": {}, "correct": {}, "count": {}, "overall": {}, "recall": {},
                           "prefill_tok_s": {}, "density": {}}
    for m in methods:
        mr = [r for r in recs if r["method"] == m]
        out["overall"][m] = mean([float(bool(r["correct"])) for r in mr])
        out["accuracy"][m], out["correct"][m], out["count"][m] = {}, {}, {}
        out["recall"][m], out["prefill_tok_s"][m], out["density"][m] = {}, {}, {}
        for L in lengths:
            cell = [r for r in mr if int(r["length"]) == L]
            if not cell:
                continue
            k = str(L)
            out["correct"][m][k] = sum(1 for r in cell if r["correct"])
            out["count"][m][k] = len(cell)
            out["accuracy"][m][k] = out["correct"][m][k] / len(cell)
            out["recall"][m][k] = mean([float(r.get("recall", float(bool(r["correct"])))) for r in cell])
            out["prefill_tok_s"][m][k] = median([r["n_prompt"] / (r["t_prefill_ms"] / 1e3) for r in cell
                                                  if r.get("t_prefill_ms")])
            dens = [r["density"] for r in cell if r.get("density") is not None]
            out["density"][m][k] = mean(dens)
    if row_field:
        rows = sorted({r[row_field] for r in recs}, key=lambda v: (str(type(v)), v))
        out["rows"] = {"field": row_field, "values": rows}
        grid: Dict[str, Dict[str, Dict[str, float]]] = {}
        rgrid: Dict[str, Dict[str, Dict[str, float]]] = {}
        for m in methods:
            grid[m], rgrid[m] = {}, {}
            for v in rows:
                grid[m][str(v)], rgrid[m][str(v)] = {}, {}
                for L in lengths:
                    cell = [r for r in recs if r["method"] == m and r[row_field] == v and int(r["length"]) == L]
                    if cell:
                        grid[m][str(v)][str(L)] = mean([float(bool(r["correct"])) for r in cell])
                        rgrid[m][str(v)][str(L)] = mean([float(r.get("recall", float(bool(r["correct"]))))
                                                          for r in cell])
        out["grid"] = grid          # accuracy per method, row value, length
        out["recall_grid"] = rgrid  # mean fraction of the expected values produced
    return out


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summary_markdown(summary: Dict[str, Any], title: str, meta: Optional[Dict[str, Any]] = None) -> str:
    lengths = [str(L) for L in summary["lengths"]]
    lines = [f"# {title}", ""]
    if meta:
        m = meta.get("model", {})
        lines += [f"- model: `{m.get('file')}` ({m.get('description')}) | KV cache K {m.get('type_k')}, V "
                  f"{m.get('type_v')} | chat template {'on' if m.get('chat_template') else 'off'}",
                  f"- machine: {meta.get('machine', {}).get('cpu')} | {meta.get('machine', {}).get('platform')} | "
                  f"threads {meta.get('model', {}).get('threads')}",
                  f"- pydhsa {meta.get('pydhsa_version')} | git {meta.get('git_commit') or 'n/a'} | "
                  f"{meta.get('system_info', '').strip()}",
                  f"- cases: {summary['n_cases']} (errors left out: {summary.get('errors') or 0})", ""]
    lines += ["## Accuracy (%) per method and context length (correct/total)", "",
              "| method | " + " | ".join(lengths) + " | all |", "|---" * (len(lengths) + 2) + "|"]
    for m in summary["methods"]:
        cells = []
        for L in lengths:
            if L in summary["accuracy"][m]:
                cells.append(f"{pct(summary['accuracy'][m][L])} ({summary['correct'][m][L]}/"
                             f"{summary['count'][m][L]})")
            else:
                cells.append("-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {pct(summary['overall'][m])} |")
    task_tables = (("grid", "Accuracy (%) per task, method and context length"),
                   ("recall_grid", "Mean recall (%) of the expected values (partial credit) per task"))
    for key, heading in task_tables if "grid" in summary and summary["rows"]["field"] == "task" else ():
        lines += ["", f"## {heading}", "",
                  "| task | method | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 2) + "|"]
        for v in summary["rows"]["values"]:
            for m in summary["methods"]:
                row = summary[key][m].get(str(v), {})
                lines.append(f"| {v} | {m} | " + " | ".join(pct(row.get(L)) for L in lengths) + " |")
    lines += ["", "## Median prefill speed (tok/s)", "", "| method | " + " | ".join(lengths) + " |",
              "|---" * (len(lengths) + 1) + "|"]
    for m in summary["methods"]:
        vals = summary["prefill_tok_s"][m]
        lines.append(f"| {m} | " + " | ".join("-" if vals.get(L) is None else f"{vals[L]:.0f}" for L in lengths)
                     + " |")
    dens_methods = [m for m in summary["methods"] if any(v is not None for v in summary["density"][m].values())]
    if dens_methods:
        lines += ["", "## Mean DHSA attention density (computed / causal pairs, DHSA layers only)", "",
                  "| method | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for m in dens_methods:
            vals = summary["density"][m]
            lines.append(f"| {m} | " + " | ".join("-" if vals.get(L) is None else f"{vals[L]:.3f}" for L in lengths)
                         + " |")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Union[str, Path], records: List[Dict[str, Any]], meta: Dict[str, Any], suite: str,
                  plots: bool = True) -> Dict[str, Any]:
    """summary.json, summary.md and the PNGs of a NIAH or RULER result directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, row_field="depth" if suite == "niah" else "task")
    name = meta.get("model", {}).get("file", "")
    title = {"niah": "Needle in a Haystack", "ruler": "RULER-style synthetic tasks"}[suite] + (f": {name}" if name
                                                                                            else "")
    files: List[Path] = []
    if plots and summary["methods"]:
        try:
            files = plot_niah_heatmaps(summary, out_dir, title) if suite == "niah" else \
                plot_ruler(summary, out_dir, title)
        except ImportError as e:
            print(f"pydhsa: no plots ({e}; pip install matplotlib)", file=sys.stderr)
    summary["plots"] = [p.name for p in files]
    summary["meta"] = meta
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(summary_markdown(summary, title, meta), encoding="utf-8")
    return summary


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
