// CPU kernels of the DHSA ops (compiled into ggml-cpu; hooked into its dispatch by our patch series).
//
// select: row positions from the mask, key chunk boundaries (per aligned segment, keysim or fixed),
//         chunk and query-block representations, and per (query block, KV head) key-range lists, all
//         computed by dhsa-select.c so that they are bit-identical to pydhsa/reference.py.
// attn:   block-sparse flash attention over those ranges: online softmax in f32, f16 K/V converted one
//         tile at a time and reused by every query row and every query head of the GQA group.
//
// Threads: ggml calls each forward with (ith, nth); phases of the selection are separated by
// ggml_barrier, and the attention splits (query block, KV head) work items across threads.

#include "ggml-cpu-dhsa.h"

#include "dhsa-runtime-params.h"
#include "dhsa-select.h"
#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-dhsa.h"
#include "simd-gemm.h"
#include "vec.h"

#include <algorithm>
#include <unordered_map>
#include <vector>
#include <cmath>
#include <cstring>

namespace {

constexpr int64_t kTile = 64;  // keys per K/V tile in the attention kernel (as upstream GGML_FA_TILE_KV)
constexpr size_t  kAlign = 64;

// Sequences of one ubatch that are selected sparsely (a server's parallel slots); rows of further
// sequences attend densely under the mask.
constexpr int64_t kMaxRuns = 16;

// Query rows [r0, r1) of one sequence, in consecutive cells, whose keys are the cells [base, base + n_eff):
// the selection runs on them as if the sequence were alone in the cache from cell 0 (ALGORITHM.md,
// "Several sequences in one ubatch"). [r0, r1) is whole query blocks of the ubatch, so that each block's
// ranges belong to one sequence; rows of blocks shared with another sequence attend densely.
struct seq_run {
    int64_t r0, r1;
    int32_t base, n_eff;
    int32_t last_pos;          // the position of the sequence's last row in the ubatch, from base
    int64_t seg_first, n_seg;  // its segments in the per-segment arrays of the selection's workspace
    bool    sparse;            // to be selected: enough keys (min_context) and room in the workspace
};

size_t align_up(size_t n) {
    return (n + kAlign - 1) & ~(kAlign - 1);
}

// Geometry shared by the selection forward and its work-size estimate.
struct select_geometry {
    int64_t n_q, n_kv, n_head_kv, d, n_blocks, n_seg, seg_chunks, max_chunks, max_ranges, slot_size;
    size_t  seg_rows;  // keys converted per segment: the segment and the keysim window before it

    explicit select_geometry(const ggml_tensor * node) {
        const dhsa_op_params op = dhsa_read_op_params(node);
        const ggml_tensor * q   = node->src[0];
        const ggml_tensor * k   = node->src[1];
        n_q        = q->ne[1];
        n_kv       = k->ne[1];
        n_head_kv  = k->ne[2];
        d          = k->ne[0];
        n_blocks   = (n_q + op.q_block - 1) / op.q_block;
        // A sequence that starts at a cell which is not a multiple of DHSA_SEGMENT has one segment more
        // than its keys fill, so each of up to kMaxRuns sequences may add one.
        n_seg      = (n_kv + DHSA_SEGMENT - 1) / DHSA_SEGMENT + kMaxRuns;
        seg_chunks = DHSA_SEGMENT / std::max<int32_t>(1, std::min(op.chunk_min, op.chunk_avg)) + 3;
        max_chunks = n_seg * seg_chunks;  // Kc is filled segment by segment, then compacted per sequence
        max_ranges = ggml_dhsa_max_ranges(n_kv, op.chunk_min, op.chunk_avg);
        slot_size  = 1 + 2 * max_ranges;
        seg_rows   = (size_t) DHSA_SEGMENT + (size_t) std::max<int32_t>(op.window, 0);
    }

