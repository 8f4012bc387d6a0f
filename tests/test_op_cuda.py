"""The CUDA kernels of the DHSA ops against the NumPy reference and the CPU op, on fresh random inputs.

Runs only where the engine was built with -DGGML_CUDA=ON and sees a GPU (bench/cuda_device.sh builds it
and runs this file on the device machine); elsewhere every test is skipped with that reason.

- Selection: the range lists (and the row positions and sparse flag) must be identical to the CPU op's
  and to pydhsa.reference, bit for bit.
- Attention: f16 tensor-core products (Q and the softmax weights rounded to f16, f32 accumulation) against
  the float64 reference on the same f16 inputs: about 1e-3 relative, so the bound is a relative norm of
  5e-3 plus an element-wise 2e-2; budget 1 must equal dense attention and ggml's CUDA flash attention.
- Every output element is written: the op runner poisons the output with NaN before each run.
"""
from __future__ import annotations

import functools
import itertools
import os

import numpy as np
import pytest

from pydhsa import reference as R
from pydhsa.dhsa_params import DhsaConfig
from pydhsa.errors import PydhsaError
from pydhsa.op import gpu_count, run_attention
from test_op_dhsa import random_inputs, reference_params

# The CUDA kernels take llama.cpp's f16 K/V cache.
random_f16_inputs = functools.partial(random_inputs, dtype=np.float16)

pytestmark = pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA build of the engine and a GPU "
                                "(bench/cuda_device.sh runs these on a GPU machine)")

SEED = int(os.environ.get("DHSA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
REL_NORM, ATOL = 5e-3, 2e-2

SHAPES = [(1, 1), (1, 100), (7, 100), (64, 100), (1, 4099), (7, 4099), (64, 4099), (513, 4099)]
HEADS = [(4, 1), (8, 4), (8, 8), (16, 8)]
HEAD_DIMS = [64, 128, 256]
BUDGETS = [0.05, 0.3, 1.0]
BOUNDARIES = ["keysim", "fixed"]

CASES = []
for i, (shape, budget) in enumerate(itertools.product(SHAPES, BUDGETS)):
    CASES.append((shape, HEADS[i % 4], HEAD_DIMS[(i // 4) % 3], budget, BOUNDARIES[i % 2]))


def assert_close(got, expected, what=""):
    assert np.isfinite(got).all(), f"{what}: unwritten (NaN-poisoned) or non-finite outputs, seed {SEED}"
    rel = np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30)
    assert rel <= REL_NORM, f"{what}: relative error {rel:.3g}, seed {SEED}"
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"{what}: seed {SEED}")


@pytest.mark.parametrize("shape, heads, d, budget, boundary", CASES,
                         ids=[f"q{s[0]}-kv{s[1]}-h{h[0]}x{h[1]}-d{d}-b{b}-{bd}" for s, h, d, b, bd in CASES])
def test_cuda_op_matches_reference_and_cpu(shape, heads, d, budget, boundary):
    rng = np.random.default_rng([SEED, *shape, *heads, d, int(budget * 100)])
    (n_q, n_kv), (n_head, n_head_kv) = shape, heads
    Q, K, V = random_f16_inputs(rng, n_q, n_kv, n_head, n_head_kv, d)
    cfg = DhsaConfig(budget=budget, boundary=boundary, min_context=0)
    q_pos0 = n_kv - n_q
    gpu = run_attention(Q, K, V, "dhsa", cfg, device="cuda")
    cpu = run_attention(Q, K, V, "dhsa", cfg, n_threads=4)

    assert list(gpu.positions) == list(range(q_pos0, n_kv))
    assert gpu.sparse == cpu.sparse
    assert gpu.ranges == cpu.ranges, f"seed {SEED}"
    expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg), q_pos0)
    if budget < 1.0:
        assert gpu.ranges == expected_ranges, f"seed {SEED}"
    expected = R.sparse_attention(Q, K, V, expected_ranges, q_pos0, cfg.q_block, 1 / np.sqrt(d))
    assert_close(gpu.out, expected, "vs float64 reference")
    assert_close(gpu.out, cpu.out, "vs CPU op")


@pytest.mark.parametrize("n_kv", [32768, 131072])
def test_cuda_long_context_matches_cpu(n_kv):
    """The issue's long shapes: 32K and 128K keys, 8/4 heads, head size 128, a 512-query ubatch."""
    rng = np.random.default_rng([SEED, n_kv])
    Q, K, V = random_f16_inputs(rng, 512, n_kv, 8, 4, 128)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    gpu = run_attention(Q, K, V, "dhsa", cfg, device="cuda")
    cpu = run_attention(Q, K, V, "dhsa", cfg, n_threads=os.cpu_count() or 4)
    assert gpu.sparse and cpu.sparse
    assert gpu.ranges == cpu.ranges, f"seed {SEED}"
    if n_kv <= 32768:  # the NumPy selection oracle takes minutes at 128K; the CPU op is checked against it
        assert gpu.ranges == R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg), n_kv - 512)
    assert_close(gpu.out, cpu.out, f"n_kv {n_kv} vs CPU op")


