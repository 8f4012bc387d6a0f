"""Behaviour of the NumPy oracle pydhsa/reference.py (native/dhsa/ALGORITHM.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pydhsa import reference as R


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _qkv(rng, n_kv, n_q, H, H_kv, d):
    return _rand(rng, n_q, H, d), _rand(rng, n_kv, H_kv, d), _rand(rng, n_kv, H_kv, d)


def _check_bounds(b, n_kv):
    assert b[0] == 0 and b[-1] == n_kv
    assert np.all(np.diff(b) > 0)


def _check_ranges(ranges, n_q, q_pos0, q_block):
    """Sorted, disjoint, non-adjacent, non-empty, inside [0, pe+1) of each block."""
    for b, per_block in enumerate(ranges):
        pe = q_pos0 + min(n_q, (b + 1) * q_block) - 1
        for rs in per_block:
            assert rs, "a block always keeps at least its diagonal"
            for (s0, e0), (s1, _) in zip(rs, rs[1:]):
                assert e0 < s1
            assert all(0 <= s < e <= pe + 1 for s, e in rs)
            assert rs[-1][1] == pe + 1  # the diagonal is always kept


# ---------------------------------------------------------------------------------------------------
# budget = 1 is dense
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv,n_q,H,H_kv,d,boundary", [
    (37, 37, 4, 1, 16, "keysim"),
    (129, 65, 8, 4, 32, "fixed"),
    (301, 97, 8, 8, 24, "keysim"),
    (5, 1, 4, 1, 8, "keysim"),
    (200, 1, 8, 4, 16, "fixed"),
])
def test_budget_one_is_dense(n_kv, n_q, H, H_kv, d, boundary):
    rng = np.random.default_rng(n_kv * 7 + n_q)
    Q, K, V = _qkv(rng, n_kv, n_q, H, H_kv, d)
    p = R.DhsaParams(budget=1.0, boundary=boundary, q_block=16, sink_tokens=4, local_tokens=8)
    q0 = n_kv - n_q
    ranges = R.select_ranges(Q, K, p, q0)
    for b, per_block in enumerate(ranges):
        pe = q0 + min(n_q, (b + 1) * p.q_block) - 1
        assert per_block == [[(0, pe + 1)]] * H_kv
    scale = 1 / math.sqrt(d)
    np.testing.assert_allclose(R.sparse_attention(Q, K, V, ranges, q0, p.q_block, scale),
                               R.dense_attention(Q, K, V, q0, scale), rtol=0, atol=1e-12)
    assert R.attention_density(ranges, n_q, q0, p.q_block) == 1.0


def test_dense_attention_matches_direct_formula():
    rng = np.random.default_rng(1)
    Q, K, V = _qkv(rng, 20, 6, 8, 4, 8)
    O = R.dense_attention(Q, K, V, 14, 0.3)
    r, h = 4, 5  # query pos 18 sees keys 0..18; head 5 -> KV head 2
    s = 0.3 * K[:19, 2].astype(np.float64) @ Q[r, h].astype(np.float64)
    w = np.exp(s - s.max())
    np.testing.assert_allclose(O[r, h], w @ V[:19, 2] / w.sum(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# selection picks the right chunk
# ---------------------------------------------------------------------------------------------------

def _aligned_case(target, boundary="fixed", H=4, H_kv=1):
    """512 keys in 16 chunks of 32, each chunk along its own orthogonal direction; 64 queries at the
    end all along chunk `target`'s direction."""
    d = 32
    rng = np.random.default_rng(target)
    K = np.zeros((512, H_kv, d), np.float32)
    for c in range(16):
        K[c * 32:(c + 1) * 32, :, c] = 1.0
    K += _rand(rng, 512, H_kv, d, scale=0.01)
    Q = np.zeros((64, H, d), np.float32)
    Q[:, :, target] = 1.0
    Q += _rand(rng, 64, H, d, scale=0.01)
    # forced: sink 16 + local 32 + block 64 = 112 tokens; budget ceil(0.25*512) = 128: one more chunk.
    p = R.DhsaParams(budget=0.25, boundary=boundary, chunk_min=16, chunk_max=64, chunk_avg=32,
                     q_block=64, sink_tokens=16, local_tokens=32)
    return Q, K, p