    // shared: per-segment bounds, all bounds, Kc, Qb, selection scratch; then per thread: f32 keys of a
    // segment and the keysim scratch.
    size_t seg_bounds_ints() const { return (size_t) DHSA_SEGMENT + 2; }
    size_t shared_bytes() const {
        return align_up(sizeof(int32_t) * seg_bounds_ints() * n_seg) + align_up(sizeof(int32_t) * (n_kv + 2)) +
               align_up(sizeof(float) * max_chunks * n_head_kv * d) + align_up(sizeof(float) * n_blocks * n_head_kv * d) +
               align_up(dhsa_select_ranges_workspace_size((int32_t) max_chunks) + kAlign) +
               align_up(sizeof(seq_run) * kMaxRuns + sizeof(int64_t));
    }
    size_t thread_bytes() const {
        return align_up(sizeof(float) * seg_rows * n_head_kv * d) +
               align_up(dhsa_keysim_workspace_size((int32_t) seg_rows, (int32_t) d) + kAlign);
    }
};

// Last unmasked key of mask row r, -1 when the row sees nothing.
int32_t row_position(const ggml_tensor * mask, int64_t r, int64_t n_kv) {
    const ggml_fp16_t * row = (const ggml_fp16_t *) ((const char *) mask->data + r * mask->nb[1]);
    for (int64_t j = n_kv - 1; j >= 0; j--) {
        if (GGML_CPU_FP16_TO_FP32(row[j]) != -INFINITY) {
            return (int32_t) j;
        }
    }
    return -1;
}

bool cell_visible(const ggml_tensor * mask, int64_t r, int64_t j) {
    const ggml_fp16_t * row = (const ggml_fp16_t *) ((const char *) mask->data + r * mask->nb[1]);
    return GGML_CPU_FP16_TO_FP32(row[j]) != -INFINITY;
}

// First unmasked key of mask row r (the first cell of the row's sequence in a layer without a window),
// -1 when the row sees nothing.
int32_t row_first_visible(const ggml_tensor * mask, int64_t r, int64_t n_kv) {
    for (int64_t j = 0; j < n_kv; j++) {
        if (cell_visible(mask, r, j)) {
            return (int32_t) j;
        }
    }
    return -1;
}

// One row of n cache values as f32, for every K/V type the op accepts (ggml_dhsa_supports_kv_type):
// ggml-cpu's SIMD conversions for f16 and bf16, ggml's own dequantisation for q8_0. Selection and
// attention both read keys through here, so a quantised cache is seen exactly as ggml dequantises it.
void row_to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    switch (type) {
        case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, dst, n); break;
        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, dst, n); break;
        case GGML_TYPE_F32:  memcpy(dst, src, sizeof(float) * n); break;
        default:             ggml_get_type_traits(type)->to_float(src, dst, n); break;
    }
}

// Keys [row0, row1) of every KV head as f32 rows [row][head][d].
dhsa_tensor key_rows_f32(const ggml_tensor * k, int64_t row0, int64_t row1, float * buf) {
    const int64_t d = k->ne[0], n_head_kv = k->ne[2];
    for (int64_t j = row0; j < row1; j++) {
        for (int64_t h = 0; h < n_head_kv; h++) {
            row_to_f32(k->type, (const char *) k->data + j * k->nb[1] + h * k->nb[2], buf + ((j - row0) * n_head_kv + h) * d, d);
        }
    }
    return dhsa_tensor{ buf, (int32_t) (row1 - row0), (int32_t) n_head_kv, (int32_t) d, n_head_kv * d, d };
}

// Chunk boundaries of one aligned segment [seg0, seg1): the keys before seg0 are frozen (they only feed
// the keysim window), as ALGORITHM.md's frozen-prefix rule, so the result equals the reference's
// incremental chunking segment by segment. Writes count + cuts in (seg0, seg1] to out.
bool segment_bounds(const dhsa_params & p, const ggml_tensor * k, int64_t seg0, int64_t seg1, float * keys,
                    void * work, size_t work_size, int32_t * out) {
    const int64_t base   = p.boundary == DHSA_BOUNDARY_KEYSIM ? std::max<int64_t>(0, seg0 - p.window) : seg0;
    const int32_t frozen = (int32_t) (seg0 - base);
    int32_t       n_bounds = 0;
    int32_t *     bounds   = out + 1;
    dhsa_status   st;
    if (p.boundary == DHSA_BOUNDARY_KEYSIM) {
        const dhsa_tensor K = key_rows_f32(k, base, seg1, keys);
        st = dhsa_boundaries(&p, &K, frozen > 0 ? &frozen : nullptr, frozen > 0 ? 1 : 0, bounds,
                             (int32_t) (seg1 - base + 1), &n_bounds, work, work_size);
    } else {
        st = dhsa_fixed_boundaries((int32_t) (seg1 - base), p.chunk_avg, nullptr, 0, bounds,
                                   (int32_t) (seg1 - base + 1), &n_bounds);
    }
    if (st != DHSA_OK) {
        return false;
    }
    int32_t n = 0;
    for (int32_t i = 0; i < n_bounds; i++) {
        if (bounds[i] > frozen) {
            bounds[n++] = bounds[i] + (int32_t) base;
        }
    }
    out[0] = n;
    return true;
}

// Dense slots for blocks [b0, b1) and every KV head: the block's keys from cell `first` on, masked per
// row by the kernel (first > 0: a sequence stored from that cell).
void write_dense_slots(const select_geometry & g, const int32_t * pos, int32_t q_block, int32_t * slots, int64_t b0,
                       int64_t b1, int32_t first) {
    for (int64_t b = b0; b < b1; b++) {
        int32_t pe = -1;
        for (int64_t r = b * q_block; r < std::min<int64_t>(g.n_q, (b + 1) * q_block); r++) {
            pe = std::max(pe, pos[r]);
        }
        for (int64_t h = 0; h < g.n_head_kv; h++) {
            int32_t * slot = slots + (b * g.n_head_kv + h) * g.slot_size;
            slot[0]        = pe >= first ? 1 : 0;
            slot[1]        = first;
            slot[2]        = pe + 1;
        }
    }
}

