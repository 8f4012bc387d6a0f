"""NumPy oracle for DHSA (native/dhsa/ALGORITHM.md): one layer, one sequence.

Every backend (the C selection in native/dhsa/dhsa-select.c, the CUDA and Metal kernels) must compute
the function defined here; native/dhsa/ALGORITHM.md states the same rules as a contract.

Two kinds of arithmetic live in this file, on purpose:

* Selection (boundaries, chunk and query-block representations, chunk scores) is a discrete decision:
  a one-ulp difference in a score can swap two chunks and change which keys are attended. So these
  values are computed in float32 with exactly the operation order the C code uses (sums in index
  order, one rounding per multiply and per add, no fused multiply-add), and the C code and this file
  then produce identical boundaries and identical range lists, bit for bit. Every loop below that looks
  like it could be a single `np.sum` or `@` is written out because those reorder the additions
  (pairwise summation, BLAS blocking) and would break that identity.
* Attention itself (dense and sparse) is a numeric result compared within tolerances, so it is done in
  float64 to serve as the accurate reference.

Shapes: Q [n_q, H, d] (queries of the current ubatch), K, V [n_kv, H_kv, d] (the cache, post-RoPE).
Query head h belongs to KV head h // G, G = H // H_kv (ggml / llama.cpp GQA convention).
Queries sit at absolute key positions q_pos0 .. q_pos0 + n_q - 1; a query at position p sees keys 0..p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

F32 = np.float32

Range = Tuple[int, int]
RangeLists = List[List[List[Range]]]  # [block][kv head] -> sorted, disjoint [start, end) ranges


def _default(name: str):
    """The engine's default of a parameter (the table in native/dhsa/dhsa-params.c)."""
    from .dhsa_params import PARAMS_BY_NAME
    return PARAMS_BY_NAME[name].default


@dataclass(frozen=True)
class DhsaParams:
    budget: float = _default("budget")          # fraction of the causal keys a query block keeps; >= 1 dense
    boundary: str = _default("boundary")        # 'keysim' (content-driven) or 'fixed' (every chunk_avg keys)
    chunk_min: int = _default("chunk_min")
    chunk_max: int = _default("chunk_max")
    chunk_avg: int = _default("chunk_avg")
    q_block: int = _default("q_block")
    sink_tokens: int = _default("sink_tokens")
    local_tokens: int = _default("local_tokens")
    dense_tail: int = _default("dense_tail")    # informational here: the graph turns it into dense_from
    dense_from: Optional[int] = None  # blocks with a query at pos >= dense_from are dense; None: never
    window: int = 4              # keysim: keys on each side of a candidate cut (the engine's constant)


# ----------------------------------------------------------------------------------------------------
# Step 1: key chunking
# ----------------------------------------------------------------------------------------------------

def _region_start(n_kv: int, frozen: Optional[Sequence[int]]) -> List[int]:
    """Validate n_kv and the frozen boundaries and return them with the leading 0 included.

    Frozen boundaries come from earlier ubatches: keys already cut never move, so only the region
    after the last frozen boundary is (re)chunked. A leading 0 may be omitted by the caller.
    """
    if n_kv < 1:
        raise ValueError("n_kv must be >= 1")
    fz = [int(b) for b in (frozen if frozen is not None else [])]
    if not fz or fz[0] != 0:
        fz = [0] + fz
    for a, b in zip(fz, fz[1:]):
        if not a < b:
            raise ValueError(f"frozen boundaries must be strictly increasing: {fz}")
    if fz[-1] > n_kv:
        raise ValueError(f"frozen boundary {fz[-1]} beyond n_kv={n_kv}")
    return fz