@pytest.mark.parametrize("target", [1, 5, 9, 12])
@pytest.mark.parametrize("boundary", ["fixed", "keysim"])
def test_the_aligned_chunk_is_chosen(target, boundary):
    Q, K, p = _aligned_case(target, boundary)
    if boundary == "keysim":  # the content changes every 32 keys: keysim must find exactly those cuts
        assert list(R.keysim_boundaries(K, 16, 64, 32)) == list(range(0, 513, 32))
    ranges = R.select_ranges(Q, K, p, 448)
    if target == 12:  # chunk 12 = [384, 416) touches the local window [416, 512): merged
        assert ranges == [[[(0, 16), (384, 512)]]]
    else:
        assert ranges == [[[(0, 16), (target * 32, target * 32 + 32), (416, 512)]]]


def test_gqa_groups_select_independently():
    """KV head g is scored with the sum of its own G query heads (h // G == g) only."""
    d, H, H_kv = 32, 8, 2
    K = np.zeros((512, H_kv, d), np.float32)
    for c in range(16):
        K[c * 32:(c + 1) * 32, :, c] = 1.0
    Q = np.zeros((64, H, d), np.float32)
    Q[:, :4, 3] = 1.0   # heads 0..3 -> KV head 0 want chunk 3
    Q[:, 4:, 10] = 1.0  # heads 4..7 -> KV head 1 want chunk 10
    p = R.DhsaParams(budget=0.25, boundary="fixed", chunk_avg=32, sink_tokens=16, local_tokens=32)
    (per_head,) = R.select_ranges(Q, K, p, 448)
    assert per_head[0] == [(0, 16), (96, 128), (416, 512)]
    assert per_head[1] == [(0, 16), (320, 352), (416, 512)]


def test_sqrt_len_normalisation_and_block_sum():
    rng = np.random.default_rng(3)
    K = _rand(rng, 50, 2, 8)
    b = [0, 7, 30, 50]
    Kc = R.chunk_representations(K, b)
    for c in range(3):
        ref = math.sqrt(b[c + 1] - b[c]) * K[b[c]:b[c + 1]].astype(np.float64).mean(0)
        np.testing.assert_allclose(Kc[c], ref, rtol=1e-5, atol=1e-5)
    Q = _rand(rng, 70, 8, 8)
    Qb = R.query_block_representations(Q, 32, 2)
    assert Qb.shape == (3, 2, 8)
    for blk, (s, e) in enumerate([(0, 32), (32, 64), (64, 70)]):
        for g in range(2):
            ref = math.sqrt(e - s) * Q[s:e, 4 * g:4 * g + 4].astype(np.float64).mean(0).sum(0)
            np.testing.assert_allclose(Qb[blk, g], ref, rtol=1e-5, atol=1e-5)


def test_ties_break_by_lower_chunk_index():
    """All chunk scores equal (zero queries): the lowest non-forced chunks win."""
    K = np.ones((512, 1, 8), np.float32)
    Q = np.zeros((64, 4, 8), np.float32)
    p = R.DhsaParams(budget=0.25, boundary="fixed", chunk_avg=32, sink_tokens=16, local_tokens=32)
    # chunk 0 is half sink: its 16 new tokens bring 112 -> 128 = budget.
    assert R.select_ranges(Q, K, p, 448) == [[[(0, 32), (416, 512)]]]