// What a complete segment's selection inputs were computed from, and the results: a segment's keys
// never change while its cells hold the same tokens, so its cuts and chunk representations are reused
// by later calls (decode reads only the open tail and the chunk summaries, not every cached key).
struct segment_entry {
    uint64_t fingerprint = 0;
    bool valid = false;
    std::vector<int32_t> cuts;  // boundaries in (seg0, seg1]
    std::vector<float> kc;      // [chunk][head][d]
};

// Entries per layer by the cell a segment starts at: a sequence stored from cell `base` has its segments
// at base, base + DHSA_SEGMENT, ... (the fingerprint catches cells that now hold other keys).
struct segment_cache {
    std::unordered_map<int64_t, segment_entry> layers[DHSA_MAX_LAYERS];
};

// FNV-1a over the first 16 bytes of every (key, head) of the segment and the chunking parameters: any
// rewrite of the segment's cells (cache cleared and refilled, sequence removed, context shifted: RoPE
// changes every key) changes it, at a cost of 1/16 of reading the keys for a 256-wide f16 head.
uint64_t segment_fingerprint(const ggml_tensor * k, int64_t seg0, int64_t seg1, const dhsa_params & p) {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](const void * data, size_t n) {
        for (size_t i = 0; i < n; i++) {
            h = (h ^ ((const uint8_t *) data)[i]) * 1099511628211ull;
        }
    };
    const int32_t shape[6] = { p.boundary, p.chunk_min, p.chunk_max, p.chunk_avg, p.window, (int32_t) k->type };
    mix(shape, sizeof(shape));
    const size_t row_bytes = std::min<size_t>(16, ggml_row_size(k->type, k->ne[0]));
    for (int64_t j = seg0; j < seg1; j++) {
        for (int64_t hd = 0; hd < k->ne[2]; hd++) {
            mix((const char *) k->data + j * k->nb[1] + hd * k->nb[2], row_bytes);
        }
    }
    return h;
}

// Chunk representations of the chunks between consecutive cuts [start, cuts...] into kc.
bool chunk_reprs_of(const ggml_tensor * k, int64_t start, const int32_t * cuts, int32_t n_cuts, float * keys,
                    float * kc) {
    const int64_t per_chunk = k->ne[2] * k->ne[0];
    int64_t c0 = start;
    for (int32_t i = 0; i < n_cuts; i++) {
        const dhsa_tensor K = key_rows_f32(k, c0, cuts[i], keys);
        const int32_t zero_len[2] = { 0, (int32_t) (cuts[i] - c0) };
        if (dhsa_chunk_reprs(&K, zero_len, 1, kc + i * per_chunk) != DHSA_OK) {
            return false;
        }
        c0 = cuts[i];
    }
    return true;
}

// The ubatch's sequences, as runs of rows (seq_run), into runs[0..return). Row r + 1 continues row r's
// sequence when it sits in the next cell and sees row r's cell; a sequence's keys start at the first
// cell its rows see. Layers with a sliding window see a first cell that moves with the query, so there
// the rows must be one sequence stored from cell 0 (any other ubatch attends densely). excess_rows_cells:
// the sum over the rows of every sequence found of its first cell, the cells before it that the attention
// kernel's per-row causal count (pos + 1) includes but the row cannot see.
int64_t find_runs(const ggml_tensor * mask, const int32_t * pos, const select_geometry & g, const dhsa_op_params & op,
                  seq_run * runs, int64_t * excess_rows_cells) {
    *excess_rows_cells = 0;
    if (op.budget >= 1.0) {
        return 0;
    }
    const bool windowed = op.windowed != 0;
    const int64_t q_block = op.q_block;
    int64_t n_runs = 0, n_seg_used = 0;
    for (int64_t r = 0; r < g.n_q;) {
        if (pos[r] < 0) {
            r++;
            continue;
        }
        const int64_t s0 = r;
        while (r + 1 < g.n_q && pos[r + 1] == pos[r] + 1 && cell_visible(mask, r + 1, pos[r])) {
            r++;
        }
        const int64_t e0 = ++r;
        int32_t base = 0;
        if (windowed) {
            if (s0 != 0 || e0 != g.n_q) {
                return 0;
            }
        } else {
            base = row_first_visible(mask, s0, g.n_kv);
            if (row_first_visible(mask, e0 - 1, g.n_kv) != base) {
                continue;  // not the keys of one sequence from one cell: dense under the mask
            }
            *excess_rows_cells += (int64_t) base * (e0 - s0);
        }
        // Whole blocks only; the last block of the ubatch may be short.
        const int64_t r0 = (s0 + q_block - 1) / q_block * q_block;
        const int64_t r1 = e0 == g.n_q ? g.n_q : e0 / q_block * q_block;
        if (r0 >= r1 || n_runs == kMaxRuns) {
            continue;
        }
        seq_run & run = runs[n_runs];
        run.r0 = r0;
        run.r1 = r1;
        run.base  = base;
        run.n_eff = pos[r1 - 1] + 1 - base;
        run.last_pos  = pos[e0 - 1] - base;
        run.seg_first = n_seg_used;
        run.n_seg     = (run.n_eff + DHSA_SEGMENT - 1) / DHSA_SEGMENT;
        run.sparse    = run.n_eff >= op.min_context && n_seg_used + run.n_seg <= g.n_seg;
        if (run.sparse) {
            n_seg_used += run.n_seg;
        }
        n_runs++;
    }
    return n_runs;
}

