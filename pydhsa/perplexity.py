"""`pydhsa perplexity`: perplexity of a text in windows of N tokens, and with --kl-divergence how far the
next-token distributions of an attention method are from dense attention on the same tokens, in the manner
of llama.cpp's llama-perplexity.

Each window is [BOS] + the next N-1 tokens of the text (the model's BOS only when it uses one); position j
predicts token j+1 of the window. Windows are evaluated a batch at a time (Session.eval_logits), by the
dense session and the tested one in lockstep, and only per-position numbers are kept, so memory stays at
two batches of logits (2 x batch x n_vocab floats) however long the text is.

"Positions that ran sparse" are those at or past min_context (a query at window position j sees j + 1 keys)
in the batches where the DHSA kernel actually skipped attention (its computed query-key pairs grew less
than the causal ones).
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

Z95 = 1.959964  # two-sided 95% normal quantile


# ------------------------------------------------------------------------------------------------
# Scoring one batch


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, with each row's log-sum-exp accumulated in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64)).astype(np.float32)
    return shifted - lse[:, None]


def score_batch(test_logits: np.ndarray, targets: np.ndarray, base_logits: Optional[np.ndarray] = None,
                rows: int = 64) -> Dict[str, np.ndarray]:
    """Per position: negative log-likelihood of the target under the tested logits, and with base logits
    (dense) the base NLL, KL(base || test) and whether the top tokens agree. Works `rows` at a time so
    that the float32 temporaries stay small with a 262K vocabulary."""
    n = len(targets)
    out = {"nll": np.empty(n, np.float64)}
    if base_logits is not None:
        out.update(nll_base=np.empty(n, np.float64), kld=np.empty(n, np.float64), agree=np.empty(n, bool))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        idx = np.arange(r1 - r0)
        lt = log_softmax_rows(test_logits[r0:r1])
        out["nll"][r0:r1] = -lt[idx, targets[r0:r1]]
        if base_logits is None:
            continue
        lb = log_softmax_rows(base_logits[r0:r1])
        out["nll_base"][r0:r1] = -lb[idx, targets[r0:r1]]
        kld = (np.exp(lb) * (lb - lt)).sum(axis=1, dtype=np.float64)
        out["kld"][r0:r1] = np.maximum(kld, 0.0)  # rounding can make an exact match a hair negative
        out["agree"][r0:r1] = lb.argmax(axis=1) == lt.argmax(axis=1)
    return out


# ------------------------------------------------------------------------------------------------
# Statistics


def mean_ci(values: np.ndarray) -> Dict[str, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation, as llama-perplexity)."""
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "ci95": Z95 * se}


def ppl_ci(nll: np.ndarray) -> Dict[str, float]:
    """exp(mean NLL) and its 95% half-width by the delta method (llama-perplexity's error, times 1.96)."""
    m = mean_ci(nll)
    ppl = math.exp(m["mean"]) if len(nll) else float("nan")
    return {"ppl": ppl, "ci95": ppl * m["ci95"]}


def summarize(scores: Dict[str, np.ndarray], mask: np.ndarray) -> Optional[Dict[str, float]]:
    """The statistics of the positions in `mask`; None when there are none."""
    n = int(mask.sum())
    if n == 0:
        return None
    out: Dict[str, float] = {"positions": n}
    p = ppl_ci(scores["nll"][mask])
    out.update(ppl=p["ppl"], ppl_ci95=p["ci95"])
    if "kld" in scores:
        b = ppl_ci(scores["nll_base"][mask])
        kld = scores["kld"][mask]
        m = mean_ci(kld)
        agree = scores["agree"][mask].astype(np.float64)
        a = float(agree.mean())
        out.update(ppl_dense=b["ppl"], ppl_dense_ci95=b["ci95"], kld_mean=m["mean"], kld_mean_ci95=m["ci95"],
                   kld_median=float(np.median(kld)), kld_p99=float(np.percentile(kld, 99)),
                   kld_max=float(kld.max()), top1_agree=a, top1_agree_ci95=Z95 * math.sqrt(a * (1 - a) / n))
    return out


# ------------------------------------------------------------------------------------------------
# The run