def _split_long(bounds: List[int], chunk_max: int) -> List[int]:
    """Split every chunk longer than chunk_max into n = ceil(len/chunk_max) near-equal pieces.

    Piece k of a chunk [s, e) starts at s + floor(k*len/n): integer arithmetic, so every backend gets
    the same cuts, and piece lengths differ by at most one.
    """
    out = [bounds[0]]
    for s, e in zip(bounds, bounds[1:]):
        n = -(-(e - s) // chunk_max)
        for k in range(1, n + 1):
            out.append(s + (k * (e - s)) // n)
    return out


def _target_cuts(region_len: int, chunk_avg: int) -> int:
    """round(region_len / chunk_avg) - 1, rounding halves up, in integers (no float ambiguity)."""
    return max(0, (2 * region_len + chunk_avg) // (2 * chunk_avg) - 1)


def keysim_scores(K: np.ndarray, t0: int, t1: int, window: int = 4) -> np.ndarray:
    """Boundary scores of candidate cuts t in [t0, t1) (1 <= t0, t1 <= n_kv), float32.

    score(t) = sum over KV heads of (1 - cos(L_h, R_h)) where L_h is the sum of K[max(0,t-w) : t] and
    R_h the sum of K[t : min(n_kv, t+w)] for head h. The spec says "mean" and "averaged over heads":
    cosine ignores the positive 1/len factor and dividing by H_kv does not change the ranking, so the
    unnormalised forms are used (two fewer roundings for every backend to reproduce).

    Exact float32 order (the C code does the same):
      L[i] = ((0 + K[j0,h,i]) + K[j0+1,h,i]) + ...     keys in increasing position
      dot  = sum_i L[i]*R[i], nl = sum_i L[i]*L[i], nr = sum_i R[i]*R[i], i increasing, product rounded
      den  = sqrt(nl) * sqrt(nr);  dist = 1 - dot/den if den > 0 else 0 (a zero window: no evidence)
      score = ((0 + dist_0) + dist_1) + ...             heads in increasing order
    """
    K = np.asarray(K, dtype=F32)
    n_kv, H_kv, d = K.shape
    t = np.arange(t0, t1)
    n = len(t)
    L = np.zeros((n, H_kv, d), F32)
    R = np.zeros((n, H_kv, d), F32)
    # Left window, oldest key first. For offset o the key is t-w+o; it exists for a suffix of the t's,
    # and absent leading keys simply are not added (adding 0 first would give the same value anyway).
    for o in range(window):
        j = t - window + o
        ok = j >= 0
        L[ok] = L[ok] + K[j[ok]]
    # Right window, key t+o exists for a prefix of the t's.
    for o in range(window):
        j = t + o
        ok = j < n_kv
        R[ok] = R[ok] + K[j[ok]]
    dot = np.zeros((n, H_kv), F32)
    nl = np.zeros((n, H_kv), F32)
    nr = np.zeros((n, H_kv), F32)
    for i in range(d):
        li, ri = L[:, :, i], R[:, :, i]
        dot = dot + li * ri
        nl = nl + li * li
        nr = nr + ri * ri
    den = np.sqrt(nl) * np.sqrt(nr)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(den > 0, F32(1) - dot / np.where(den > 0, den, F32(1)), F32(0)).astype(F32)
    score = np.zeros(n, F32)
    for h in range(H_kv):
        score = score + dist[:, h]
    return score


def keysim_boundaries(K: np.ndarray, chunk_min: int, chunk_max: int, chunk_avg: int, window: int = 4,
                      frozen: Optional[Sequence[int]] = None) -> np.ndarray:
    """Training-free content boundaries (ALGORITHM.md step 1, `keysim`).

    Region = [r0, n_kv), r0 = last frozen boundary (0 if none). Within it:
      * candidates t, r0 < t < n_kv, ranked by (score descending, t ascending);
      * greedy NMS: accept t if |t - a| >= chunk_min for every accepted cut a and t - r0 >= chunk_min
        and n_kv - t >= chunk_min; stop after round(region_len / chunk_avg) - 1 cuts (or when the
        candidates run out);
      * finally split any chunk longer than chunk_max (see _split_long).
    A region shorter than chunk_min stays one chunk (no candidate can satisfy the NMS).
    Returns int64 boundaries b_0 = 0 < ... < b_Nc = n_kv (frozen ones first, unchanged).
    """
    _check_chunk_params(chunk_min, chunk_max, chunk_avg, window)
    K = np.asarray(K, dtype=F32)
    n_kv = K.shape[0]
    fz = _region_start(n_kv, frozen)
    r0 = fz[-1]
    if r0 == n_kv:
        return np.array(fz, dtype=np.int64)
    region_len = n_kv - r0
    want = _target_cuts(region_len, chunk_avg)
    cuts: List[int] = []
    # Only cuts at least chunk_min away from both region ends can ever be accepted; score just those
    # (the C code does the same; scoring the others would not change the result).
    lo, hi = r0 + chunk_min, n_kv - chunk_min + 1
    if want > 0 and lo < hi:
        cand = np.arange(lo, hi)
        score = keysim_scores(K, lo, hi, window)
        order = np.lexsort((cand, -score))  # primary: score descending; ties: position ascending
        for t in cand[order]:
            if len(cuts) == want:
                break
            if all(abs(int(t) - a) >= chunk_min for a in cuts):
                cuts.append(int(t))
    region = [r0] + sorted(cuts) + [n_kv]
    region = _split_long(region, chunk_max)
    return np.array(fz[:-1] + region, dtype=np.int64)


def fixed_boundaries(n_kv: int, chunk_avg: int, frozen: Optional[Sequence[int]] = None) -> np.ndarray:
    """Ablation baseline: cut every chunk_avg keys from the region start (last frozen boundary).

    Cuts are relative to the region start, not absolute multiples, so that re-chunking the open tail
    after each ubatch (with all earlier cuts frozen) gives the same cuts as chunking at once.
    The last chunk may be shorter than chunk_avg.
    """
    if chunk_avg < 1:
        raise ValueError("chunk_avg must be >= 1")
    fz = _region_start(n_kv, frozen)
    r0 = fz[-1]
    if r0 == n_kv:
        return np.array(fz, dtype=np.int64)
    region = list(range(r0, n_kv, chunk_avg)) + [n_kv]
    return np.array(fz[:-1] + region, dtype=np.int64)


def _check_chunk_params(chunk_min: int, chunk_max: int, chunk_avg: int, window: int) -> None:
    if not (1 <= chunk_min <= chunk_max and chunk_avg >= 1 and window >= 1):
        raise ValueError("need 1 <= chunk_min <= chunk_max, chunk_avg >= 1, window >= 1")


def boundaries(K: np.ndarray, params: DhsaParams, frozen: Optional[Sequence[int]] = None) -> np.ndarray:
    """Dispatch on params.boundary."""
    if params.boundary == "keysim":
        return keysim_boundaries(K, params.chunk_min, params.chunk_max, params.chunk_avg,
                                 params.window, frozen)
    if params.boundary == "fixed":
        return fixed_boundaries(np.asarray(K).shape[0], params.chunk_avg, frozen)
    raise ValueError(f"unknown boundary method {params.boundary!r}")


# ----------------------------------------------------------------------------------------------------
# Steps 2-3: chunk and query-block representations (float32, fixed order)
# ----------------------------------------------------------------------------------------------------

def chunk_representations(K: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """Kc[c] = sqrt(len_c) * mean_{j in c} K[j] = (sum_j K[j]) / sqrt(len_c), per KV head.

    The sqrt(len) factor keeps long and short chunks comparable (ALGORITHM.md step 2). float32:
    sum over the chunk's keys in increasing position starting from 0, then one division by
    sqrt(float(len)) (both correctly rounded, so backends agree). Returns [Nc, H_kv, d] float32.
    """
    K = np.asarray(K, dtype=F32)
    b = np.asarray(bounds, dtype=np.int64)
    starts, lens = b[:-1], np.diff(b)
    acc = np.zeros((len(starts),) + K.shape[1:], F32)
    # Vectorised across chunks, sequential along each chunk: step o adds key start+o to every chunk
    # that is longer than o.
    for o in range(int(lens.max(initial=0))):
        ok = lens > o
        acc[ok] = acc[ok] + K[starts[ok] + o]
    return acc / np.sqrt(lens.astype(F32))[:, None, None]


def query_block_representations(Q: np.ndarray, q_block: int, n_head_kv: int) -> np.ndarray:
    """Qb[b, g] = sum over the G query heads of KV head g of sqrt(len_b) * mean over block b of Q.

    Block b covers queries [b*q_block, min(n_q, (b+1)*q_block)) (aligned to the ubatch start). One
    vector per (block, KV head) so one selection serves a whole GQA group. float32 order: a single
    accumulator, queries of the block in increasing order (outer), the group's heads in increasing
    order (inner), then one division by sqrt(float(len_b)). Returns [Nb, H_kv, d] float32.
    """
    Q = np.asarray(Q, dtype=F32)
    n_q, H, d = Q.shape
    if n_head_kv < 1 or H % n_head_kv:
        raise ValueError(f"n_head={H} is not a multiple of n_head_kv={n_head_kv}")
    G = H // n_head_kv
    Qg = Q.reshape(n_q, n_head_kv, G, d)  # head h = kv*G + g
    nb = -(-n_q // q_block)
    lens = np.minimum(q_block, n_q - q_block * np.arange(nb))
    acc = np.zeros((nb, n_head_kv, d), F32)
    for r in range(min(q_block, n_q)):
        cnt = int(np.sum(lens > r))          # blocks that have a row r: a prefix of the blocks
        rows = np.arange(cnt) * q_block + r
        for g in range(G):
            acc[:cnt] = acc[:cnt] + Qg[rows, :, g, :]
    return acc / np.sqrt(lens.astype(F32))[:, None, None]


def chunk_scores(Qb: np.ndarray, Kc: np.ndarray) -> np.ndarray:
    """S[b, g, c] = Qb[b, g] . Kc[c, g], float32, products rounded then summed in increasing i."""
    Qb = np.asarray(Qb, dtype=F32)
    Kc = np.asarray(Kc, dtype=F32)
    nb, H_kv, d = Qb.shape
    S = np.zeros((nb, H_kv, Kc.shape[0]), F32)
    for i in range(d):
        S = S + Qb[:, :, i][:, :, None] * Kc[:, :, i].T[None, :, :]
    return S


# ----------------------------------------------------------------------------------------------------
# Steps 4-5: selection
# ----------------------------------------------------------------------------------------------------

def _runs(mask: np.ndarray) -> List[Range]:
    """Maximal runs of True in a boolean vector, as [start, end) pairs."""
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(m))
    return [(int(s), int(e)) for s, e in zip(edges[0::2], edges[1::2])]


def block_budget(budget: float, n_causal: int) -> int:
    """ceil(budget * n_causal) in double precision, clamped to n_causal."""
    return min(n_causal, math.ceil(float(budget) * n_causal))


def select_block(S_row: np.ndarray, bounds: np.ndarray, ps: int, pe: int, params: DhsaParams) -> List[Range]:
    """Key ranges for one (query block, KV head): queries at positions ps..pe, chunk scores S_row."""
    n_causal = pe + 1
    dense = params.budget >= 1.0 or (params.dense_from is not None and pe >= params.dense_from)
    if dense:
        return [(0, n_causal)]
    kept = np.zeros(n_causal, bool)
    kept[:min(params.sink_tokens, n_causal)] = True              # attention sink
    kept[max(0, ps - params.local_tokens):n_causal] = True       # local window + diagonal
    n_kept = int(kept.sum())                                     # forced tokens count in the budget
    want = block_budget(params.budget, n_causal)
    starts, ends = bounds[:-1], np.minimum(bounds[1:], n_causal)
    # Candidates: chunks that start inside the causal range and bring at least one unforced token.
    cand = [c for c in range(len(starts)) if starts[c] <= pe and not kept[starts[c]:ends[c]].all()]
    cand.sort(key=lambda c: (-float(S_row[c]), c))               # score desc, lower index first
    for c in cand:
        if n_kept >= want:
            break
        seg = kept[starts[c]:ends[c]]
        n_kept += int((~seg).sum())                              # only tokens not already kept
        seg[:] = True
    return _runs(kept)


def select_ranges_from_reprs(Qb: np.ndarray, Kc: np.ndarray, bounds: Sequence[int], n_q: int, q_pos0: int,
                             params: DhsaParams) -> RangeLists:
    """Selection given the representations (steps 4-5). Returns ranges[block][kv_head]."""
    if not (params.budget > 0 and params.q_block >= 1 and params.sink_tokens >= 0 and params.local_tokens >= 0):
        raise ValueError("need budget > 0, q_block >= 1, sink_tokens >= 0, local_tokens >= 0")
    bounds = np.asarray(bounds, dtype=np.int64)
    S = chunk_scores(Qb, Kc)
    nb = S.shape[0]
    out: RangeLists = []
    for b in range(nb):
        ps = q_pos0 + b * params.q_block
        pe = q_pos0 + min(n_q, (b + 1) * params.q_block) - 1
        out.append([select_block(S[b, g], bounds, ps, pe, params) for g in range(S.shape[1])])
    return out


def select_ranges(Q: np.ndarray, K: np.ndarray, params: DhsaParams, q_pos0: int,
                  frozen: Optional[Sequence[int]] = None) -> RangeLists:
    """Full selection for one layer: boundaries, representations, ranges[block][kv_head]."""
    n_q, H, d = np.shape(Q)
    n_kv, H_kv, _ = np.shape(K)
    if not (0 <= q_pos0 and q_pos0 + n_q <= n_kv):
        raise ValueError(f"queries at {q_pos0}..{q_pos0 + n_q - 1} need n_kv >= {q_pos0 + n_q}")
    bounds = boundaries(K, params, frozen)
    Kc = chunk_representations(K, bounds)
    Qb = query_block_representations(Q, params.q_block, H_kv)
    return select_ranges_from_reprs(Qb, Kc, bounds, n_q, q_pos0, params)


# The engine chunks the cache in aligned segments of this many cells (native/dhsa/ggml-dhsa.h): the
# boundaries of a complete segment never move as keys arrive, and the last segment is the open tail.
ENGINE_SEGMENT = 512


def segmented_boundaries(K: np.ndarray, params: DhsaParams, segment: int = ENGINE_SEGMENT) -> np.ndarray:
    """Boundaries as the engine computes them: each aligned segment is the region of one incremental
    chunking step, with every earlier boundary frozen (ALGORITHM.md, frozen prefix)."""
    n_kv = np.shape(K)[0]
    bounds: List[int] = [0]
    for seg1 in range(min(segment, n_kv), n_kv + segment, segment):
        seg1 = min(seg1, n_kv)
        bounds = [int(b) for b in boundaries(K[:seg1], params, frozen=bounds)]
        if seg1 == n_kv:
            break
    return np.asarray(bounds, dtype=np.int64)


def engine_select_ranges(Q: np.ndarray, K: np.ndarray, params: DhsaParams, q_pos0: int,
                         segment: int = ENGINE_SEGMENT) -> RangeLists:
    """The selection the engine's op makes for queries at q_pos0.. over the keys that exist when they
    are evaluated (cells up to the last query): segmented boundaries, then steps 2-5."""
    n_q, H, d = np.shape(Q)
    H_kv = np.shape(K)[1]
    K_eff = K[:q_pos0 + n_q]
    bounds = segmented_boundaries(K_eff, params, segment)
    Kc = chunk_representations(K_eff, bounds)
    Qb = query_block_representations(Q, params.q_block, H_kv)
    return select_ranges_from_reprs(Qb, Kc, bounds, n_q, q_pos0, params)


# ----------------------------------------------------------------------------------------------------
# Step 6: attention (float64 reference)
# ----------------------------------------------------------------------------------------------------

def _row_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, softcap: float) -> np.ndarray:
    """softmax(scores) @ v for one query row over the given keys, float64."""
    s = scale * (k @ q)
    if softcap > 0.0:
        s = softcap * np.tanh(s / softcap)   # ggml flash_attn_ext: cap applied after scaling
    s = s - s.max()
    p = np.exp(s)
    return (p @ v) / p.sum()


def sparse_attention(Q: np.ndarray, K: np.ndarray, V: np.ndarray, ranges: RangeLists, q_pos0: int,
                     q_block: int, scale: float, softcap: float = 0.0) -> np.ndarray:
    """Attention restricted per row to (ranges of its block and KV head) ∩ [0, pos]. O [n_q, H, d_v]."""
    Q = np.asarray(Q, np.float64)
    K = np.asarray(K, np.float64)
    V = np.asarray(V, np.float64)
    n_q, H, _ = Q.shape
    G = H // K.shape[1]
    O = np.zeros((n_q, H, V.shape[2]))
    for r in range(n_q):
        p = q_pos0 + r
        for h in range(H):
            g = h // G
            idx = np.concatenate([np.arange(s, min(e, p + 1)) for s, e in ranges[r // q_block][g]] +
                                 [np.zeros(0, np.int64)])
            O[r, h] = _row_attention(Q[r, h], K[idx, g], V[idx, g], scale, softcap)
    return O


def dense_attention(Q: np.ndarray, K: np.ndarray, V: np.ndarray, q_pos0: int, scale: float,
                    softcap: float = 0.0) -> np.ndarray:
    """Causal dense attention (query at pos p sees keys 0..p), float64. O [n_q, H, d_v].
    Sparse attention with every key selected: one block whose range covers all keys (rows clip causally)."""
    n_q, n_head_kv = np.shape(Q)[0], np.shape(K)[1]
    everything = [[[(0, q_pos0 + n_q)] for _ in range(n_head_kv)]]
    return sparse_attention(Q, K, V, everything, q_pos0, max(n_q, 1), scale, softcap)


def attention_density(ranges: RangeLists, n_q: int, q_pos0: int, q_block: int) -> float:
    """Computed query-key pairs / causal pairs, over all rows and KV heads (a GQA group shares its
    ranges, so counting per KV head or per query head gives the same ratio)."""
    done = causal = 0
    for r in range(n_q):
        p = q_pos0 + r
        for per_head in ranges[r // q_block]:
            done += sum(max(0, min(e, p + 1) - s) for s, e in per_head)
            causal += p + 1
    return done / causal