// The keys of a sequence stored from cell `base`, as a tensor whose cell 0 is that cell.
ggml_tensor keys_from(const ggml_tensor * k, const seq_run & run) {
    ggml_tensor view = *k;
    view.data  = (char *) k->data + (int64_t) run.base * k->nb[1];
    view.ne[1] = run.n_eff;
    return view;
}

}  // namespace

void ggml_dhsa_runtime_release_cache(struct dhsa_runtime * rt) {
    delete (segment_cache *) rt->segment_cache;
    rt->segment_cache = nullptr;
    if (rt->release_device_cache) {
        rt->release_device_cache(rt);  // the CUDA backend's segment caches (ggml-cuda-dhsa.cu)
    }
}

// One K/V tile of the attention kernel: up to kTile selected keys, as runs of consecutive cells.
struct tile_keys {
    int32_t n_runs;
    int64_t first[kTile];  // run u holds the cells first[u] .. first[u] + len[u] - 1,
    int32_t len[kTile];    // at tile columns at[u] .. at[u] + len[u] - 1
    int32_t at[kTile];
};

// The keys of one slot's ranges below `end`, tile by tile. Tiles are filled across range boundaries, so
// that only the last tile of a slot is partly empty: walking each range in its own tiles left most of a
// tile masked and computed for nothing whenever ranges are short (keysim chunks average 32 keys; at
// budget 0.3 fixed blocks, which merge into longer ranges, prefilled 1.2x faster than keysim on Qwen2.5).
struct key_cursor {
    const int32_t * slot;
    int64_t end;
    int32_t ri = 0;  // current range
    int64_t j;       // next cell of it

    key_cursor(const int32_t * slot, int64_t end) : slot(slot), end(end), j(slot[0] > 0 ? slot[1] : 0) {}

    // Fills t with the next tile's keys; returns their number (0: no keys left).
    int64_t next(tile_keys & t) {
        int64_t nt = 0;
        t.n_runs = 0;
        while (nt < kTile && ri < slot[0]) {
            const int64_t range_end = std::min<int64_t>(slot[2 + 2 * ri], end);
            if (j >= range_end) {
                if (++ri < slot[0]) {
                    j = slot[1 + 2 * ri];
                }
                continue;
            }
            const int64_t n = std::min(kTile - nt, range_end - j);
            t.first[t.n_runs] = j;
            t.len[t.n_runs]   = (int32_t) n;
            t.at[t.n_runs]    = (int32_t) nt;
            t.n_runs++;
            nt += n;
            j += n;
        }
        return nt;
    }
};

// Per-thread scratch of the attention kernel for one work item of up to `rows` query rows x heads:
// the gathered queries, one K tile (row-major as converted, and transposed) and one V tile in f32, the
// tile's scores and mask, and the online-softmax state (running max, sum and output accumulator) of
// every row.
struct attn_scratch {
    float * q, * k_rows, * k_t, * v, * kq, * mask, * m_run, * l_run, * acc;

    static size_t bytes(int64_t rows, int64_t dk, int64_t dv) {
        return align_up(sizeof(float) * rows * dk) + 2 * align_up(sizeof(float) * dk * kTile) +
               align_up(sizeof(float) * kTile * dv) + 2 * align_up(sizeof(float) * rows * kTile) +
               2 * align_up(sizeof(float) * rows) + align_up(sizeof(float) * rows * dv);
    }

    attn_scratch(char * base, int64_t rows, int64_t dk, int64_t dv) {
        char * p = base;
        auto take = [&p](size_t n) { float * f = (float *) p; p += align_up(n); return f; };
        q      = take(sizeof(float) * rows * dk);
        k_rows = take(sizeof(float) * dk * kTile);
        k_t    = take(sizeof(float) * dk * kTile);
        v     = take(sizeof(float) * kTile * dv);
        kq    = take(sizeof(float) * rows * kTile);
        mask  = take(sizeof(float) * rows * kTile);
        m_run = take(sizeof(float) * rows);
        l_run = take(sizeof(float) * rows);
        acc   = take(sizeof(float) * rows * dv);
    }
};