@dataclass
class Scores:
    """Per-position results of a run, appended batch by batch."""
    parts: Dict[str, List[np.ndarray]] = field(default_factory=dict)
    sparse: List[np.ndarray] = field(default_factory=list)
    nll_sum: float = 0.0  # running totals for the progress line's PPL so far
    count: int = 0
    pairs_computed: int = 0  # query-key pairs the DHSA kernel computed, and the causal ones, over all batches
    pairs_causal: int = 0

    def add(self, batch: Dict[str, np.ndarray], ran_sparse: np.ndarray) -> None:
        for key, values in batch.items():
            self.parts.setdefault(key, []).append(values)
        self.sparse.append(ran_sparse)
        self.nll_sum += float(batch["nll"].sum())
        self.count += len(batch["nll"])

    def density(self) -> Optional[float]:
        """Computed / causal query-key pairs of the DHSA layers (None: no DHSA layer ran)."""
        return self.pairs_computed / self.pairs_causal if self.pairs_causal else None

    def ppl_so_far(self) -> float:
        return math.exp(self.nll_sum / self.count) if self.count else float("nan")

    def arrays(self):
        return {k: np.concatenate(v) for k, v in self.parts.items()}, np.concatenate(self.sparse)


def windows(tokens: List[int], n_ctx: int, bos: Optional[int], max_windows: int = 0) -> List[List[int]]:
    """Non-overlapping windows of n_ctx tokens, each starting with BOS when the model uses one."""
    step = n_ctx - 1 if bos is not None else n_ctx
    out = []
    for start in range(0, len(tokens) - step + 1, step):
        out.append(([bos] if bos is not None else []) + tokens[start:start + step])
        if max_windows and len(out) == max_windows:
            break
    return out


def score_window(window: List[int], test, base, batch: int, scores: Scores, min_context: int) -> None:
    """Evaluate one window in both sessions (fresh contexts), a batch at a time, into `scores`."""
    for session in (test, base):
        if session is not None:
            session.reset()
    for b0 in range(0, len(window) - 1, batch):
        chunk = window[b0:b0 + batch]
        before = test.dhsa_pairs()
        test_logits = test.eval_logits(chunk)
        after = test.dhsa_pairs()
        base_logits = base.eval_logits(chunk) if base is not None else None
        targets = np.asarray(window[b0 + 1:b0 + 1 + len(chunk)], dtype=np.int64)
        n = len(targets)  # the window's last position has no target
        computed, causal = after[0] - before[0], after[1] - before[1]
        scores.pairs_computed += int(computed)
        scores.pairs_causal += int(causal)
        skipped = computed < causal
        ran_sparse = skipped & (np.arange(b0, b0 + n) + 1 >= min_context)
        scores.add(score_batch(test_logits[:n], targets, base_logits[:n] if base_logits is not None else None),
                   ran_sparse)


def run(args) -> int:
    from .api import Model
    from .cli import UsageError, dhsa_config_for_run, resolve_model
    from .evals import Progress, collect_meta
    from .gguf_info import check_model_path

    text = Path(args.file).read_text(encoding="utf-8") if args.file else None
    if not text:
        raise UsageError(f"the text file {args.file} is empty")
    model_path = check_model_path(resolve_model(args))
    dhsa = dhsa_config_for_run(args, model_path)
    if args.batch_size < 1 or args.ctx_size < 2:
        raise UsageError("-c must be at least 2 and -b at least 1")
    with Model(model_path) as model:
        prefix = model.tokenize("", add_special=True)  # [BOS] when the model uses one
        bos = prefix[0] if prefix else None
        tokens = model.tokenize(text, add_special=False)
        wins = windows(tokens, args.ctx_size, bos, args.chunks)
        if not wins:
            raise UsageError(f"the text has {len(tokens)} tokens, fewer than one window of -c {args.ctx_size}")
        common = dict(n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                      n_ubatch=min(args.batch_size, args.ubatch_size), type_k=args.cache_type_k,
                      type_v=args.cache_type_v)
        method = "dense" if dhsa is None else f"dhsa {dhsa}"
        print(f"pydhsa: perplexity: {len(wins)} windows of {args.ctx_size} tokens ({len(tokens)} tokens of text), "
              f"batch {args.batch_size}, {method}" + (", KL divergence against dense" if args.kl_divergence else ""),
              file=sys.stderr)
        scores = Scores()
        with model.session(dhsa=dhsa, **common) as test:
            base = model.session(dhsa=None, **common) if args.kl_divergence else None
            try:
                bar = Progress(len(wins), len(wins), title="perplexity", enabled=not args.quiet)
                for i, window in enumerate(wins):
                    score_window(window, test, base, args.batch_size, scores,
                                 dhsa.min_context if dhsa is not None else 0)
                    bar.advance(1, f"[{i + 1}] PPL {scores.ppl_so_far():.4f}")
                bar.close()
            finally:
                if base is not None:
                    base.close()
        values, sparse = scores.arrays()
        result = {"all": summarize(values, np.ones_like(sparse)), "sparse": summarize(values, sparse)}
    print_report(result, args.kl_divergence, scores.density())
    if args.json:
        headline = result["sparse"] or {}
        doc = {"kld_mean": headline.get("kld_mean"), "top1_agree": headline.get("top1_agree"),
               "ppl": result["all"]["ppl"], "density": scores.density(), **result,
               "settings": {"model": str(model_path), "ctx_size": args.ctx_size, "batch_size": args.batch_size,
                            "windows": len(wins), "text": str(args.file), "dhsa": None if dhsa is None else dhsa.as_dict(),
                            "kl_divergence": args.kl_divergence, "type_k": args.cache_type_k,
                            "type_v": args.cache_type_v, "threads": args.threads},
               "meta": collect_meta()}
        out = Path(args.json)
        tmp = out.with_name(out.name + ".tmp")  # renamed into place: a file there is always complete
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, out)
    return 0