# ---------------------------------------------------------------------------------------------------
# boundaries
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv", [1, 15, 16, 31, 33, 100, 1000, 2049])
@pytest.mark.parametrize("cfg", [(16, 128, 32), (8, 40, 16), (4, 8, 6), (16, 32, 64)])
def test_keysim_lengths_within_bounds_random(n_kv, cfg):
    cmin, cmax, cavg = cfg
    K = _rand(np.random.default_rng(n_kv), n_kv, 2, 16)
    b = R.keysim_boundaries(K, cmin, cmax, cavg)
    _check_bounds(b, n_kv)
    lens = np.diff(b)
    if n_kv < cmin:
        assert list(b) == [0, n_kv]
    else:
        assert lens.min() >= cmin and lens.max() <= cmax


def test_keysim_finds_distribution_changes():
    rng = np.random.default_rng(11)
    segs = [40, 70, 25, 90, 50, 33, 61, 120, 18, 45]
    n_kv, d, H_kv = sum(segs), 64, 2
    K = np.concatenate([3 * _rand(rng, 1, H_kv, d) + 0.3 * _rand(rng, s, H_kv, d) for s in segs])
    changes = set(np.cumsum(segs)[:-1].tolist())
    avg = round(n_kv / len(segs))  # asks for len(segs) - 1 cuts
    b = R.keysim_boundaries(K, 16, 128, avg)
    assert changes <= set(b.tolist())
    assert np.diff(b).min() >= 16 and np.diff(b).max() <= 128
    # The fixed grid misses them.
    assert not changes <= set(R.fixed_boundaries(n_kv, avg).tolist())


def test_long_chunk_split_evenly():
    # Constant keys: no cut scores above 0 (distance 0 everywhere, ties by position) but NMS still
    # places round(n/avg)-1 cuts; a short avg with a long max then a long avg checks the splitting.
    K = np.ones((300, 1, 4), np.float32)
    b = R.keysim_boundaries(K, 16, 64, 300)  # 0 cuts, then one 300-long chunk split in 5 pieces of 60
    assert list(b) == [0, 60, 120, 180, 240, 300]
    # All scores tie: round(300/32) - 1 = 8 cuts at the lowest allowed positions 16, 32, ..., 128,
    # then the 172-key tail [128, 300) is split in two at 128 + 172 // 2.
    b = R.keysim_boundaries(K, 16, 128, 32)
    assert list(b) == list(range(0, 129, 16)) + [214, 300]


def test_fixed_boundaries():
    assert list(R.fixed_boundaries(100, 32)) == [0, 32, 64, 96, 100]
    assert list(R.fixed_boundaries(64, 32)) == [0, 32, 64]
    assert list(R.fixed_boundaries(5, 32)) == [0, 5]
    assert list(R.fixed_boundaries(100, 32, frozen=[0, 10, 50])) == [0, 10, 50, 82, 100]
    assert list(R.fixed_boundaries(100, 32, frozen=[10, 100])) == [0, 10, 100]


@pytest.mark.parametrize("boundary", ["keysim", "fixed"])
def test_frozen_boundaries_kept(boundary):
    rng = np.random.default_rng(5)
    K = _rand(rng, 700, 2, 16)
    p = R.DhsaParams(boundary=boundary)
    # Arbitrary frozen cuts (even shorter than chunk_min) are kept verbatim; only the tail is chunked.
    b = R.boundaries(K, p, frozen=[0, 5, 200, 333])
    assert list(b[:4]) == [0, 5, 200, 333]
    _check_bounds(b, 700)
    tail = np.diff(b[3:])
    if boundary == "keysim":
        assert tail.min() >= 16 and tail.max() <= 128
    # Incremental chunking: chunk 500 keys, freeze all but the open tail chunk, add 200 keys.
    first = R.boundaries(K[:500], p)
    again = R.boundaries(K, p, frozen=first[:-1])
    assert list(again[:len(first) - 1]) == list(first[:-1])
    _check_bounds(again, 700)
    with pytest.raises(ValueError):
        R.boundaries(K, p, frozen=[0, 50, 40])
    with pytest.raises(ValueError):
        R.boundaries(K, p, frozen=[0, 800])