size_t ggml_cpu_dhsa_work_size(const struct ggml_tensor * node, int n_tasks) {
    if (node->op == GGML_OP_DHSA_SELECT) {
        const select_geometry g(node);
        return g.shared_bytes() + g.thread_bytes() * n_tasks + kAlign;
    }
    const dhsa_op_params op = dhsa_read_op_params(node);
    const int64_t dk = node->src[1]->ne[0], dv = node->src[2]->ne[0];
    const int64_t group = node->src[0]->ne[2] / node->src[1]->ne[2];
    return attn_scratch::bytes((int64_t) op.q_block * group, dk, dv) * n_tasks + kAlign;
}

void ggml_compute_forward_dhsa_select(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const dhsa_op_params op = dhsa_read_op_params(dst);
    dhsa_runtime * state = op.state;
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * mask = dst->src[2];
    const select_geometry g(dst);
    const int ith = params->ith, nth = params->nth;

    int32_t * out   = (int32_t *) dst->data;
    int32_t * pos   = out;                       // [n_q] row positions
    int32_t * flag  = out + g.n_q;               // 1: sparse selection (of at least one sequence), 0: dense
    int32_t * slots = out + DHSA_SEL_HEADER(g.n_q);

    char * shared = (char *) (((uintptr_t) params->wdata + kAlign - 1) & ~(uintptr_t) (kAlign - 1));
    int32_t * seg_bounds = (int32_t *) shared;
    int32_t * bounds     = (int32_t *) (shared + align_up(sizeof(int32_t) * g.seg_bounds_ints() * g.n_seg));
    float *   Kc = (float *) ((char *) bounds + align_up(sizeof(int32_t) * (g.n_kv + 2)));
    float *   Qb = (float *) ((char *) Kc + align_up(sizeof(float) * g.max_chunks * g.n_head_kv * g.d));
    void *    select_work = (char *) Qb + align_up(sizeof(float) * g.n_blocks * g.n_head_kv * g.d);
    const size_t select_work_size = dhsa_select_ranges_workspace_size((int32_t) g.max_chunks) + kAlign;
    seq_run * runs   = (seq_run *) ((char *) select_work + align_up(select_work_size));
    int64_t * n_runs = (int64_t *) (runs + kMaxRuns);
    char *    mine = shared + g.shared_bytes() + g.thread_bytes() * ith;
    float *   keys = (float *) mine;
    void *    keysim_work = mine + align_up(sizeof(float) * g.seg_rows * g.n_head_kv * g.d);
    const size_t keysim_work_size = dhsa_keysim_workspace_size((int32_t) g.seg_rows, (int32_t) g.d) + kAlign;
    const dhsa_params p = dhsa_select_params(&op);
    const int64_t kc_per_chunk = g.n_head_kv * g.d;

    // Phase 1: the position of every query row, read from the mask.
    for (int64_t r = ith; r < g.n_q; r += nth) {
        pos[r] = row_position(mask, r, g.n_kv);
    }
    ggml_barrier(params->threadpool);

    // Phase 1b (thread 0): the ubatch's sequences (find_runs), and cache entries for their complete
    // segments. Each sequence is selected as if it were alone, in cells counted from its first cell;
    // blocks outside every sequence found attend densely under the mask, which is exact.
    if (ith == 0) {
        int64_t excess = 0;
        *n_runs = find_runs(mask, pos, g, op, runs, &excess);
        if (excess > 0) {  // the attention kernel counts pos + 1 causal keys per row and head
            __atomic_fetch_sub(&state->pairs_causal[op.il], excess * q->ne[2], __ATOMIC_RELAXED);
        }
        if (*n_runs > 0) {
            if (!state->segment_cache) {
                state->segment_cache = new segment_cache;
            }
            auto & entries = ((segment_cache *) state->segment_cache)->layers[op.il];
            if ((int64_t) entries.size() > 2 * g.n_seg + 64) {
                entries.clear();  // mostly cells of sequences that are gone; recomputed when seen again
            }
            for (int64_t i = 0; i < *n_runs; i++) {
                for (int64_t s = 0; runs[i].sparse && (s + 1) * DHSA_SEGMENT <= runs[i].n_eff; s++) {
                    entries[(int64_t) runs[i].base + s * DHSA_SEGMENT];  // created here, filled below
                }
            }
        }
    }
    ggml_barrier(params->threadpool);

    // Phase 2: boundaries and chunk representations, one aligned segment of one sequence per work item.
    // Complete segments come from the cache when their keys are unchanged; each segment's representations
    // go to its own slot of Kc (compacted below), so this phase needs no coordination between threads.
    int64_t n_seg_all = 0;
    for (int64_t i = 0; i < *n_runs; i++) {
        n_seg_all += runs[i].sparse ? runs[i].n_seg : 0;
    }
    for (int64_t t = ith; t < n_seg_all; t += nth) {
        const seq_run * run = runs;
        while (!run->sparse || t >= run->seg_first + run->n_seg) {
            run++;
        }
        const ggml_tensor kr = keys_from(k, *run);
        const int64_t s = t - run->seg_first;
        int32_t * seg_out = seg_bounds + t * g.seg_bounds_ints();
        float *   seg_kc  = Kc + t * g.seg_chunks * kc_per_chunk;
        const int64_t seg0 = s * DHSA_SEGMENT, seg1 = std::min<int64_t>(run->n_eff, seg0 + DHSA_SEGMENT);
        const bool complete = seg1 - seg0 == DHSA_SEGMENT;
        segment_entry * entry = nullptr;
        if (complete) {
            auto & entries = ((segment_cache *) state->segment_cache)->layers[op.il];
            entry = &entries.find((int64_t) run->base + seg0)->second;  // created in phase 1b
        }
        const uint64_t fp = complete ? segment_fingerprint(&kr, seg0, seg1, p) : 0;
        if (entry && entry->valid && entry->fingerprint == fp) {
            seg_out[0] = (int32_t) entry->cuts.size();
            std::copy(entry->cuts.begin(), entry->cuts.end(), seg_out + 1);
            std::copy(entry->kc.begin(), entry->kc.end(), seg_kc);
            continue;
        }
        if (!segment_bounds(p, &kr, seg0, seg1, keys, keysim_work, keysim_work_size, seg_out) ||
            seg_out[0] > g.seg_chunks || !chunk_reprs_of(&kr, seg0, seg_out + 1, seg_out[0], keys, seg_kc)) {
            seg_out[0] = -1;
            if (entry) {
                entry->valid = false;
            }
            continue;
        }
        if (entry) {
            entry->fingerprint = fp;
            entry->cuts.assign(seg_out + 1, seg_out + 1 + seg_out[0]);
            entry->kc.assign(seg_kc, seg_kc + (size_t) seg_out[0] * kc_per_chunk);
            entry->valid = true;
        }
    }
    ggml_barrier(params->threadpool);

    // Phase 3 (thread 0): per sequence, concatenate boundaries and representations and select its
    // blocks' ranges; every other block gets dense ranges. It is a small part of the op (one dot product
    // per chunk and query block), so one thread keeps it simple.
    if (ith == 0) {
        write_dense_slots(g, pos, op.q_block, slots, 0, g.n_blocks, 0);
        bool any_sparse = false;
        for (int64_t i = 0; i < *n_runs; i++) {
            const seq_run & run = runs[i];
            const int64_t b0 = run.r0 / op.q_block, b1 = (run.r1 + op.q_block - 1) / op.q_block;
            int32_t * run_slots = slots + b0 * g.n_head_kv * g.slot_size;
            bool ok = run.sparse;
            int32_t n_bounds = 0;
            bounds[n_bounds++] = 0;
            float * run_kc = Kc + run.seg_first * g.seg_chunks * kc_per_chunk;
            for (int64_t s = 0; ok && s < run.n_seg; s++) {
                const int64_t t = run.seg_first + s;
                const int32_t * seg_out = seg_bounds + t * g.seg_bounds_ints();
                if (seg_out[0] < 0) {
                    ok = false;
                    break;
                }
                // Kc of segment t moves down to follow the chunks before it (never upwards: memmove).
                memmove(run_kc + (size_t) (n_bounds - 1) * kc_per_chunk, Kc + t * g.seg_chunks * kc_per_chunk,
                        sizeof(float) * (size_t) seg_out[0] * kc_per_chunk);
                for (int32_t c = 0; c < seg_out[0]; c++) {
                    bounds[n_bounds++] = seg_out[1 + c];
                }
            }
            const int32_t n_chunks = n_bounds - 1;
            ok = ok && n_chunks >= 1 && n_chunks <= g.max_chunks;
            dhsa_params p_run = p;  // positions from the sequence's first cell
            for (int32_t e = 0; e < std::min(state->n_tail_ends, DHSA_MAX_TAIL_ENDS); e++) {
                if (state->tail_ends[e] == run.last_pos) {
                    p_run.dense_from = std::min(p.dense_from, run.last_pos + 1 - op.dense_tail);
                }
            }
            if (ok) {
                const dhsa_tensor Q{ (const float *) ((const char *) q->data + run.r0 * q->nb[1]), (int32_t) (run.r1 - run.r0),
                                     (int32_t) q->ne[2], (int32_t) g.d, (int64_t) (q->nb[1] / sizeof(float)),
                                     (int64_t) (q->nb[2] / sizeof(float)) };
                ok = dhsa_query_block_reprs(&Q, (int32_t) g.n_head_kv, op.q_block, Qb) == DHSA_OK &&
                     dhsa_select_ranges(&p_run, Qb, run_kc, bounds, n_chunks, (int32_t) (run.r1 - run.r0),
                                        pos[run.r0] - run.base, (int32_t) g.n_head_kv, (int32_t) g.d, run_slots,
                                        (int32_t) g.max_ranges, select_work, select_work_size) == DHSA_OK;
            }
            if (!ok) {  // dense over the sequence's own cells
                write_dense_slots(g, pos, op.q_block, slots, b0, b1, run.base);
                continue;
            }
            any_sparse = true;
            for (int64_t j = 0; run.base != 0 && j < (b1 - b0) * g.n_head_kv; j++) {
                int32_t * slot = run_slots + j * g.slot_size;
                for (int32_t c = 0; c < slot[0]; c++) {
                    slot[1 + 2 * c] += run.base;
                    slot[2 + 2 * c] += run.base;
                }
            }
        }
        *flag = any_sparse ? 1 : 0;
    }
}

