"""The engine's DHSA ops against the NumPy reference, on fresh random inputs.

Selection must be identical to pydhsa.reference (same key ranges); outputs are compared with the
float64 reference evaluated on the same (f16-rounded) inputs, so the tolerance only has to cover the
kernel's float32 accumulation. Budget 1 must equal dense attention.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from pydhsa import reference as R
from pydhsa.dhsa_params import DhsaConfig
from pydhsa.op import run_attention

SEED = int(os.environ.get("DHSA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
# float32 accumulation over up to 4K keys of O(1) values, against float64: a few 1e-6 relative.
ATOL, RTOL = 2e-5, 1e-4

# (n_q, n_kv) pairs cover every query length (1, 7, 64, 513) and key length (1, 100, 4099); the other
# axes cycle so that each of their values meets several shapes.
SHAPES = [(1, 1), (1, 100), (7, 100), (64, 100), (1, 4099), (7, 4099), (64, 4099), (513, 4099)]
HEADS = [(4, 1), (8, 4), (8, 8)]
HEAD_DIMS = [64, 128, 256]
BUDGETS = [0.05, 0.3, 1.0]
BOUNDARIES = ["keysim", "fixed"]
DTYPES = [np.float16, np.float32]

CASES = []
for i, (shape, budget) in enumerate(itertools.product(SHAPES, BUDGETS)):
    heads = HEADS[i % 3]
    CASES.append((shape, heads, HEAD_DIMS[(i // 3) % 3], budget, BOUNDARIES[i % 2], DTYPES[(i // 2) % 2]))


def random_inputs(rng, n_q, n_kv, n_head, n_head_kv, d, dtype):
    Q = rng.standard_normal((n_q, n_head, d)).astype(np.float32)
    # Keys with a slowly drifting mean, so content-driven boundaries have something to find.
    drift = np.cumsum(rng.standard_normal((n_kv, n_head_kv, d)) * 0.1, axis=0)
    K = (rng.standard_normal((n_kv, n_head_kv, d)) + drift).astype(dtype)
    V = rng.standard_normal((n_kv, n_head_kv, d)).astype(dtype)
    return Q, K, V


def reference_params(cfg: DhsaConfig, dense_from=None) -> R.DhsaParams:
    return R.DhsaParams(budget=cfg.budget, boundary=cfg.boundary, chunk_min=cfg.chunk_min, chunk_max=cfg.chunk_max,
                        chunk_avg=cfg.chunk_avg, q_block=cfg.q_block, sink_tokens=cfg.sink_tokens,
                        local_tokens=cfg.local_tokens, dense_from=dense_from)


@pytest.mark.parametrize("shape, heads, d, budget, boundary, dtype", CASES,
                         ids=[f"q{s[0]}-kv{s[1]}-h{h[0]}x{h[1]}-d{d}-b{b}-{bd}-{np.dtype(t).name}"
                              for s, h, d, b, bd, t in CASES])
def test_op_matches_reference(shape, heads, d, budget, boundary, dtype):
    rng = np.random.default_rng([SEED, *shape, *heads, d, int(budget * 100)])
    (n_q, n_kv), (n_head, n_head_kv) = shape, heads
    Q, K, V = random_inputs(rng, n_q, n_kv, n_head, n_head_kv, d, dtype)
    cfg = DhsaConfig(budget=budget, boundary=boundary, min_context=0)
    q_pos0 = n_kv - n_q
    result = run_attention(Q, K, V, "dhsa", cfg, n_threads=2)

    K64, V64, Q64 = K.astype(np.float64), V.astype(np.float64), Q.astype(np.float64)
    expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg), q_pos0)
    assert result.sparse or budget >= 1.0
    assert list(result.positions) == list(range(q_pos0, n_kv))
    if budget < 1.0:
        assert result.ranges == expected_ranges, f"seed {SEED}"
    expected = R.sparse_attention(Q64, K64, V64, expected_ranges, q_pos0, cfg.q_block, 1 / np.sqrt(d))
    np.testing.assert_allclose(result.out, expected, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")
    if budget >= 1.0:
        dense = R.dense_attention(Q64, K64, V64, q_pos0, 1 / np.sqrt(d))
        np.testing.assert_allclose(result.out, dense, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")


# The shapes of the models beyond Gemma (Qwen2.5 0.5B: 14/2 heads, d 64; Llama: 32/8, d 128) on the
# cache types the kernel reads directly. The reference runs on the values the cache holds (q8_0 and bf16
# dequantised exactly as ggml does), so selection must still be identical and outputs as close as f16's.
CACHE_CASES = [((n_q, n_kv), heads, d, kv_type)
               for (n_q, n_kv), (heads, d) in zip([(7, 2053), (130, 3001), (1, 4099)], [((14, 2), 64), ((32, 8), 128),
                                                                                        ((14, 2), 64)])
               for kv_type in ("f16", "bf16", "q8_0")]


@pytest.mark.parametrize("shape, heads, d, kv_type", CACHE_CASES,
                         ids=[f"q{s[0]}-kv{s[1]}-h{h[0]}x{h[1]}-d{d}-{t}" for s, h, d, t in CACHE_CASES])
def test_cache_types_match_reference_on_cached_values(shape, heads, d, kv_type):
    from pydhsa.op import cache_values
    rng = np.random.default_rng([SEED, *shape, *heads, d, len(kv_type)])
    (n_q, n_kv), (n_head, n_head_kv) = shape, heads
    Q, K, V = random_inputs(rng, n_q, n_kv, n_head, n_head_kv, d, np.float32)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    q_pos0 = n_kv - n_q
    result = run_attention(Q, K, V, "dhsa", cfg, n_threads=2, kv_type=kv_type)
    Kc, Vc = cache_values(K, kv_type), cache_values(V, kv_type)
    if kv_type != "f16":
        assert np.abs(Kc - K).max() > 0  # the cache really rounds differently from f32
    expected_ranges = R.engine_select_ranges(Q, Kc, reference_params(cfg), q_pos0)
    assert result.sparse and result.ranges == expected_ranges, f"seed {SEED}"
    expected = R.sparse_attention(Q.astype(np.float64), Kc.astype(np.float64), Vc.astype(np.float64), expected_ranges,
                                  q_pos0, cfg.q_block, 1 / np.sqrt(d))
    np.testing.assert_allclose(result.out, expected, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")


def test_selection_does_not_depend_on_threads():
    rng = np.random.default_rng([SEED, 1])
    Q, K, V = random_inputs(rng, 200, 3000, 8, 2, 64, np.float16)
    cfg = DhsaConfig(budget=0.2, min_context=0)
    one, four = (run_attention(Q, K, V, "dhsa", cfg, n_threads=t) for t in (1, 4))
    assert one.ranges == four.ranges
    np.testing.assert_array_equal(one.out, four.out)


def test_softcap_and_dense_tail():
    rng = np.random.default_rng([SEED, 2])
    Q, K, V = random_inputs(rng, 130, 2500, 4, 1, 128, np.float16)
    Q *= 4.0  # large logits, so the soft cap matters
    cfg = DhsaConfig(budget=0.1, min_context=0)
    dense_from = 2500 - 40  # the last block holds a query at or past dense_from
    result = run_attention(Q, K, V, "dhsa", cfg, softcap=5.0, scale=0.125, dense_from=dense_from)
    params = reference_params(cfg, dense_from=dense_from)
    expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), params, 2500 - 130)
    assert result.ranges == expected_ranges
    assert result.ranges[-1][0] == [(0, 2500)]  # dense tail block
    assert result.ranges[0][0] != [(0, 2500 - 130 + 64)]  # earlier blocks stay sparse
    expected = R.sparse_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), expected_ranges,
                                  2500 - 130, cfg.q_block, 0.125, softcap=5.0)
    np.testing.assert_allclose(result.out, expected, atol=ATOL, rtol=RTOL)


def test_min_context_falls_back_to_dense_ranges():
    rng = np.random.default_rng([SEED, 3])
    Q, K, V = random_inputs(rng, 64, 1000, 4, 1, 64, np.float32)
    result = run_attention(Q, K, V, "dhsa", DhsaConfig(budget=0.1, min_context=2048))
    assert not result.sparse
    assert result.ranges == [[[(0, 1000)]]]
    dense = R.dense_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), 936, 1 / 8)
    np.testing.assert_allclose(result.out, dense, atol=ATOL, rtol=RTOL)


def test_budget_one_matches_upstream_flash_attention():
    rng = np.random.default_rng([SEED, 4])
    Q, K, V = random_inputs(rng, 64, 2100, 8, 4, 128, np.float16)
    ours = run_attention(Q, K, V, "dhsa", DhsaConfig(budget=1.0, min_context=0), n_threads=2)
    flash = run_attention(Q, K, V, "flash", n_threads=2)
    # Upstream's CPU flash attention rounds Q to f16 for its dot products: about 1e-3 of the output scale.
    np.testing.assert_allclose(ours.out, flash.out, atol=5e-3, rtol=5e-3)


def test_mask_route_equals_op_for_one_kv_head():
    """With one KV head the -inf mask expresses the selection exactly: both routes agree."""
    rng = np.random.default_rng([SEED, 5])
    Q, K, V = random_inputs(rng, 128, 3000, 4, 1, 64, np.float16)
    cfg = DhsaConfig(budget=0.2, min_context=0)
    ours = run_attention(Q, K, V, "dhsa", cfg, n_threads=2)
    masked = run_attention(Q, K, V, "mask", cfg, n_threads=2)
    assert ours.ranges == masked.ranges
    np.testing.assert_allclose(ours.out, masked.out, atol=5e-3, rtol=5e-3)
