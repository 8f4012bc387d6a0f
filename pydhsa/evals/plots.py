"""PNG plots of the suites' results (matplotlib, imported on first use: without it the suites still write
their JSON and markdown)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _niah_cmap():
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    if hasattr(cmap, "with_extremes"):
        return cmap.with_extremes(bad="#DDDDDD")
    cmap.set_bad("#DDDDDD")  # matplotlib < 3.4
    return cmap


def _grid_matrix(summary: Dict[str, Any], method: str):
    import numpy as np
    rows = summary["rows"]["values"]
    lengths = [str(L) for L in summary["lengths"]]
    mat = np.full((len(rows), len(lengths)), np.nan)
    for i, v in enumerate(rows):
        for j, L in enumerate(lengths):
            x = summary["grid"][method].get(str(v), {}).get(L)
            if x is not None:
                mat[i, j] = x
    return np.ma.masked_invalid(mat)


def _draw_grid(ax, summary, method, ylabels, ylabel, annotate=False):
    mat = _grid_matrix(summary, method)
    im = ax.imshow(mat, cmap=_niah_cmap(), vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(summary["lengths"])))
    ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in summary["lengths"]])
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_xticks([x - 0.5 for x in range(1, len(summary["lengths"]))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(ylabels))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    if annotate:
        import numpy as np
        mask = np.ma.getmaskarray(mat)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not mask[i, j]:
                    ax.text(j, i, f"{100 * mat[i, j]:.0f}", ha="center", va="center", fontsize=8)
    acc = summary["overall"].get(method)
    acc_text = "-" if acc is None else f"{100 * acc:.1f}"  # summary.pct, without importing the summary
    ax.set_title(f"{method}\naccuracy {acc_text}%", fontsize=9)
    return im


def _save(plt, fig, path: Path, title: str, small: bool = False) -> Path:
    """Title, lay out, write and close a figure; a single method's grid is written smaller and sharper."""
    if title:
        fig.suptitle(title, fontsize=9 if small else 10)
    fig.tight_layout()
    fig.savefig(path, dpi=120 if small else 110)
    plt.close(fig)
    return path


def _method_grid_png(plt, summary, method, ylabels, ylabel, annotate, bar_label, size, title, path: Path) -> Path:
    """One method's grid as its own PNG; ``size`` = (width without the length columns, height) in inches."""
    fig, ax = plt.subplots(figsize=(size[0] + 0.9 * max(len(summary["lengths"]), 2), size[1]))
    im = _draw_grid(ax, summary, method, ylabels, ylabel, annotate=annotate)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label=bar_label)
    return _save(plt, fig, path, title, small=True)


def plot_niah_heatmaps(summary: Dict[str, Any], out_dir: Union[str, Path], title: str = "") -> List[Path]:
    """One PNG per method (depth x length, green = found, red = missed, grey = not run) and one with all
    methods side by side. Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    depths = summary["rows"]["values"]
    ylabels = [f"{100 * d:.0f}%" for d in depths]
    files = []
    # cells holding several needles show their fraction as a number
    multi = any(0.0 < x < 1.0 for g in summary["grid"].values() for row in g.values() for x in row.values())
    for m in summary["methods"]:
        files.append(_method_grid_png(plt, summary, m, ylabels, "Needle depth", multi, "fraction retrieved",
                                      (1.2, 1.5 + 0.35 * len(depths)), title, out_dir / f"heatmap-{_safe(m)}.png"))
    n = len(summary["methods"])
    if n:
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, squeeze=False,
                                 figsize=(cols * (1.2 + 0.9 * max(len(summary["lengths"]), 2)),
                                          rows * (1.5 + 0.35 * len(depths))))
        for i, m in enumerate(summary["methods"]):
            _draw_grid(axes[i // cols][i % cols], summary, m, ylabels, "Needle depth", annotate=multi)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].axis("off")
        files.append(_save(plt, fig, out_dir / "heatmaps.png", title))
    return files


def plot_ruler(summary: Dict[str, Any], out_dir: Union[str, Path], title: str = "") -> List[Path]:
    """Per method a task x length grid (accuracy annotated), plus accuracy vs length per task (one line
    per method) in ruler-accuracy.png."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    tasks = summary["rows"]["values"]
    files = []
    for m in summary["methods"]:
        files.append(_method_grid_png(plt, summary, m, [str(t) for t in tasks], "Task", True, "accuracy",
                                      (1.6, 1.4 + 0.45 * len(tasks)), title, out_dir / f"ruler-{_safe(m)}.png"))
    if tasks:
        # top row: exact accuracy (every expected value produced); bottom row: mean recall (partial credit)
        fig, axes = plt.subplots(2, len(tasks), squeeze=False, figsize=(4.2 * len(tasks), 6.6), sharey=True)
        for k, (grid_key, ylabel) in enumerate((("grid", "accuracy (%)"), ("recall_grid", "recall of values (%)"))):
            for i, t in enumerate(tasks):
                ax = axes[k][i]
                for m in summary["methods"]:
                    row = summary.get(grid_key, {}).get(m, {}).get(str(t), {})
                    xs = [L for L in summary["lengths"] if str(L) in row]
                    ax.plot(xs, [100 * row[str(L)] for L in xs], "--" if m.startswith("fixed") else "-", marker="o",
                            label=m)
                ax.set_xscale("log", base=2)
                ax.set_xticks(summary["lengths"])
                ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in summary["lengths"]])
                ax.minorticks_off()
                ax.set_title(f"{t}: {ylabel.split(' (')[0]}", fontsize=10)
                ax.set_xlabel("Context length (tokens)")
                ax.set_ylim(-5, 105)
                ax.grid(alpha=0.3)
            axes[k][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7, loc="best")
        files.append(_save(plt, fig, out_dir / "ruler-accuracy.png", title))
    return files


def plot_speed(rows: List[Dict[str, Any]], path: Union[str, Path], title: str = "") -> Path:
    """2x2: prefill speedup, decode speedup (vs dense), TTFT and peak RSS versus context length."""
    plt = _pyplot()
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("prefill_speedup", "prefill speedup vs dense (x)", 1.0), ("decode_speedup",
              "decode speedup vs dense (x)", 1.0), ("ttft_ms", "time to first token (s)", 1e-3),
              ("peak_rss_bytes", "peak RSS (MiB)", 1.0 / 2**20)]
    lengths = sorted({r["length"] for r in rows})
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for m in methods:
            pts = [(r["length"], r.get(key)) for r in rows if r["method"] == m and r.get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", label=m,
                    linestyle="--" if m == "dense" else "-")
        if key.endswith("speedup"):
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.minorticks_off()
        ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, Path(path), title)