void ggml_compute_forward_dhsa_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const dhsa_op_params op = dhsa_read_op_params(dst);
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * sel = dst->src[4];

    const int64_t dk = k->ne[0], dv = v->ne[0], n_q = q->ne[1], n_head = q->ne[2], n_head_kv = k->ne[2];
    const int64_t group = n_head / n_head_kv;
    const int64_t q_block = op.q_block;
    const int64_t n_blocks = (n_q + q_block - 1) / q_block;
    const int64_t slot_size = 1 + 2 * (int64_t) ggml_dhsa_max_ranges(k->ne[1], op.chunk_min, op.chunk_avg);
    const int32_t * pos   = (const int32_t *) sel->data;
    const int32_t * slots = pos + DHSA_SEL_HEADER(n_q);

    // ggml's soft-capping convention: s = softcap * tanh(scale * q.k / softcap)
    const float softcap = op.softcap;
    const float scale   = softcap > 0.0f ? op.scale / softcap : op.scale;

    // Work items: (block, KV head) so that each K/V tile is converted once for the whole GQA group; when
    // that leaves threads idle (decode, short ubatches), (block, query head) instead.
    const bool per_head   = n_blocks * n_head_kv < params->nth;
    const int64_t n_items = per_head ? n_blocks * n_head : n_blocks * n_head_kv;

    const size_t per_thread = attn_scratch::bytes(q_block * group, dk, dv);
    char * base = (char *) (((uintptr_t) params->wdata + kAlign - 1) & ~(uintptr_t) (kAlign - 1));
    attn_scratch w(base + per_thread * params->ith, q_block * group, dk, dv);

    int64_t pairs_computed = 0, pairs_causal = 0;

    for (int64_t item = params->ith; item < n_items; item += params->nth) {
        const int64_t b  = per_head ? item / n_head : item / n_head_kv;
        const int64_t h0 = per_head ? item % n_head : (item % n_head_kv) * group;
        const int64_t nh = per_head ? 1 : group;
        const int64_t g  = h0 / group;
        const int64_t r0 = b * q_block, r1 = std::min(n_q, r0 + q_block);
        const int64_t M  = (r1 - r0) * nh;  // score-matrix rows: (query row, head) pairs, row-major
        const bool few_rows = M <= 8;       // decode: dot products beat a GEMM on a transposed tile
        const int32_t * slot = slots + (b * n_head_kv + g) * slot_size;

        // Gather the item's queries: row m = (r - r0) * nh + hh.
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t hh = 0; hh < nh; hh++) {
                memcpy(w.q + ((r - r0) * nh + hh) * dk, (const char *) q->data + r * q->nb[1] + (h0 + hh) * q->nb[2],
                       sizeof(float) * dk);
            }
        }
        std::fill(w.m_run, w.m_run + M, -INFINITY);
        std::fill(w.l_run, w.l_run + M, 0.0f);
        memset(w.acc, 0, sizeof(float) * M * dv);

        int32_t pe = -1;
        for (int64_t r = r0; r < r1; r++) {
            pe = std::max(pe, pos[r]);
        }
        key_cursor cursor(slot, (int64_t) pe + 1);
        tile_keys tk;
        for (int64_t nt; (nt = cursor.next(tk)) > 0;) {
            // One conversion per tile, shared by all rows and heads of the item, with SIMD whatever the
            // cache type (row_to_f32). With many score rows (prefill) K is then transposed (k_t[i][t])
            // so that scores are one GEMM over the tile, as upstream's tiled flash attention does; with
            // a few (decode) K stays row-major and each score is one dot product. Missing keys of a
            // short tile are zero (and masked below).
            float * k_dst = few_rows ? w.k_t : w.k_rows;
            for (int32_t u = 0; u < tk.n_runs; u++) {
                for (int64_t i = 0; i < tk.len[u]; i++) {
                    const int64_t cell = tk.first[u] + i, t = tk.at[u] + i;
                    row_to_f32(k->type, (const char *) k->data + cell * k->nb[1] + g * k->nb[2], k_dst + t * dk, dk);
                    row_to_f32(v->type, (const char *) v->data + cell * v->nb[1] + g * v->nb[2], w.v + t * dv, dv);
                }
            }
            if (nt < kTile) {
                memset(k_dst + nt * dk, 0, sizeof(float) * (kTile - nt) * dk);
                memset(w.v + nt * dv, 0, sizeof(float) * (kTile - nt) * dv);
            }
            if (!few_rows) {
                for (int64_t t = 0; t < kTile; t++) {
                    const float * kr = w.k_rows + t * dk;
                    for (int64_t i = 0; i < dk; i++) {
                        w.k_t[i * kTile + t] = kr[i];
                    }
                }
            }
            // Mask of each query row over the tile (the row's own mask, causal, and -inf padding).
            for (int64_t r = r0; r < r1; r++) {
                float * mrow = w.mask + (r - r0) * nh * kTile;
                const ggml_fp16_t * src = (const ggml_fp16_t *) ((const char *) mask->data + r * mask->nb[1]);
                for (int32_t u = 0; u < tk.n_runs; u++) {
                    const int64_t visible = std::min<int64_t>(tk.len[u], (int64_t) pos[r] + 1 - tk.first[u]);
                    if (visible > 0) {
                        ggml_cpu_fp16_to_fp32(src + tk.first[u], mrow + tk.at[u], visible);
                    }
                    std::fill(mrow + tk.at[u] + std::max<int64_t>(visible, 0), mrow + tk.at[u] + tk.len[u],
                              -INFINITY);
                }
                std::fill(mrow + nt, mrow + kTile, -INFINITY);
                for (int64_t hh = 1; hh < nh; hh++) {
                    memcpy(mrow + hh * kTile, mrow, sizeof(float) * kTile);
                }
            }
            if (few_rows) {
                for (int64_t m = 0; m < M; m++) {
                    for (int64_t t = 0; t < kTile; t++) {
                        ggml_vec_dot_f32((int) dk, w.kq + m * kTile + t, 0, w.k_t + t * dk, 0, w.q + m * dk, 0, 1);
                    }
                }
            } else {
                memset(w.kq, 0, sizeof(float) * M * kTile);
                simd_gemm(w.kq, w.q, w.k_t, (int) M, (int) dk, (int) kTile);
            }
            ggml_vec_scale_f32((int) (M * kTile), w.kq, scale);
            if (softcap > 0.0f) {
                ggml_vec_tanh_f32((int) (M * kTile), w.kq, w.kq);
                ggml_vec_scale_f32((int) (M * kTile), w.kq, softcap);
            }
            ggml_vec_add_f32((int) (M * kTile), w.kq, w.kq, w.mask);
            // Online softmax, row by row; a row whose tile is fully masked contributes nothing.
            for (int64_t m = 0; m < M; m++) {
                float * row = w.kq + m * kTile;
                float tile_max;
                ggml_vec_max_f32((int) kTile, &tile_max, row);
                if (tile_max == -INFINITY) {
                    memset(row, 0, sizeof(float) * kTile);
                    continue;
                }
                if (tile_max > w.m_run[m]) {
                    const float correction = expf(w.m_run[m] - tile_max);
                    ggml_vec_scale_f32((int) dv, w.acc + m * dv, correction);
                    w.l_run[m] *= correction;
                    w.m_run[m] = tile_max;
                }
                w.l_run[m] += (float) ggml_vec_soft_max_f32((int) kTile, row, row, w.m_run[m]);
            }
            simd_gemm(w.acc, w.kq, w.v, (int) M, (int) kTile, (int) dv);
        }
        // Normalise and store in flash_attn_ext's layout [dv, H, n_q]; count the pairs for the density.
        for (int64_t r = r0; r < r1; r++) {
            int64_t computed = 0;
            for (int32_t ri = 0; ri < slot[0]; ri++) {
                computed += std::max<int64_t>(0, std::min<int64_t>(slot[2 + 2 * ri], (int64_t) pos[r] + 1) - slot[1 + 2 * ri]);
            }
            for (int64_t hh = 0; hh < nh; hh++) {
                const int64_t m = (r - r0) * nh + hh;
                float * out = (float *) ((char *) dst->data + r * dst->nb[2] + (h0 + hh) * dst->nb[1]);
                if (w.l_run[m] > 0.0f) {
                    const float inv = 1.0f / w.l_run[m];
                    for (int64_t i = 0; i < dv; i++) {
                        out[i] = w.acc[m * dv + i] * inv;
                    }
                } else {
                    memset(out, 0, sizeof(float) * dv);
                }
                pairs_computed += computed;
                pairs_causal += (int64_t) pos[r] + 1;
            }
        }
    }
    __atomic_fetch_add(&op.state->pairs_computed[op.il], pairs_computed, __ATOMIC_RELAXED);
    __atomic_fetch_add(&op.state->pairs_causal[op.il], pairs_causal, __ATOMIC_RELAXED);
}
