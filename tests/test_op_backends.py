"""The DHSA ops on every backend this build has, against the CPU backend (as ggml's test-backend-ops does
for upstream ops), on fresh random inputs.

The devices come from ggml's registry (pydhsa.op.devices()), so a build with another backend (CUDA today,
Metal when it exists) runs the same cases without a test of its own. Per case: the range lists identical to
the CPU op's, bit for bit (the selection is exact on every backend), and the outputs within f16 tensor-core
tolerance of the CPU's f32 attention (the bound of tests/test_op_cuda.py). Shapes: odd query and key counts,
a ubatch across a 512-key segment edge, GQA groups of 2, 4 and 7 (Qwen2.5 0.5B's 14/2 heads), head sizes 64,
128 and 256, soft-capping, budgets 0.1 and 0.3, and budget 1 (dense ranges through the kernel).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from pydhsa.dhsa_params import DhsaConfig
from pydhsa.op import devices, run_attention
from test_op_dhsa import random_inputs

SEED = int(os.environ.get("DHSA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
REL_NORM, ATOL = 5e-3, 2e-2
random_f16_inputs = functools.partial(random_inputs, dtype=np.float16)

# (n_q, n_kv, n_head, n_head_kv, d, budget, softcap)
CASES = [
    (7, 1031, 8, 4, 128, 0.3, 0.0),
    (64, 4099, 14, 2, 64, 0.1, 0.0),
    (100, 1536, 4, 1, 256, 0.3, 30.0),    # the ubatch starts at 1436: across the 1024-cell segment edge
    (513, 3000, 16, 8, 128, 0.3, 0.0),
    (33, 2048, 14, 2, 64, 1.0, 0.0),      # budget 1: every causal key through the DHSA kernel
]
OTHER_DEVICES = [name for name in devices() if name != "CPU"]


def test_the_registry_lists_the_cpu():
    assert "CPU" in devices()


@pytest.mark.skipif(not OTHER_DEVICES, reason="this build has no backend but the CPU (nothing to compare)")
@pytest.mark.parametrize("device", OTHER_DEVICES or ["none"])
@pytest.mark.parametrize("n_q, n_kv, n_head, n_head_kv, d, budget, softcap", CASES,
                         ids=[f"q{c[0]}-kv{c[1]}-h{c[2]}x{c[3]}-d{c[4]}-b{c[5]}-cap{c[6]:g}" for c in CASES])
def test_backend_matches_the_cpu(device, n_q, n_kv, n_head, n_head_kv, d, budget, softcap):
    rng = np.random.default_rng([SEED, n_q, n_kv, n_head, d])
    Q, K, V = random_f16_inputs(rng, n_q, n_kv, n_head, n_head_kv, d)
    cfg = DhsaConfig(budget=budget, min_context=0)
    cpu = run_attention(Q, K, V, "dhsa", cfg, softcap=softcap, n_threads=2)
    got = run_attention(Q, K, V, "dhsa", cfg, softcap=softcap, device=device)
    assert got.ranges == cpu.ranges, f"{device}: ranges differ from the CPU's, seed {SEED}"
    assert np.isfinite(got.out).all(), f"{device}: unwritten or non-finite outputs, seed {SEED}"
    rel = np.linalg.norm(got.out - cpu.out) / max(np.linalg.norm(cpu.out), 1e-30)
    assert rel <= REL_NORM, f"{device}: relative error {rel:.3g} against the CPU, seed {SEED}"
    np.testing.assert_allclose(got.out, cpu.out, atol=ATOL, rtol=0, err_msg=f"{device}: seed {SEED}")
