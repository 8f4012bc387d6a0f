"""The engine's DHSA ops built for 64-bit ARM (ggml's NEON paths, our selection and kernel) under qemu-user,
against the NumPy reference, on the shapes of tests/test_op_dhsa.py.

tests/arm/run.sh cross-builds the engine and tests/arm/op_driver.c and runs this file with PYDHSA_ARM_BUILD
set; elsewhere every test is skipped with that reason. For each case the inputs are written to a file, the
aarch64 driver runs one pydhsa_op_attention under qemu-aarch64, and its ranges and output are compared here:
ranges identical to the reference's, outputs within the x86 op tests' tolerances.
"""
from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pydhsa import _native
from pydhsa import reference as R
from pydhsa.api import _fill_dhsa_params
from pydhsa.dhsa_params import DhsaConfig
from pydhsa.op import DENSE_NONE, MODES, _ggml_type, cache_bytes, cache_values, selection_ranges, selection_size
from test_op_dhsa import ATOL, CACHE_CASES, CASES, RTOL, SEED, random_inputs, reference_params

BUILD = Path(os.environ["PYDHSA_ARM_BUILD"]) if os.environ.get("PYDHSA_ARM_BUILD") else None
pytestmark = pytest.mark.skipif(BUILD is None or not (BUILD / "op_driver").exists(),
                                reason="needs the aarch64 build of tests/arm/run.sh (PYDHSA_ARM_BUILD)")
MAGIC = 0x44485341
SYSROOT = "/usr/aarch64-linux-gnu"


def run_on_arm(Q, K, V, cfg: DhsaConfig, q_pos0: int, tmp_path: Path, kv_type: str = None, n_threads: int = 2):
    """(out, selection ints) of one DHSA op computed by the aarch64 engine under qemu; K and V stored as a
    kv_type cache (default: their dtype)."""
    ffi = _native.ffi
    _native.load()
    params = ffi.new("pydhsa_dhsa_params *")
    _fill_dhsa_params(params, cfg)
    n_q, H, d = Q.shape
    n_kv, H_kv, _ = K.shape
    n_ints = selection_size(n_q, n_kv, H_kv, cfg)
    kv_type = kv_type or ("f16" if K.dtype == np.float16 else "f32")
    Kc, Vc = cache_bytes(K, kv_type).tobytes(), cache_bytes(V, kv_type).tobytes()
    request = tmp_path / "request.bin"
    with open(request, "wb") as f:
        raw = bytes(ffi.buffer(params))
        f.write(struct.pack("<ii", MAGIC, len(raw)) + raw)
        f.write(struct.pack("<10i", MODES["dhsa"], n_q, n_kv, H, H_kv, d, q_pos0, DENSE_NONE,
                            int(_ggml_type(kv_type)), n_threads))
        f.write(struct.pack("<ffqqq", 1 / np.sqrt(d), 0.0, n_ints, len(Kc), len(Vc)))
        f.write(np.ascontiguousarray(Q, np.float32).tobytes() + Kc + Vc)
    response = tmp_path / "response.bin"
    lib_dirs = sorted({str(p.parent) for p in BUILD.rglob("*.so")})
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(lib_dirs))
    res = subprocess.run(["qemu-aarch64", "-L", SYSROOT, str(BUILD / "op_driver"), str(request), str(response)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = response.read_bytes()
    status, = struct.unpack_from("<i", data, 0)
    message = data[4:260].split(b"\0")[0].decode()
    assert status == 0, message
    n_ranges, = struct.unpack_from("<q", data, 260)
    out = np.frombuffer(data, np.float32, n_q * H * d, 268).reshape(n_q, H, d)
    sel = np.frombuffer(data, np.int32, n_ranges, 268 + 4 * n_q * H * d)
    return out, sel


@pytest.mark.parametrize("shape, heads, d, budget, boundary, dtype", CASES,
                         ids=[f"q{s[0]}-kv{s[1]}-h{h[0]}x{h[1]}-d{d}-b{b}-{bd}-{np.dtype(t).name}"
                              for s, h, d, b, bd, t in CASES])
def test_arm_op_matches_reference(shape, heads, d, budget, boundary, dtype, tmp_path):
    rng = np.random.default_rng([SEED, *shape, *heads, d, int(budget * 100)])
    (n_q, n_kv), (n_head, n_head_kv) = shape, heads
    Q, K, V = random_inputs(rng, n_q, n_kv, n_head, n_head_kv, d, dtype)
    cfg = DhsaConfig(budget=budget, boundary=boundary, min_context=0)
    q_pos0 = n_kv - n_q
    out, sel = run_on_arm(Q, K, V, cfg, q_pos0, tmp_path)

    assert list(sel[:n_q]) == list(range(q_pos0, n_kv))
    expected_ranges = R.engine_select_ranges(Q, K.astype(np.float32), reference_params(cfg), q_pos0)
    if budget < 1.0:
        assert selection_ranges(sel, n_q, n_kv, n_head_kv, cfg) == expected_ranges, f"seed {SEED}"
    expected = R.sparse_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), expected_ranges,
                                  q_pos0, cfg.q_block, 1 / np.sqrt(d))
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")


@pytest.mark.parametrize("shape, heads, d, kv_type", CACHE_CASES,
                         ids=[f"q{s[0]}-kv{s[1]}-h{h[0]}x{h[1]}-d{d}-{t}" for s, h, d, t in CACHE_CASES])
def test_arm_cache_types_match_reference_on_cached_values(shape, heads, d, kv_type, tmp_path):
    """Qwen2.5's and Llama's head shapes on the f16, bf16 and q8_0 caches the kernel reads directly."""
    rng = np.random.default_rng([SEED, *shape, *heads, d, len(kv_type)])
    (n_q, n_kv), (n_head, n_head_kv) = shape, heads
    Q, K, V = random_inputs(rng, n_q, n_kv, n_head, n_head_kv, d, np.float32)
    cfg = DhsaConfig(budget=0.3, min_context=0)
    q_pos0 = n_kv - n_q
    out, sel = run_on_arm(Q, K, V, cfg, q_pos0, tmp_path, kv_type=kv_type)
    Kc, Vc = cache_values(K, kv_type), cache_values(V, kv_type)
    expected_ranges = R.engine_select_ranges(Q, Kc, reference_params(cfg), q_pos0)
    assert selection_ranges(sel, n_q, n_kv, n_head_kv, cfg) == expected_ranges, f"seed {SEED}"
    expected = R.sparse_attention(Q.astype(np.float64), Kc.astype(np.float64), Vc.astype(np.float64), expected_ranges,
                                  q_pos0, cfg.q_block, 1 / np.sqrt(d))
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")