def test_cuda_softcap_and_dense_tail():
    rng = np.random.default_rng([SEED, 2])
    Q, K, V = random_f16_inputs(rng, 130, 2500, 4, 1, 128)
    Q *= 4.0  # large logits, so the soft cap matters
    cfg = DhsaConfig(budget=0.1, min_context=0)
    dense_from = 2500 - 40
    gpu = run_attention(Q, K, V, "dhsa", cfg, softcap=5.0, scale=0.125, dense_from=dense_from, device="cuda")
    expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg, dense_from), 2500 - 130)
    assert gpu.ranges == expected_ranges
    assert gpu.ranges[-1][0] == [(0, 2500)]
    expected = R.sparse_attention(Q, K, V, expected_ranges, 2500 - 130, cfg.q_block, 0.125, softcap=5.0)
    assert_close(gpu.out, expected, "softcap")


def test_cuda_budget_one_matches_cuda_flash_attention():
    rng = np.random.default_rng([SEED, 4])
    Q, K, V = random_f16_inputs(rng, 64, 2100, 8, 4, 128)
    ours = run_attention(Q, K, V, "dhsa", DhsaConfig(budget=1.0, min_context=0), device="cuda")
    flash = run_attention(Q, K, V, "flash", device="cuda")
    assert_close(ours.out, flash.out, "budget 1 vs ggml CUDA flash attention")


def test_cuda_mask_route_equals_op_for_one_kv_head():
    rng = np.random.default_rng([SEED, 5])
    Q, K, V = random_f16_inputs(rng, 128, 3000, 4, 1, 64)
    cfg = DhsaConfig(budget=0.2, min_context=0)
    ours = run_attention(Q, K, V, "dhsa", cfg, device="cuda")
    masked = run_attention(Q, K, V, "mask", cfg, device="cuda")
    assert ours.ranges == masked.ranges
    assert_close(ours.out, masked.out, "mask route")


def test_cuda_refuses_f32_kv_cleanly():
    """The CUDA kernels take f16 K/V (llama.cpp's cache type); f32 is refused with a message, not an abort
    (in a model graph, the scheduler runs such a layer on the CPU instead)."""
    rng = np.random.default_rng([SEED, 6])
    Q, K, V = random_f16_inputs(rng, 8, 300, 4, 1, 64)
    with pytest.raises(PydhsaError, match="does not support"):
        run_attention(Q, K.astype(np.float32), V.astype(np.float32), "dhsa", DhsaConfig(min_context=0),
                      device="cuda")


@pytest.mark.parametrize("n_kv, heads, d", [(4099, (8, 4), 128), (32768, (4, 1), 256)])
def test_cuda_segment_cache_hits_give_the_same_selection(n_kv, heads, d):
    """Repeated runs on the same keys with the CUDA segment cache kept (the later runs take complete
    segments' cuts and chunk representations from the cache) select exactly what the CPU does."""
    rng = np.random.default_rng([SEED, 7, n_kv])
    Q, K, V = random_f16_inputs(rng, 300, n_kv, *heads, d)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    warm = run_attention(Q, K, V, "dhsa", cfg, device="cuda", n_repeat=3, warm_cache=True)
    cpu = run_attention(Q, K, V, "dhsa", cfg, n_threads=4)
    assert warm.ranges == cpu.ranges, f"seed {SEED}"
    assert_close(warm.out, cpu.out, "warm cache vs CPU op")


