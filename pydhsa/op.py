"""One attention layer through the engine's ggml ops on the CPU or a CUDA GPU (tests and benchmarks).

    out, ranges = run_attention(Q, K, V, mode="dhsa", config=DhsaConfig(budget=0.3))

Q: [n_q, H, d] float32; K, V: [n_kv, H_kv, d] float16 or float32, stored as given, or float32 stored in a
quantised or bfloat16 cache with kv_type="q8_0" / "bf16" (what the op then reads is cache_values(K, kv_type)).
mode: "dhsa" (our select + attn ops; on a GPU the attention runs through our kernel, or through upstream's
sparse flash attention fed with the selection when PYDHSA_CUDA_ATTN=fattn; "dhsa-own" / "dhsa-fattn" force
one, and "dhsa-fattn" raises when the configuration does not qualify),
"flash" (upstream ggml_flash_attn_ext, dense) or "mask" (our selection as a -inf mask for flash
attention: the route upstream takes for sparse attention) or "select" (the selection alone, for timing it;
the output is not written). Returns the output [n_q, H, d] float32 and,
for "dhsa"/"mask", the selection as ranges[block][kv_head] = [(start, end), ...] (the reference's format).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from . import _native
from .api import _check, _fill_dhsa_params
from .dhsa_params import DhsaConfig

MODES = {"dhsa": 0, "flash": 1, "mask": 2, "select": 3, "dhsa-own": 4, "dhsa-fattn": 5}
# K/V cache types the op runner stores (ggml's names); the values are ggml_type ids (gguf's enum).
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")
DENSE_NONE = 2**31 - 1
DHSA_SEGMENT = 512


@dataclass
class OpResult:
    out: np.ndarray
    ranges: Optional[List[List[List[Tuple[int, int]]]]]
    positions: Optional[np.ndarray]  # query row positions the op read from the mask
    sparse: Optional[bool]           # False when the op fell back to dense ranges
    elapsed_ms: float


def gpu_count() -> int:
    """GPUs the engine was built for and can see (0 for a CPU-only build)."""
    return int(_native.load().pydhsa_gpu_count())


def devices() -> List[str]:
    """The devices of every backend the engine was built with (ggml's registry: "CPU", "CUDA0", ...), by the
    names run_attention's `device` takes."""
    lib = _native.load()
    return [_native.ffi.string(lib.pydhsa_op_device_name(i)).decode() for i in range(lib.pydhsa_op_device_count())]


def max_ranges(n_kv: int, cfg: DhsaConfig) -> int:
    """ggml_dhsa_max_ranges (ggml-dhsa.c): the range capacity of one selection slot."""
    shortest = max(1, min(cfg.chunk_min, cfg.chunk_avg))
    chunks = n_kv // shortest + n_kv // DHSA_SEGMENT + 2
    return max(1, min(chunks + 2, (n_kv + 1) // 2))


def _ggml_type(kv_type: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[kv_type.upper()]


def cache_bytes(X: np.ndarray, kv_type: str) -> np.ndarray:
    """X [n, H_kv, d] as a ggml cache of kv_type stores it (ggml's row layout, quantised by the gguf
    package, whose q8_0 and bf16 encoders are ggml's reference ones)."""
    from gguf import quants
    if kv_type not in CACHE_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(CACHE_TYPES)}, got {kv_type!r}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if kv_type == "f32":
        return X
    if kv_type == "f16":
        return X.astype(np.float16)
    return np.ascontiguousarray(quants.quantize(X, _ggml_type(kv_type)))


def cache_values(X: np.ndarray, kv_type: str) -> np.ndarray:
    """The float32 values the op reads from a kv_type cache holding X: the reference runs on these."""
    from gguf import quants
    if kv_type in ("f32", "f16"):
        return cache_bytes(X, kv_type).astype(np.float32)
    return quants.dequantize(cache_bytes(X, kv_type), _ggml_type(kv_type)).reshape(X.shape).astype(np.float32)


def selection_size(n_q: int, n_kv: int, n_head_kv: int, cfg: DhsaConfig) -> int:
    """int32 entries of the engine's selection tensor (ggml-dhsa.h): positions, flag, one slot per block and KV head."""
    return n_q + 1 + (-(-n_q // cfg.q_block)) * n_head_kv * (1 + 2 * max_ranges(n_kv, cfg))


def selection_ranges(sel: np.ndarray, n_q: int, n_kv: int, n_head_kv: int, cfg: DhsaConfig) -> List:
    """The selection tensor's slots as ranges[block][kv_head] = [(start, end), ...] (the reference's format)."""
    slot = 1 + 2 * max_ranges(n_kv, cfg)
    ranges = []
    for b in range(-(-n_q // cfg.q_block)):
        per_head = []
        for g in range(n_head_kv):
            base = n_q + 1 + (b * n_head_kv + g) * slot
            count = int(sel[base])
            per_head.append([(int(sel[base + 1 + 2 * i]), int(sel[base + 2 + 2 * i])) for i in range(count)])
        ranges.append(per_head)
    return ranges


def run_attention(Q: np.ndarray, K: np.ndarray, V: np.ndarray, mode: str = "dhsa",
                  config: Optional[DhsaConfig] = None, q_pos0: Optional[int] = None, scale: Optional[float] = None,
                  softcap: float = 0.0, n_threads: int = 1, dense_from: Optional[int] = None,
                  device: str = "cpu", n_repeat: int = 1, warm_cache: bool = False,
                  kv_type: Optional[str] = None, visible: Optional[np.ndarray] = None) -> OpResult:
    """device: "cpu", "cuda", or a name devices() lists. n_repeat > 1: elapsed_ms is the median of that many
    runs after one warm-up. warm_cache: keep the selection caches of complete segments between those
    runs (a long prefill's or decode's steady state) instead of starting each run cold. kv_type: the
    cache type K and V are stored in (default: their dtype, f16 or f32). visible: a bool mask [n_q, n_kv] in
    place of the causal one (several sequences in one ubatch; q_pos0 is then unused)."""
    lib = _native.load()
    ffi = _native.ffi
    n_q, H, d = Q.shape
    n_kv, H_kv, dk = K.shape
    if K.shape != V.shape or dk != d or K.dtype != V.dtype or K.dtype not in (np.float16, np.float32):
        raise ValueError("K and V must have the same shape [n_kv, H_kv, d] and dtype float16 or float32")
    if kv_type is None:
        kv_type = "f16" if K.dtype == np.float16 else "f32"
    q_pos0 = n_kv - n_q if q_pos0 is None else q_pos0
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    cfg = config or DhsaConfig()
    Qc = np.ascontiguousarray(Q, dtype=np.float32)
    Kc, Vc = cache_bytes(K, kv_type), cache_bytes(V, kv_type)
    params = ffi.new("pydhsa_dhsa_params *")
    _fill_dhsa_params(params, cfg)
    out = np.empty((n_q, H, d), dtype=np.float32)
    n_ints = selection_size(n_q, n_kv, H_kv, cfg)
    sel = np.zeros(n_ints, dtype=np.int32)
    n_sel = ffi.new("int64_t *")
    elapsed = ffi.new("double *")
    err = ffi.new("pydhsa_error *")
    if visible is not None:
        if visible.shape != (n_q, n_kv):
            raise ValueError(f"visible must have shape (n_q, n_kv) = {(n_q, n_kv)}, got {visible.shape}")
        visible = np.ascontiguousarray(visible, dtype=np.uint8)
    status = lib.pydhsa_op_attention_masked(
        MODES[mode], params, DENSE_NONE if dense_from is None else int(dense_from),
        ffi.cast("const float *", Qc.ctypes.data), ffi.cast("const void *", Kc.ctypes.data),
        ffi.cast("const void *", Vc.ctypes.data), int(_ggml_type(kv_type)), n_q, n_kv, H, H_kv, d, q_pos0,
        ffi.NULL if visible is None else ffi.cast("const uint8_t *", visible.ctypes.data),
        float(scale), float(softcap), device.encode(), int(n_threads), int(n_repeat), bool(warm_cache),
        ffi.cast("float *", out.ctypes.data),
        ffi.cast("int32_t *", sel.ctypes.data), n_ints, n_sel, elapsed, err)
    _check(lib, status, err)
    if mode == "flash":
        return OpResult(out, None, None, None, elapsed[0])
    assert n_sel[0] == n_ints, (n_sel[0], n_ints)
    return OpResult(out, selection_ranges(sel, n_q, n_kv, H_kv, cfg), sel[:n_q].copy(), bool(sel[n_q]), elapsed[0])