def test_keysim_scores_are_cosine_distances():
    rng = np.random.default_rng(8)
    K = _rand(rng, 40, 3, 16)
    sc = R.keysim_scores(K, 1, 40, 4)
    for t in (1, 2, 10, 37, 39):
        tot = 0.0
        for h in range(3):
            a = K[max(0, t - 4):t, h].astype(np.float64).mean(0)
            c = K[t:min(40, t + 4), h].astype(np.float64).mean(0)
            tot += 1 - a @ c / np.linalg.norm(a) / np.linalg.norm(c)
        assert abs(sc[t - 1] - tot) < 1e-5  # the sum over heads (= H_kv * mean) ranks like the mean


# ---------------------------------------------------------------------------------------------------
# causality, dense tail, density, soft-capping
# ---------------------------------------------------------------------------------------------------

def test_causal_exclusion():
    """Keys after a block's last query are never selected nor used, even if they score best."""
    rng = np.random.default_rng(9)
    d = 32
    n_kv, n_q, q0 = 600, 100, 300  # keys beyond the queries exist in the cache
    K = _rand(rng, n_kv, 1, d, scale=0.1)
    Q = _rand(rng, n_q, 4, d, scale=0.1)
    K[450:600, 0, 0] = 50.0  # future keys that every query would love
    Q[:, :, 0] = 5.0
    V = _rand(rng, n_kv, 1, d)
    V[400:] = np.nan  # reading any key after the last query position would poison the output
    p = R.DhsaParams(budget=0.1, boundary="fixed", chunk_avg=16, q_block=32, sink_tokens=8, local_tokens=16)
    ranges = R.select_ranges(Q, K, p, q0)
    _check_ranges(ranges, n_q, q0, p.q_block)
    O = R.sparse_attention(Q, K, V, ranges, q0, p.q_block, 0.2)
    assert np.isfinite(O).all()
    # Inside the diagonal, row p uses keys up to p only: compare with a dense run on the kept set.
    Od = R.dense_attention(Q, K, V, q0, 0.2)
    assert np.isfinite(Od).all()
    assert np.abs(O - Od).max() > 0  # sparse really dropped something


def test_dense_from():
    rng = np.random.default_rng(12)
    Q, K, V = _qkv(rng, 1000, 300, 4, 1, 16)
    q0 = 700
    p = R.DhsaParams(budget=0.1, q_block=64, sink_tokens=16, local_tokens=16, dense_from=1000 - 64)
    ranges = R.select_ranges(Q, K, p, q0)
    for b, per_block in enumerate(ranges):
        ps, pe = q0 + 64 * b, q0 + min(300, 64 * (b + 1)) - 1
        if pe >= p.dense_from:
            assert per_block == [[(0, pe + 1)]]
        else:
            assert per_block != [[(0, pe + 1)]]
    # Block 3 (queries 892..955) straddles dense_from = 936: dense as a whole.
    assert ranges[3] == [[(0, 956)]] and ranges[2] != [[(0, 892)]]
    # A negative dense_from (prompt shorter than dense_tail) makes every block dense.
    p2 = R.DhsaParams(budget=0.1, dense_from=-14)
    assert all(pb == [[(0, q0 + min(300, 64 * (b + 1)))]] for b, pb in
               enumerate(R.select_ranges(Q, K, p2, q0)))


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.3, 0.6, 0.9])
def test_density_between_budget_and_one(budget):
    rng = np.random.default_rng(int(budget * 100))
    n_kv, n_q = 3000, 300
    Q, K, _ = _qkv(rng, n_kv, n_q, 8, 2, 32)
    p = R.DhsaParams(budget=budget, sink_tokens=32, local_tokens=32)
    q0 = n_kv - n_q
    ranges = R.select_ranges(Q, K, p, q0)
    _check_ranges(ranges, n_q, q0, p.q_block)
    dens = R.attention_density(ranges, n_q, q0, p.q_block)
    # The budget holds per block (n_causal = pe + 1, checked below). Per row, the block's later
    # diagonal keys are causally masked: row pe - x keeps (kept - x) of (n_causal - x) keys, which is
    # a little less than kept / n_causal, so the pair density may fall short by < q_block / n_causal.
    assert budget - p.q_block / q0 <= dens <= 1.0
    # Whole chunks: a block overshoots its budget by less than one chunk (chunk_max keys).
    for b, per_block in enumerate(ranges):
        pe = q0 + min(n_q, (b + 1) * p.q_block) - 1
        for rs in per_block:
            kept = sum(e - s for s, e in rs)
            assert math.ceil(budget * (pe + 1)) <= kept < math.ceil(budget * (pe + 1)) + p.chunk_max


