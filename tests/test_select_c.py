"""native/dhsa/dhsa-select.c must give IDENTICAL boundaries and range lists to pydhsa/reference.py.

The C file is compiled with cffi (API mode) into a temporary directory once per module. Inputs are
fresh random draws each run; the seed is printed so a failure can be replayed (DHSA_TEST_SEED=...).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pydhsa import reference as R

cffi = pytest.importorskip("cffi")

ROOT = Path(__file__).resolve().parents[1]
SRC_DIR = ROOT / "native" / "dhsa"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """Builds the C selection into a throwaway extension module and returns (ffi, lib)."""
    header = (SRC_DIR / "dhsa-select.h").read_text()
    cdef = re.search(r"/\* cffi:begin \*/(.*?)/\* cffi:end \*/", header, re.S).group(1)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source("_dhsa_select_test", '#include "dhsa-select.h"',
                   sources=[str(SRC_DIR / "dhsa-select.c")], include_dirs=[str(SRC_DIR)],
                   # FMA-capable target with contraction asked for, on purpose: fused multiply-adds must
                   # not leak into the scores (the source turns contraction off itself; without that,
                   # test_c_scores_bitwise fails on an FMA machine). -mtune=generic: some -mtune
                   # settings (e.g. znver) avoid FMA chains at -O2 and would hide the problem.
                   extra_compile_args=["-O2", "-std=c11"] + (
                       ["-march=native", "-mtune=generic", "-ffp-contract=fast"]
                       if platform.machine().lower() in ("x86_64", "amd64") else []))
    tmp = tmp_path_factory.mktemp("dhsa_select_build")
    so = ffi.compile(tmpdir=str(tmp), verbose=False)
    spec = importlib.util.spec_from_file_location("_dhsa_select_test", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


@pytest.fixture(scope="module")
def rng():
    seed = int(os.environ.get("DHSA_TEST_SEED", np.random.SeedSequence().entropy % (1 << 63)))
    print(f"\n[test_select_c] seed = {seed} (replay with DHSA_TEST_SEED={seed})", file=sys.stderr)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------
# C calling helpers
# ---------------------------------------------------------------------------------------------------

def _padded(X: np.ndarray, rng, pad: bool):
    """float32 buffer holding X [rows, heads, d], optionally with gaps between heads and rows so the
    strides differ from the dense ones (as for a ggml view). Returns (buffer, nb_row, nb_head)."""
    rows, heads, d = X.shape
    if not pad:
        buf = np.ascontiguousarray(X, np.float32)
        return buf, heads * d, d
    nb_head = d + int(rng.integers(1, 5))
    nb_row = heads * nb_head + int(rng.integers(0, 7))
    buf = np.full(rows * nb_row + 8, np.nan, np.float32)  # NaN in the gaps: reading one would show
    view = np.lib.stride_tricks.as_strided(buf, shape=X.shape, strides=(4 * nb_row, 4 * nb_head, 4))
    view[...] = X
    return buf, nb_row, nb_head


def _tensor(ffi, X, rng, pad, keep):
    buf, nb_row, nb_head = _padded(X, rng, pad)
    keep.append(buf)
    t = ffi.new("dhsa_tensor *")
    t.data = ffi.cast("float *", ffi.from_buffer(buf))
    t.n_rows, t.n_heads, t.d = X.shape
    t.nb_row, t.nb_head = nb_row, nb_head
    return t


def _params(ffi, lib, p: R.DhsaParams):
    c = ffi.new("dhsa_params *")
    lib.dhsa_params_default(c)
    c.budget = p.budget
    c.boundary = {"keysim": lib.DHSA_BOUNDARY_KEYSIM, "fixed": lib.DHSA_BOUNDARY_FIXED}[p.boundary]
    c.chunk_min, c.chunk_max, c.chunk_avg, c.window = p.chunk_min, p.chunk_max, p.chunk_avg, p.window
    c.q_block, c.sink_tokens, c.local_tokens = p.q_block, p.sink_tokens, p.local_tokens
    c.dense_from = lib.DHSA_DENSE_NONE if p.dense_from is None else p.dense_from
    return c


def c_select(ffi, lib, Q, K, p: R.DhsaParams, q_pos0, frozen=None, rng=None, pad=False, workspace=False):
    """Runs dhsa_select; returns (bounds list, ranges[block][kv head])."""
    keep = []
    n_q, H, d = Q.shape
    n_kv, H_kv, _ = K.shape
    tq, tk = _tensor(ffi, Q, rng, pad, keep), _tensor(ffi, K, rng, pad, keep)
    cp = _params(ffi, lib, p)
    fz = list(frozen or [])
    frozen_c = ffi.new("int32_t[]", fz) if fz else ffi.NULL
    bounds = ffi.new("int32_t[]", n_kv + 1)
    n_bounds = ffi.new("int32_t *")
    max_ranges = lib.dhsa_max_ranges(n_kv, n_kv)
    nb = lib.dhsa_n_blocks(n_q, p.q_block)
    slot = lib.dhsa_ranges_slot_size(max_ranges)
    ranges = np.full(nb * H_kv * slot, -7, np.int32)
    if workspace:
        size = lib.dhsa_select_workspace_size(n_kv, n_kv, n_q, H_kv, d, p.q_block)
        work = bytearray(size + 3)
        work_c = ffi.from_buffer(work)
        work_ptr, work_size = ffi.cast("char *", work_c) + 3, size  # deliberately misaligned
    else:
        work_ptr, work_size = ffi.NULL, 0
    st = lib.dhsa_select(cp, tq, tk, q_pos0, frozen_c, len(fz), bounds, n_kv + 1, n_bounds,
                         ffi.cast("int32_t *", ffi.from_buffer(ranges)), max_ranges, work_ptr, work_size)
    assert st == lib.DHSA_OK, f"dhsa_select returned {st}"
    out = []
    for b in range(nb):
        row = []
        for g in range(H_kv):
            s = ranges[(b * H_kv + g) * slot:(b * H_kv + g + 1) * slot]
            row.append([(int(s[1 + 2 * k]), int(s[2 + 2 * k])) for k in range(s[0])])
        out.append(row)
    return [bounds[i] for i in range(n_bounds[0])], out


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------

def _keys(rng, n_kv, H_kv, d, structured):
    """Random keys; `structured` adds a per-segment mean (content changes at segment borders) and a
    few exactly repeated stretches (exact score ties, to exercise the tie-breaking)."""
    K = rng.standard_normal((n_kv, H_kv, d)).astype(np.float32)
    if structured and n_kv > 8:
        edges = np.sort(rng.choice(np.arange(1, n_kv), size=min(n_kv // 40 + 1, n_kv - 1), replace=False))
        for s, e in zip(np.r_[0, edges], np.r_[edges, n_kv]):
            K[s:e] += 3.0 * rng.standard_normal((1, H_kv, d)).astype(np.float32)
        # A periodic stretch: identical windows give bit-identical keysim scores.
        per = K[:4].copy()
        s0 = n_kv // 3
        for j in range(s0, min(n_kv, s0 + 96), 4):
            K[j:j + 4] = per[:min(4, n_kv - j)]
    return K


# Each axis value appears at least once; combined with the budgets and boundaries below.
SHAPES = [  # (n_kv, n_q)
    (1, 1), (100, 1), (100, 7), (100, 64), (4099, 1), (4099, 7), (4099, 64), (4099, 513),
]
HEADS = [(4, 1), (8, 4), (8, 8)]
DIMS = [64, 128, 256]
BUDGETS = [0.05, 0.3, 1.0]
BOUNDARY = ["keysim", "fixed"]


def _cases():
    """Every (n_kv, n_q) x boundary x budget; heads, d and the other knobs rotate with different moduli
    so that each budget meets every head config, every d and both parameter sets over the grid."""
    cases = []
    for (si, (n_kv, n_q)), (bi, boundary), (ui, budget) in itertools.product(
            enumerate(SHAPES), enumerate(BOUNDARY), enumerate(BUDGETS)):
        H, H_kv = HEADS[(ui + si) % 3]
        d = DIMS[(ui + 2 * si + bi) % 3]
        flags = dict(small=(si + bi + ui) % 2 == 1,           # small chunks / blocks / sink / local
                     structured=(si + ui) % 2 == 0,            # segment means + exact ties in the keys
                     pad=(bi + ui + si // 2) % 2 == 1,         # non-dense strides
                     workspace=(si + 2 * ui) % 3 == 0,         # caller workspace instead of malloc
                     dense_tail=(si + ui + bi) % 4 == 3,
                     aligned=(2 * si + ui) % 5 == 0)           # queries correlated with the keys
        cases.append(pytest.param(n_kv, n_q, H, H_kv, d, boundary, budget, flags,
                                  id=f"kv{n_kv}-q{n_q}-{H}x{H_kv}-d{d}-{boundary}-b{budget}"))
    return cases


@pytest.mark.parametrize("n_kv,n_q,H,H_kv,d,boundary,budget,f", _cases())
def test_c_matches_reference(lib, rng, n_kv, n_q, H, H_kv, d, boundary, budget, f):
    ffi, clib = lib
    K = _keys(rng, n_kv, H_kv, d, structured=f["structured"])
    Q = rng.standard_normal((n_q, H, d)).astype(np.float32)
    if f["aligned"]:  # queries aligned with some keys, as in a real model: larger score gaps
        Q += K[n_kv - n_q:, np.arange(H) // (H // H_kv)] * 2
    q_pos0 = n_kv - n_q
    small = f["small"]  # so that selection is not only forced tokens on the shorter caches
    p = R.DhsaParams(budget=budget, boundary=boundary,
                     chunk_min=8 if small else 16, chunk_max=40 if small else 128, chunk_avg=16 if small else 32,
                     q_block=16 if small else 64, sink_tokens=4 if small else 128,
                     local_tokens=8 if small else 128,
                     dense_from=(n_kv - 40) if f["dense_tail"] else None)
    bounds_ref = R.boundaries(K, p)
    ranges_ref = R.select_ranges(Q, K, p, q_pos0)
    bounds_c, ranges_c = c_select(ffi, clib, Q, K, p, q_pos0, rng=rng, pad=f["pad"], workspace=f["workspace"])
    assert bounds_c == [int(b) for b in bounds_ref]
    assert ranges_c == ranges_ref


@pytest.mark.parametrize("boundary", BOUNDARY)
def test_c_frozen_prefix(lib, rng, boundary):
    """Chunk a prefix, freeze all but its open tail chunk, extend: C and reference agree, prefix kept."""
    ffi, clib = lib
    n_kv, n_q, H, H_kv, d = 1500, 200, 8, 4, 64
    K = _keys(rng, n_kv, H_kv, d, structured=True)
    Q = rng.standard_normal((n_q, H, d)).astype(np.float32)
    p = R.DhsaParams(budget=0.2, boundary=boundary, sink_tokens=32, local_tokens=64)
    first = R.boundaries(K[:1000], p)
    frozen = [int(b) for b in first[:-1]]  # b_N = 1000 is dropped: the tail chunk stays open
    if len(frozen) > 3:
        frozen = frozen[1:]  # the leading 0 is optional
    ref_b = R.boundaries(K, p, frozen)
    ref_r = R.select_ranges(Q, K, p, n_kv - n_q, frozen)
    c_b, c_r = c_select(ffi, clib, Q, K, p, n_kv - n_q, frozen=frozen, rng=rng)
    assert c_b == [int(b) for b in ref_b]
    assert c_r == ref_r
    assert c_b[:len(first) - 1] == [int(b) for b in first[:-1]]


def test_c_pieces_and_errors(lib, rng):
    """The separate entry points agree with the reference too, and bad input gives an error code."""
    ffi, clib = lib
    n_kv, n_q, H, H_kv, d = 300, 70, 8, 2, 64
    K = rng.standard_normal((n_kv, H_kv, d)).astype(np.float32)
    Q = rng.standard_normal((n_q, H, d)).astype(np.float32)
    keep = []
    tk, tq = _tensor(ffi, K, rng, True, keep), _tensor(ffi, Q, rng, True, keep)
    bounds = ffi.new("int32_t[]", n_kv + 1)
    nbo = ffi.new("int32_t *")
    assert clib.dhsa_keysim_boundaries(tk, 16, 128, 32, 4, ffi.NULL, 0, bounds, n_kv + 1, nbo, ffi.NULL, 0) == 0
    ref_b = R.keysim_boundaries(K, 16, 128, 32)
    assert [bounds[i] for i in range(nbo[0])] == list(ref_b)
    nc = nbo[0] - 1
    Kc = np.zeros((nc, H_kv, d), np.float32)
    assert clib.dhsa_chunk_reprs(tk, bounds, nc, ffi.cast("float *", ffi.from_buffer(Kc))) == 0
    assert np.array_equal(Kc, R.chunk_representations(K, ref_b))
    nb = clib.dhsa_n_blocks(n_q, 32)
    Qb = np.zeros((nb, H_kv, d), np.float32)
    assert clib.dhsa_query_block_reprs(tq, H_kv, 32, ffi.cast("float *", ffi.from_buffer(Qb))) == 0
    assert np.array_equal(Qb, R.query_block_representations(Q, 32, H_kv))
    # fixed
    assert clib.dhsa_fixed_boundaries(n_kv, 32, ffi.new("int32_t[]", [0, 5]), 2, bounds, n_kv + 1, nbo) == 0
    assert [bounds[i] for i in range(nbo[0])] == list(R.fixed_boundaries(n_kv, 32, [0, 5]))
    # errors, not aborts
    assert clib.dhsa_fixed_boundaries(n_kv, 0, ffi.NULL, 0, bounds, n_kv + 1, nbo) == clib.DHSA_ERR_ARGUMENT
    assert clib.dhsa_fixed_boundaries(n_kv, 32, ffi.new("int32_t[]", [0, 9, 9]), 3, bounds, n_kv + 1, nbo) \
        == clib.DHSA_ERR_ARGUMENT
    assert clib.dhsa_fixed_boundaries(n_kv, 32, ffi.NULL, 0, bounds, 3, nbo) == clib.DHSA_ERR_BUFFER
    assert clib.dhsa_keysim_boundaries(tk, 16, 8, 32, 4, ffi.NULL, 0, bounds, n_kv + 1, nbo, ffi.NULL, 0) \
        == clib.DHSA_ERR_ARGUMENT
    small = bytearray(16)
    assert clib.dhsa_keysim_boundaries(tk, 16, 128, 32, 4, ffi.NULL, 0, bounds, n_kv + 1, nbo,
                                       ffi.from_buffer(small), 16) == clib.DHSA_ERR_BUFFER
    cp = ffi.new("dhsa_params *")
    clib.dhsa_params_default(cp)
    cp.sink_tokens, cp.local_tokens, cp.budget = 0, 0, 0.5
    ranges = ffi.new("int32_t[]", nb * H_kv * clib.dhsa_ranges_slot_size(1))
    st = clib.dhsa_select(cp, tq, tk, n_kv - n_q, ffi.NULL, 0, bounds, n_kv + 1, nbo, ranges, 1, ffi.NULL, 0)
    assert st == clib.DHSA_ERR_BUFFER  # half the keys cannot be one range per block here
    cp.budget = 0.0
    assert clib.dhsa_select(cp, tq, tk, 0, ffi.NULL, 0, bounds, n_kv + 1, nbo, ranges, 1, ffi.NULL, 0) \
        == clib.DHSA_ERR_ARGUMENT
    cp.budget = 0.5
    assert clib.dhsa_select(cp, tq, tk, n_kv - n_q + 1, ffi.NULL, 0, bounds, n_kv + 1, nbo, ranges, 1,
                            ffi.NULL, 0) == clib.DHSA_ERR_ARGUMENT  # queries past the keys


@pytest.mark.parametrize("d", DIMS)
def test_c_scores_bitwise(lib, rng, d):
    """The float32 values that get ranked are bit-identical (this is what keeps the orders identical;
    it fails, e.g., if the C compiler fuses multiply-adds)."""
    ffi, clib = lib
    n_kv, H_kv, n_q, H = 777, 4, 150, 8
    K = (rng.standard_normal((n_kv, H_kv, d)) * rng.uniform(0.1, 30)).astype(np.float32)
    Q = rng.standard_normal((n_q, H, d)).astype(np.float32)
    keep = []
    tk = _tensor(ffi, K, rng, d != 128, keep)
    for w in (1, 4, 7):
        sc = np.zeros(n_kv - 1, np.float32)
        assert clib.dhsa_keysim_scores(tk, w, 1, n_kv, ffi.cast("float *", ffi.from_buffer(sc))) == 0
        assert np.array_equal(sc.view(np.uint32), R.keysim_scores(K, 1, n_kv, w).view(np.uint32))
    bounds = R.keysim_boundaries(K, 16, 128, 32)
    Kc = R.chunk_representations(K, bounds)
    Qb = R.query_block_representations(Q, 64, H_kv)
    S = np.zeros((Qb.shape[0], H_kv, Kc.shape[0]), np.float32)
    fp = lambda a: ffi.cast("float *", ffi.from_buffer(a))
    assert clib.dhsa_chunk_scores(fp(Qb), fp(Kc), Qb.shape[0], Kc.shape[0], H_kv, d, fp(S)) == 0
    assert np.array_equal(S.view(np.uint32), R.chunk_scores(Qb, Kc).view(np.uint32))


def test_c_fuzz(lib, rng):
    """Random parameters (chunk sizes, window, blocks, sink/local, budget, dense tail, frozen prefix,
    keys past the last query): still identical."""
    ffi, clib = lib
    for it in range(40):
        H_kv = int(rng.choice([1, 2, 4]))
        H = H_kv * int(rng.choice([1, 2, 4]))
        d = int(rng.choice([8, 16, 64]))
        n_kv = int(rng.integers(1, 1500))
        n_q = int(rng.integers(1, n_kv + 1))
        q_pos0 = int(rng.integers(0, n_kv - n_q + 1))
        cmin = int(rng.integers(1, 24))
        cmax = cmin * int(rng.integers(1, 6)) + int(rng.integers(0, 8))
        p = R.DhsaParams(budget=float(rng.uniform(0.01, 1.05)), boundary=str(rng.choice(BOUNDARY)),
                         chunk_min=cmin, chunk_max=cmax, chunk_avg=int(rng.integers(1, 80)),
                         window=int(rng.integers(1, 9)), q_block=int(rng.integers(1, 100)),
                         sink_tokens=int(rng.integers(0, 64)), local_tokens=int(rng.integers(0, 64)),
                         dense_from=int(rng.integers(-50, n_kv + 50)) if rng.random() < 0.3 else None)
        K = _keys(rng, n_kv, H_kv, d, structured=bool(rng.random() < 0.5))
        Q = rng.standard_normal((n_q, H, d)).astype(np.float32)
        frozen = None
        if rng.random() < 0.4 and n_kv > 2:
            frozen = sorted(set(rng.integers(1, n_kv, size=int(rng.integers(1, 6))).tolist()))
        ref_b = R.boundaries(K, p, frozen)
        ref_r = R.select_ranges(Q, K, p, q_pos0, frozen)
        c_b, c_r = c_select(ffi, clib, Q, K, p, q_pos0, frozen=frozen, rng=rng, pad=bool(it % 2),
                            workspace=bool(it % 3 == 0))
        assert c_b == [int(b) for b in ref_b], (it, p)
        assert c_r == ref_r, (it, p)
