"""Several sequences in one ubatch (a server's parallel slots in a unified KV cache): the op tells them apart
by the mask and selects each on its own keys, as if it were alone in the cache from cell 0
(native/dhsa/ALGORITHM.md, "Several sequences in one ubatch").

Each case lays sequences out in cache cells, builds the mask llama.cpp would (a row sees its own
sequence's cells up to its own), and checks against the NumPy reference: the ranges of every query block
that lies inside one sequence equal the reference's selection for that sequence alone (shifted to its
cells), blocks shared by two sequences attend to every key they see, and every output row is attention
under the mask restricted to its block's ranges.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from pydhsa import reference as R
from pydhsa.dhsa_params import DhsaConfig
from pydhsa.op import run_attention
from test_op_dhsa import ATOL, RTOL, random_inputs, reference_params

SEED = int(os.environ.get("DHSA_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


@dataclass
class Seq:
    first_cell: int  # where the sequence's keys start in the cache
    n_keys: int      # its keys: cells [first_cell, first_cell + n_keys)
    n_rows: int      # its queries in the ubatch: its last n_rows cells


def layout(seqs):
    """Rows in ubatch order (the sequences one after the other), each row's cell, and the mask."""
    n_kv = max(s.first_cell + s.n_keys for s in seqs)
    cells, visible = [], []
    for s in seqs:
        for c in range(s.first_cell + s.n_keys - s.n_rows, s.first_cell + s.n_keys):
            row = np.zeros(n_kv, dtype=bool)
            row[s.first_cell:c + 1] = True
            cells.append(c)
            visible.append(row)
    return np.array(cells), np.array(visible), n_kv