# Selection alone (head sizes the selection op takes: multiples of 16) on shapes that exercise the fused selection's tiling: Qb staged in several
# passes (q_block x G terms > 256), head sizes that are not a multiple of its 32-lane slices or of the chunk
# score batches, more than 8 query blocks (several score tiles, a partial last one), a cold cache and a
# warm one (n_repeat 3).
SELECT_CASES = [
    # (n_q, n_kv, heads, d, budget, boundary, warm_cache)
    (1000, 9000, (28, 4), 96, 0.3, "keysim", False),
    (77, 5000, (12, 4), 48, 0.1, "keysim", True),
    (2048, 6000, (16, 2), 64, 0.2, "fixed", True),
    (600, 20480, (8, 1), 208, 0.3, "keysim", True),
]


@pytest.mark.parametrize("n_q, n_kv, heads, d, budget, boundary, warm", SELECT_CASES,
                         ids=[f"q{c[0]}-kv{c[1]}-h{c[2][0]}x{c[2][1]}-d{c[3]}-b{c[4]}-{c[5]}{'-warm' * c[6]}"
                              for c in SELECT_CASES])
def test_cuda_selection_alone_matches_cpu(n_q, n_kv, heads, d, budget, boundary, warm):
    rng = np.random.default_rng([SEED, 9, n_q, n_kv, d])
    Q, K, V = random_f16_inputs(rng, n_q, n_kv, *heads, d)
    cfg = DhsaConfig(budget=budget, boundary=boundary, min_context=0)
    gpu = run_attention(Q, K, V, "select", cfg, device="cuda", n_repeat=3 if warm else 1, warm_cache=warm)
    cpu = run_attention(Q, K, V, "dhsa", cfg, n_threads=4)
    assert list(gpu.positions) == list(range(n_kv - n_q, n_kv))
    assert gpu.sparse and cpu.sparse
    assert gpu.ranges == cpu.ranges, f"seed {SEED}"


def test_cuda_dense_fallbacks_match_cpu():
    """Not sparse at run time: two sequences in one ubatch (non-consecutive positions) and too short a
    context (min_context); the dense slots and the flag come from the selection's last kernel."""
    rng = np.random.default_rng([SEED, 10])
    n_q, n_kv = 200, 3100
    Q, K, V = random_f16_inputs(rng, n_q, n_kv, 8, 4, 128)
    visible = np.zeros((n_q, n_kv), dtype=bool)
    for r in range(n_q):  # rows 0..99: keys [0, 2800 + r]; rows 100..199: a second sequence in cells >= 2950
        if r < 100:
            visible[r, : 2801 + r] = True
        else:
            visible[r, 2950: 2951 + r - 100] = True
    assert visible[99].nonzero()[0][-1] == 2899 and visible[100].nonzero()[0][-1] == 2950  # not consecutive
    cfg = DhsaConfig(budget=0.3, min_context=0)
    gpu = run_attention(Q, K, V, "dhsa", cfg, device="cuda", visible=visible)
    cpu = run_attention(Q, K, V, "dhsa", cfg, n_threads=4, visible=visible)
    assert not gpu.sparse and not cpu.sparse
    assert list(gpu.positions) == list(cpu.positions)
    assert gpu.ranges == cpu.ranges
    assert_close(gpu.out, cpu.out, "two sequences vs CPU op")
    short = DhsaConfig(budget=0.3, min_context=n_kv + 1)
    gpu = run_attention(Q, K, V, "dhsa", short, device="cuda")
    cpu = run_attention(Q, K, V, "dhsa", short, n_threads=4)
    assert not gpu.sparse and not cpu.sparse
    assert gpu.ranges == cpu.ranges
    assert_close(gpu.out, cpu.out, "min_context vs CPU op")