def print_report(result: Dict[str, Optional[Dict[str, float]]], kld: bool, density: Optional[float] = None) -> None:
    """llama-perplexity's final lines, for all positions and for those that ran sparse (95% intervals)."""
    a = result["all"]
    print(f"Final estimate: PPL = {a['ppl']:.4f} +/- {a['ppl_ci95']:.4f} (95% CI, {a['positions']} positions)")
    if density is not None:
        print(f"DHSA density: {density:.4f} of the causal query-key pairs of the DHSA layers")
    if not kld:
        return
    rows = [("positions", "positions", "{:.0f}"), ("PPL", "ppl", "{:.4f}"), ("PPL (dense)", "ppl_dense", "{:.4f}"),
            ("Mean KLD", "kld_mean", "{:.6f}"), ("Median KLD", "kld_median", "{:.6f}"),
            ("99.0% KLD", "kld_p99", "{:.6f}"), ("Maximum KLD", "kld_max", "{:.6f}"),
            ("Same top token", "top1_agree", "{:.3%}")]
    cols = [("all positions", result["all"]), ("ran sparse", result["sparse"])]
    print(f"{'':<16}" + "".join(f"{name:>28}" for name, _ in cols))
    for label, key, fmt in rows:
        cells = []
        for _, stats in cols:
            if stats is None:
                cells.append("-")
                continue
            cell = fmt.format(stats[key])
            ci = stats.get(key + "_ci95")
            if ci is not None:
                cell += " +/- " + (f"{ci:.3%}" if key == "top1_agree" else fmt.format(ci))
            cells.append(cell)
        print(f"{label:<16}" + "".join(f"{c:>28}" for c in cells))


def add_arguments(p) -> None:
    from .cli import add_attention_mode_arguments, add_cache_type_arguments, add_model_arguments
    add_model_arguments(p)
    p.add_argument("-f", "--file", required=True, help="the text to score (UTF-8)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="window length in tokens (default 4096)")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="tokens per evaluation call; memory is about 2 x 4 x b x n_vocab bytes (default 512)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--chunks", type=int, default=0, help="score at most this many windows (default: all)")
    p.add_argument("--kl-divergence", action="store_true",
                   help="also run dense attention on the same tokens and report the KL divergence of the next-token "
                        "distributions (dense || tested) and top-token agreement")
    p.add_argument("--json", metavar="FILE",
                   help="write the result as JSON: kld_mean and top1_agree (positions that ran sparse), ppl (all), "
                        "density (computed / causal query-key pairs of the DHSA layers, null for dense), "
                        "'all' and 'sparse' (positions, ppl, ppl_ci95, ppl_dense, kld_mean, kld_mean_ci95, kld_median, "
                        "kld_p99, kld_max, top1_agree, top1_agree_ci95; null when no position ran sparse), settings, "
                        "meta (machine, versions)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_cache_type_arguments(p)
    add_attention_mode_arguments(p)