def expected_ranges(seqs, Q, K, cfg):
    """Per query block: the reference's ranges of the one sequence holding the whole block, shifted to its
    cells, or every key up to the block's last cell when the block is shared (or its sequence is short)."""
    qb = cfg.q_block
    cells, _, _ = layout(seqs)
    n_q, n_blocks, H_kv = len(cells), -(-len(cells) // qb), K.shape[1]
    blocks = [None] * n_blocks
    row0 = 0
    for s in seqs:
        r0 = -(-row0 // qb) * qb                                               # first whole block
        r1 = row0 + s.n_rows if row0 + s.n_rows == n_q else (row0 + s.n_rows) // qb * qb
        if r1 > r0:
            n_eff = int(cells[r1 - 1]) + 1 - s.first_cell
            keys = K[s.first_cell:s.first_cell + n_eff].astype(np.float32)
            q_pos0 = int(cells[r0]) - s.first_cell
            if n_eff >= cfg.min_context:
                sel = R.engine_select_ranges(Q[r0:r1], keys, reference_params(cfg), q_pos0)
                sel = [[[(a + s.first_cell, b + s.first_cell) for a, b in head] for head in blk] for blk in sel]
            else:
                sel = [[[(s.first_cell, int(cells[min(r1, r0 + (i + 1) * qb) - 1]) + 1)]] * H_kv
                       for i in range(-(-(r1 - r0) // qb))]
            blocks[r0 // qb:r0 // qb + len(sel)] = sel
        row0 += s.n_rows
    for b in range(n_blocks):
        if blocks[b] is None:
            blocks[b] = [[(0, int(cells[b * qb:(b + 1) * qb].max()) + 1)]] * H_kv
    return blocks


def masked_attention(Q, K, V, visible, ranges, q_block, scale):
    """Row r, head h: softmax attention over the keys that are both visible and in its block's ranges."""
    n_q, H, d = Q.shape
    group = H // K.shape[1]
    out = np.zeros((n_q, H, d))
    for r in range(n_q):
        for h in range(H):
            chosen = np.zeros(K.shape[0], dtype=bool)
            for a, b in ranges[r // q_block][h // group]:
                chosen[a:b] = True
            idx = np.flatnonzero(chosen & visible[r])
            s = (K[idx, h // group] @ Q[r, h]) * scale
            w = np.exp(s - s.max())
            out[r, h] = (w / w.sum()) @ V[idx, h // group]
    return out


CASES = {
    # two fresh prompts prefilled together; the boundary falls inside a query block and a segment
    "two-prompts": ([Seq(0, 700, 700), Seq(700, 1500, 1500)], (8, 4), 64),
    # three prompts, Qwen2.5-shaped heads; the first ends on a block edge, the last is one row past one
    "three-prompts-gqa": ([Seq(0, 640, 640), Seq(640, 333, 333), Seq(973, 1089, 1089)], (14, 2), 64),
    # later ubatches of two sequences: each row sees keys that were cached before this ubatch
    "mid-cache": ([Seq(0, 1000, 100), Seq(1000, 1600, 300)], (4, 1), 128),
    # a short sequence next to a long one: the short one attends densely to its own cells only
    "short-beside-long": ([Seq(0, 2100, 2100), Seq(2100, 300, 300)], (8, 4), 64),
}


@pytest.mark.parametrize("boundary", ["keysim", "fixed"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_sequence_is_selected_alone(case, boundary):
    seqs, (n_head, n_head_kv), d = CASES[case]
    cells, visible, n_kv = layout(seqs)
    rng = np.random.default_rng([SEED, len(case), n_kv, d])
    _, K, V = random_inputs(rng, 1, n_kv, n_head, n_head_kv, d, np.float16)
    Q = rng.standard_normal((len(cells), n_head, d)).astype(np.float32)
    min_context = 1000 if case == "short-beside-long" else 0
    cfg = DhsaConfig(budget=0.2, boundary=boundary, min_context=min_context)
    result = run_attention(Q, K, V, "dhsa", cfg, n_threads=2, visible=visible)

    assert list(result.positions) == list(cells)
    assert result.sparse
    want = expected_ranges(seqs, Q, K, cfg)
    assert result.ranges == want, f"seed {SEED}"
    expected = masked_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), visible, want,
                                cfg.q_block, 1 / np.sqrt(d))
    np.testing.assert_allclose(result.out, expected, atol=ATOL, rtol=RTOL, err_msg=f"seed {SEED}")


def test_interleaved_cells_attend_densely_and_exactly():
    """Two sequences decoding in turn fill alternate cells: no row continues another's sequence in the next
    cell, so every block attends to everything under the mask - exact, not sparse."""
    n_kv, n_q = 1200, 96
    cells = np.arange(n_kv - n_q, n_kv)
    visible = np.zeros((n_q, n_kv), dtype=bool)
    for r, c in enumerate(cells):
        visible[r, c % 2:c + 1:2] = True  # the row's own parity: its sequence's cells
    rng = np.random.default_rng([SEED, 7])
    _, K, V = random_inputs(rng, 1, n_kv, 4, 2, 64, np.float16)
    Q = rng.standard_normal((n_q, 4, 64)).astype(np.float32)
    result = run_attention(Q, K, V, "dhsa", DhsaConfig(budget=0.1, min_context=0), n_threads=2, visible=visible)
    assert not result.sparse
    assert result.ranges == [[[(0, 1168)]] * 2, [[(0, 1200)]] * 2]
    expected = masked_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), visible,
                                result.ranges, 64, 1 / 8)
    np.testing.assert_allclose(result.out, expected, atol=ATOL, rtol=RTOL)


def test_one_sequence_from_cell_zero_is_unchanged():
    """The common case: one sequence from cell 0 gives the same ranges and output with the mask passed in
    as with the op's own causal mask."""
    rng = np.random.default_rng([SEED, 8])
    Q, K, V = random_inputs(rng, 300, 2500, 8, 2, 64, np.float16)
    cells, visible, _ = layout([Seq(0, 2500, 300)])
    cfg = DhsaConfig(budget=0.2, min_context=0)
    own = run_attention(Q, K, V, "dhsa", cfg, n_threads=2)
    given = run_attention(Q, K, V, "dhsa", cfg, n_threads=2, visible=visible)
    assert given.ranges == own.ranges and given.sparse
    np.testing.assert_array_equal(given.out, own.out)


def test_visible_must_match_the_shapes():
    Q, K, V = random_inputs(np.random.default_rng(0), 4, 10, 2, 1, 64, np.float16)
    with pytest.raises(ValueError, match="visible must have shape"):
        run_attention(Q, K, V, "dhsa", visible=np.ones((4, 9), dtype=bool))