def test_budget_counts_forced_tokens():
    """When sink + local already exceed the budget, nothing else is taken."""
    rng = np.random.default_rng(2)
    Q, K, _ = _qkv(rng, 1000, 64, 4, 1, 16)
    p = R.DhsaParams(budget=0.05, sink_tokens=128, local_tokens=128)
    assert R.select_ranges(Q, K, p, 936) == [[[(0, 128), (808, 1000)]]]


def test_softcap():
    rng = np.random.default_rng(4)
    Q, K, V = _qkv(rng, 90, 30, 4, 2, 16)
    Q *= 4
    p = R.DhsaParams(budget=1.0, q_block=8)
    ranges = R.select_ranges(Q, K, p, 60)
    Os = R.sparse_attention(Q, K, V, ranges, 60, 8, 0.25, softcap=3.0)
    Od = R.dense_attention(Q, K, V, 60, 0.25, softcap=3.0)
    np.testing.assert_allclose(Os, Od, rtol=0, atol=1e-12)
    assert np.abs(Od - R.dense_attention(Q, K, V, 60, 0.25)).max() > 1e-3  # the cap matters here
    # ggml convention: s = softcap * tanh(scale * q.k / softcap)
    r, h = 3, 1
    s = 0.25 * K[:64, 0].astype(np.float64) @ Q[r, h].astype(np.float64)
    s = 3.0 * np.tanh(s / 3.0)
    w = np.exp(s - s.max())
    np.testing.assert_allclose(Od[r, h], w @ V[:64, 0] / w.sum(), rtol=1e-12)
    # and with a sparse selection the cap is applied the same way
    p2 = R.DhsaParams(budget=0.2, q_block=8, chunk_min=4, chunk_max=16, chunk_avg=8, sink_tokens=2,
                      local_tokens=4)
    r2 = R.select_ranges(Q, K, p2, 60)
    O2 = R.sparse_attention(Q, K, V, r2, 60, 8, 0.25, softcap=3.0)
    idx = np.concatenate([np.arange(a, min(e, 64)) for a, e in r2[0][0]])
    s = 3.0 * np.tanh(0.25 * K[idx, 0].astype(np.float64) @ Q[3, 1].astype(np.float64) / 3.0)
    w = np.exp(s - s.max())
    np.testing.assert_allclose(O2[3, 1], w @ V[idx, 0] / w.sum(), rtol=1e-12)


def test_sparse_is_exact_attention_on_the_kept_set():
    rng = np.random.default_rng(6)
    Q, K, V = _qkv(rng, 400, 100, 8, 4, 16)
    p = R.DhsaParams(budget=0.3, q_block=32, chunk_min=8, chunk_max=32, chunk_avg=16, sink_tokens=8,
                     local_tokens=16)
    q0 = 300
    ranges = R.select_ranges(Q, K, p, q0)
    O = R.sparse_attention(Q, K, V, ranges, q0, p.q_block, 0.25)
    for r, h in [(0, 0), (31, 7), (32, 3), (99, 5)]:
        pos = q0 + r
        idx = np.array([j for s, e in ranges[r // 32][h // 2] for j in range(s, e) if j <= pos])
        assert idx.max() == pos  # the diagonal is in
        s = 0.25 * K[idx, h // 2].astype(np.float64) @ Q[r, h].astype(np.float64)
        w = np.exp(s - s.max())
        np.testing.assert_allclose(O[r, h], w @ V[idx, h // 2] / w.sum(), rtol=1e-12)