# The fattn route: upstream's sparse MMA flash attention fed with our index lists. Shapes cover every tile
# ggml picks on NVIDIA (ncols2 = 1, 2, 4, 8 from the GQA group and K/V padding), odd ubatches, a ubatch
# that is not at the end of the cache, and the head sizes 64/128/256.
FATTN_CASES = [
    # (n_q, n_kv, q_pos0 or None = at the end, heads, d, budget, boundary)
    (512, 4096, None, (8, 4), 128, 0.3, "keysim"),      # GQA 2 -> tile 32 x 2
    (513, 8192, None, (28, 4), 128, 0.1, "fixed"),      # GQA 7 (Qwen2-7B) -> tile 8 x 8, partial last tile
    (100, 4099, None, (4, 1), 256, 0.3, "keysim"),      # unpadded K/V -> no GQA tiles: 64 x 1
    (512, 8192, None, (16, 4), 64, 0.2, "keysim"),      # GQA 4 -> 16 x 4
    (256, 6144, 2000, (8, 1), 64, 0.3, "fixed"),        # GQA 8, the ubatch in the middle of the cache
    (512, 32768, None, (16, 8), 256, 0.1, "keysim"),
]


@pytest.mark.parametrize("n_q, n_kv, q_pos0, heads, d, budget, boundary", FATTN_CASES,
                         ids=[f"q{c[0]}-kv{c[1]}-h{c[3][0]}x{c[3][1]}-d{c[4]}-b{c[5]}" for c in FATTN_CASES])
def test_cuda_fattn_route_matches_reference_and_own_kernel(n_q, n_kv, q_pos0, heads, d, budget, boundary):
    rng = np.random.default_rng([SEED, n_q, n_kv, *heads, d])
    Q, K, V = random_f16_inputs(rng, n_q, n_kv, *heads, d)
    cfg = DhsaConfig(budget=budget, boundary=boundary, min_context=0)
    q_pos0 = n_kv - n_q if q_pos0 is None else q_pos0
    fattn = run_attention(Q, K, V, "dhsa-fattn", cfg, q_pos0=q_pos0, device="cuda")  # raises if not taken
    own = run_attention(Q, K, V, "dhsa-own", cfg, q_pos0=q_pos0, device="cuda")
    assert fattn.ranges == own.ranges
    if n_kv <= 8192:
        expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg), q_pos0)
        assert fattn.ranges == expected_ranges, f"seed {SEED}"
        expected = R.sparse_attention(Q, K, V, expected_ranges, q_pos0, cfg.q_block, 1 / np.sqrt(d))
        assert_close(fattn.out, expected, "fattn route vs float64 reference")
    assert_close(fattn.out, own.out, "fattn route vs our kernel")


def test_cuda_fattn_route_falls_back_when_a_list_overflows(monkeypatch):
    """Lists longer than the host's bound are cut and flagged on the GPU; our kernel then recomputes the
    node behind upstream's (PYDHSA_CUDA_FATTN_MAX_KEYS shrinks the bound to force that)."""
    rng = np.random.default_rng([SEED, 7])
    Q, K, V = random_f16_inputs(rng, 256, 4096, 8, 4, 128)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    own = run_attention(Q, K, V, "dhsa-own", cfg, device="cuda")
    monkeypatch.setenv("PYDHSA_CUDA_FATTN_MAX_KEYS", "300")
    cut = run_attention(Q, K, V, "dhsa-fattn", cfg, device="cuda")
    assert cut.ranges == own.ranges
    assert_close(cut.out, own.out, "overflowed lists, recomputed by our kernel")


def test_cuda_fattn_route_is_refused_where_it_does_not_apply():
    """Soft-capping (no such instance upstream) and a ubatch too short for the wide tile keep our kernel;
    the forced mode says so instead of silently running the other route."""
    rng = np.random.default_rng([SEED, 8])
    Q, K, V = random_f16_inputs(rng, 128, 4096, 8, 4, 128)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    with pytest.raises(PydhsaError, match="does not apply"):
        run_attention(Q, K, V, "dhsa-fattn", cfg, softcap=30.0, device="cuda")
    with pytest.raises(PydhsaError, match="does not apply"):
        run_attention(Q[:8], K, V, "dhsa-fattn", cfg, device="cuda")
    auto = run_attention(Q, K, V, "dhsa", cfg, softcap=30.0, device="cuda")  # auto: our kernel, no error
    own = run_attention(Q, K, V, "dhsa-own", cfg, softcap=30.0, device="cuda")
    assert_close(auto.out, own.out, "auto with soft-capping")
