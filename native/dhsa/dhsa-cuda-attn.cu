// Block-sparse flash attention of DHSA on tensor cores (dhsa_cuda_attn of dhsa-cuda.h).
//
// Computes what ggml_compute_forward_dhsa_attn (ggml-cpu-dhsa.cpp) computes: for query row r, head h and
// KV head g = h / G, softmax(scale * q.k [soft-capped] + mask) . V over the keys of the ranges of slot
// (r / q_block, g), restricted to keys j <= pos[r]. See native/dhsa/ALGORITHM.md, step 6.
//
// Design (flash attention 2 on mma.sync m16n8k16, f16 operands, f32 accumulators):
//  - One CTA per (query block b, KV head g, row sub-tile). Its score rows are the flattened (query row,
//    head of the group) pairs of block b, row m = (r - b * q_block) * G + (h - g * G) as in the CPU
//    kernel, 16 per warp, up to 128 rows (64 for d = 256). Every K/V tile brought into shared memory
//    serves all heads of the GQA group.
//  - Tiles are packed: a tile holds the next kTileKeys keys of the slot's ranges, across range ends
//    (ranges are chunks of a few dozen keys: one tile per range would leave most tiles half empty). One
//    warp builds each tile's key map two tiles ahead; K and V rows are gathered with 16-byte cp.async
//    into a two-stage ring, so the next tile loads while this one is multiplied. Empty slots are
//    zero-filled and get -inf scores.
//  - The mask is read from global memory one tile ahead, in fragment order, as raw 32-bit words (key
//    pairs (2k, 2k + 1), which the key map keeps in aligned slot pairs) that nothing touches until the
//    tile uses them: mask rows are shared by few CTAs, so their misses must not stall each tile.
//  - Shared rows are XOR-swizzled by 16-byte chunk (chunk ^ (row & 7)), so the eight 16-byte row
//    segments one ldmatrix phase reads fall into distinct banks without padding.
//  - Q is converted to f16 once, pre-multiplied by the scale (and by log2(e), so that the softmax uses
//    exp2); for d <= 128 it stays in registers as mma A fragments, for d = 256 (registers are short) it
//    stays in shared memory and is re-read with ldmatrix.
//  - Online softmax in registers; the score accumulator fragment is re-packed as the A fragment of P.V
//    without going through shared memory.
//  - Few rows (decode, tiny ubatches): the warps of a 16-row group split every tile's keys and merge
//    their softmax states at the end, so a CTA still has 4 warps of work. Such blocks alone give few
//    CTAs (n_blocks * n_head_kv: 8 for one decode token with 8 KV heads), so each (block, KV head) also
//    splits its keys into parts of equal key counts, one CTA each, enough to fill the GPU once
//    ("flash decoding"); the parts' unnormalised (max, sum, O) go to scratch and a second kernel
//    merges them into dst.
//  - Many rows with few heads (prefill with 8 or 16 query heads): n_blocks * n_sub * n_head_kv CTAs can
//    be far fewer than the GPU holds at once (32 on 132 SMs for 512 queries, q_block 64, 4 KV heads).
//    Then the same key split runs in a second instance of the prefill kernel (template kSplit), so
//    that the grid fills about one wave, and a warp-per-row kernel merges the parts.

#include "dhsa-cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

namespace {

constexpr int   kWarpSize = 32;
constexpr int   kWarpRows = 16;  // score rows per warp: the M of one mma
constexpr float kLog2e    = 1.4426950408889634f;

// Per head-size choices. d = 256 takes half the rows and half the keys per tile so that its 128 f32
// output accumulators per thread fit in registers and its shared memory (Q included) stays <= 96 KB.
template <int D>
struct attn_traits {
    static_assert(D == 64 || D == 128 || D == 256, "head sizes 64, 128 and 256 only");

    static constexpr int  kTileKeys     = D == 256 ? 32 : 64;  // keys per K/V tile
    static constexpr int  kMaxWarps     = D == 256 ? 4 : 8;    // 16 score rows each
    static constexpr bool kQInRegisters = D <= 128;
    // Few rows (decode, short ubatches): up to kMaxKeyParts warps share each 16-row group, each taking
    // 16 keys of every tile (see merge_key_parts).
    static constexpr int  kMaxKeyParts  = kTileKeys / 16;

    static constexpr int kTileBytes  = kTileKeys * D * 2;  // one K or V tile, f16
    static constexpr int kStageBytes = 2 * kTileBytes;     // K then V
    static constexpr int kRingBytes  = 2 * kStageBytes;    // two stages

    // Q lives after the ring when it stays in shared memory; otherwise it only passes through shared
    // memory before the first tile is loaded, so it shares the ring's space.
    static constexpr size_t smem_bytes(int rows) {
        return kQInRegisters ? (kRingBytes > rows * D * 2 ? (size_t) kRingBytes : (size_t) rows * D * 2)
                             : (size_t) kRingBytes + (size_t) rows * D * 2;
    }
};

// Everything the kernel needs, derived once on the host.
struct attn_params {
    dhsa_cuda_views in;     // q, k, the mask and the sizes (dhsa-cuda.h)
    const half * v;
    int64_t v_row, v_head;
    const int32_t * pos;    // [n_q] key position of each query row, -1: sees nothing
    const int32_t * slots;  // range lists, slot (b, g) at slots + (b * n_head_kv + g) * slot_size
    int64_t slot_size;
    float * dst;
    int32_t q_block, group;
    int32_t n_blocks;       // query blocks
    int32_t n_sub;          // CTAs per (query block, KV head) along the rows
    int32_t n_parts;        // CTAs per (query block, KV head, row sub-tile) along the keys (split kernels)
    int32_t part_rows;      // rows of a full block: the row stride of the partial states
    float * part_o;         // n_parts > 1: unnormalised O of part (b, g, part), row m at
                            // ((b * n_head_kv + g) * n_parts + part) * part_rows + m, D floats each
    float2 * part_ml;       // n_parts > 1: (max in the log2 domain, sum) of the same rows
    float q_scale;          // multiplies q before its f16 conversion
    float softcap_log2e;    // softcap * log2(e) (soft-capping kernels only)
    bool kv_aligned;        // every K/V row segment starts on 16 bytes: cp.async; else a scalar path
    bool mask_words;        // mask rows start on 4 bytes: keys (2k, 2k + 1) load as one 32-bit word
    const int32_t * run_if; // non-NULL: every kernel returns at once unless *run_if != 0 (dhsa_cuda_attn_args)
};

// The run_if predicate of attn_params, read by every CTA before anything else.
__device__ __forceinline__ bool skipped(const attn_params & p) {
    return p.run_if != nullptr && *p.run_if == 0;
}

// The device code needs sm_80 (cp.async, mma m16n8k16 with f32 accumulators); builds for older
// architectures get a kernel that traps (dhsa_cuda_attn_supported keeps it from being launched).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define DHSA_ATTN_NO_DEVICE_CODE
#endif

#ifndef DHSA_ATTN_NO_DEVICE_CODE

// Fragment and chunk counts of a tile (device side).
template <int D>
struct tile_shape : attn_traits<D> {
    static constexpr int kChunks   = D / 8;                          // 16-byte chunks per shared row
    static constexpr int kDSteps   = D / 16;                         // mma k-steps over d (Q.K^T)
    static constexpr int kKeySteps = attn_traits<D>::kTileKeys / 16; // mma k-steps over the tile's keys (P.V)
    static constexpr int kKeyFrags = attn_traits<D>::kTileKeys / 8;  // 8-key n-tiles of the score fragment
    static constexpr int kOutFrags = D / 8;                          // 8-column n-tiles of the output fragment
    static constexpr int kQOffset  = attn_traits<D>::kQInRegisters ? 0 : attn_traits<D>::kRingBytes;
    // Per-warp output partials of merge_key_parts (16 rows x D f32) fit in the ring once it is idle.
    static_assert(attn_traits<D>::kMaxWarps * kWarpRows * D * 4 <= attn_traits<D>::kRingBytes, "ring too small");
};

// ---- PTX wrappers -----------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_address(const void * p) {
    return (uint32_t) __cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void * src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b: a 16x16 (row), b 16x8 (col), c 16x8 f32.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower column
    return *reinterpret_cast<const uint32_t *>(&h);
}

// ---- shared-memory layout ---------------------------------------------------------------------------

// Offset in halves of 16-byte chunk `chunk` of row `row` of a [rows][D] f16 tile. The XOR spreads the
// eight rows an ldmatrix phase reads (same logical chunk) over eight different 16-byte bank groups.
template <int D>
__device__ __forceinline__ int swizzled(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---- loads ------------------------------------------------------------------------------------------

// Q rows of this CTA -> shared f16 (scaled); ghost rows (past the block) are zero.
template <int D>
__device__ void load_q_tile(const attn_params & p, half * q_smem, int rows, int row0_flat, int rows_in_block,
                            int first_row) {
    constexpr int kChunks = tile_shape<D>::kChunks;
    for (int idx = threadIdx.x; idx < rows * kChunks; idx += blockDim.x) {
        const int row = idx / kChunks, chunk = idx % kChunks;
        const int m   = row0_flat + row;
        uint4 packed  = make_uint4(0, 0, 0, 0);
        if (m < rows_in_block) {
            const int r = first_row + m / p.group;
            const int h = (int) blockIdx.y * p.group + m % p.group;
            const float * src = p.in.q + (int64_t) r * p.in.q_row + (int64_t) h * p.in.q_head + chunk * 8;
            packed.x = pack_half2(src[0] * p.q_scale, src[1] * p.q_scale);
            packed.y = pack_half2(src[2] * p.q_scale, src[3] * p.q_scale);
            packed.z = pack_half2(src[4] * p.q_scale, src[5] * p.q_scale);
            packed.w = pack_half2(src[6] * p.q_scale, src[7] * p.q_scale);
        }
        *reinterpret_cast<uint4 *>(q_smem + swizzled<D>(row, chunk)) = packed;
    }
}

// One 16-byte chunk of a K or V row when the row is not 16-byte aligned: plain loads and a store
// (ordered by the same barriers as the cp.async path).
__device__ __forceinline__ void copy_chunk_unaligned(half * dst, const half * src, bool valid) {
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (valid) {
        half h[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            h[i] = src[i];
        }
        packed.x = *reinterpret_cast<const uint32_t *>(&h[0]);
        packed.y = *reinterpret_cast<const uint32_t *>(&h[2]);
        packed.z = *reinterpret_cast<const uint32_t *>(&h[4]);
        packed.w = *reinterpret_cast<const uint32_t *>(&h[6]);
    }
    *reinterpret_cast<uint4 *>(dst) = packed;
}

// The tile's keys (tile_keys[t], -1 for an empty slot) of KV head g into one ring stage. Empty slots
// are zero-filled: their scores are -inf, but 0 * stale shared data could be NaN in P.V.
template <int D>
__device__ void load_kv_tile(const attn_params & p, const half * k_head, const half * v_head, const int * tile_keys,
                             half * stage) {
    using T = tile_shape<D>;
    half * k_smem = stage;
    half * v_smem = stage + T::kTileKeys * D;
    for (int idx = threadIdx.x; idx < T::kTileKeys * T::kChunks; idx += blockDim.x) {
        const int slot = idx / T::kChunks, chunk = idx % T::kChunks;
        const int key  = tile_keys[slot];
        const bool valid = key >= 0;
        const int64_t j  = valid ? key : 0;  // key 0 is a safe address for the zero-fills
        const half * k_src = k_head + j * p.in.k_row + chunk * 8;
        const half * v_src = v_head + j * p.v_row + chunk * 8;
        const int off = swizzled<D>(slot, chunk);
        if (p.kv_aligned) {
            cp_async_16(smem_address(k_smem + off), k_src, valid ? 16 : 0);
            cp_async_16(smem_address(v_smem + off), v_src, valid ? 16 : 0);
        } else {
            copy_chunk_unaligned(k_smem + off, k_src, valid);
            copy_chunk_unaligned(v_smem + off, v_src, valid);
        }
    }
}

// ---- the walk over the slot's key ranges ------------------------------------------------------

// Tiles are packed: a tile takes the next kTileKeys keys of the slot's ranges, across range ends, so
// short ranges (chunks of 16..128 keys) do not leave tiles half empty. The walk is the same in every
// thread of the CTA (uniform loads of the slot), so its state lives in registers. A CTA walks the keys
// in [key_begin, key_end) of the ranges: all of them up to its rows' last position, or one part of
// them when the walk is split across CTAs (find_part).
struct range_walker {
    int range;  // index of the current range
    int key;    // next key to take
    int end;    // end of the current range, clipped to the CTA's key_end
    bool done;
};

// Moves to the first non-empty range at or after `range`, clipped to [key_begin, key_end) (key_begin
// >= 0). Ranges are sorted, so the walk ends at the first one starting at or past key_end.
__device__ __forceinline__ void seek_range(const int32_t * slot, int range, int key_begin, int key_end,
                                           range_walker & w) {
    const int count = __ldg(slot);
    for (; range < count; range++) {
        const int start = max(__ldg(slot + 1 + 2 * range), key_begin);
        const int end   = min(__ldg(slot + 2 + 2 * range), key_end);
        if (start >= key_end) {
            break;
        }
        if (start < end) {
            w = { range, start, end, false };
            return;
        }
    }
    w.done = true;
}

// Run by one warp: writes the next tile's keys into tile_keys[0 .. kTileKeys) (-1 for an empty slot)
// and the number of slots used into *count (0: the walk is over). Each pair of slots (2t, 2t + 1)
// holds keys of one aligned pair (2k, 2k + 1), either of them possibly empty, so that the mask of a
// slot pair is one aligned 32-bit word: a key goes to a slot of its own parity, and a range that
// starts in the middle of a slot pair closes that pair first (one or two empty slots per range).
template <int kTileKeys>
__device__ void build_key_map(const int32_t * slot, int key_begin, int key_end, range_walker & w, int * tile_keys,
                              int * count) {
    const int lane = threadIdx.x % kWarpSize;
    int filled   = 0;
    int last_key = -1;  // key in slot filled - 1 (-1: empty or none)
    while (filled < kTileKeys && !w.done) {
        const bool same_parity = ((w.key ^ filled) & 1) == 0;
        const bool pair_ok     = filled % 2 == 0 || last_key < 0 || last_key == w.key - 1;
        if (!same_parity || !pair_ok) {
            if (lane == 0) {
                tile_keys[filled] = -1;
            }
            filled++;
            last_key = -1;
            continue;
        }
        const int n = min(w.end - w.key, kTileKeys - filled);
        for (int t = lane; t < n; t += kWarpSize) {
            tile_keys[filled + t] = w.key + t;
        }
        filled += n;
        w.key += n;
        last_key = w.key - 1;
        if (w.key == w.end) {
            seek_range(slot, w.range + 1, key_begin, key_end, w);
        }
    }
    for (int t = filled + lane; t < kTileKeys; t += kWarpSize) {
        tile_keys[t] = -1;
    }
    if (lane == 0) {
        *count = filled;
    }
}

// ---- split walks: one part of a slot's keys per CTA ---------------------------------------------

// Few-row blocks (decode) have few CTAs: n_blocks * n_head_kv. Each (block, KV head) then splits its
// keys into n_parts parts of (nearly) equal key counts, one CTA each, and a merge kernel combines the
// parts' softmax states. A part is a run of the walk order; ranges are sorted and disjoint (ALGORITHM.md,
// step 5), so the run is the key interval [lo, hi) of the clipped ranges, and the walk takes it unchanged.
struct key_span {
    int lo, hi;  // keys of the part: [lo, hi) of the ranges, clipped to [0, key_end)
    int range;   // the first range that can hold key lo (the walk's first seek)
};

// Number of keys of range r clipped to [0, key_end).
__device__ __forceinline__ int clipped_length(const int32_t * slot, int r, int key_end) {
    const int start = max(__ldg(slot + 1 + 2 * r), 0);
    const int end   = min(__ldg(slot + 2 + 2 * r), key_end);
    return max(end - start, 0);
}

// Part `part` of n_parts, by key count: keys [total * part / n_parts, total * (part + 1) / n_parts) of
// the walk order. Each thread sums the clipped lengths of a contiguous run of ranges (its loads are
// independent, so a slot of a thousand ranges costs about one memory latency, not one per range); a
// scan over the threads' sums tells which thread's run holds each boundary, and that thread finds the
// boundary's key in its run (reloading the run from L1). Called by the whole CTA.
template <int kMaxWarps>
__device__ key_span find_part(const int32_t * slot, int key_end, int part, int n_parts) {
    __shared__ int warp_sums[kMaxWarps];
    __shared__ key_span span;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int count = __ldg(slot);
    const int per   = (count + (int) blockDim.x - 1) / (int) blockDim.x;
    const int first = min((int) threadIdx.x * per, count), last = min(first + per, count);
    int sum = 0;
#pragma unroll 4
    for (int r = first; r < last; r++) {
        sum += clipped_length(slot, r, key_end);
    }
    int incl = sum;  // inclusive scan over the warp
#pragma unroll
    for (int off = 1; off < kWarpSize; off *= 2) {
        const int x = __shfl_up_sync(0xffffffff, incl, off);
        incl += lane >= off ? x : 0;
    }
    if (lane == kWarpSize - 1) {
        warp_sums[warp] = incl;
    }
    if (threadIdx.x == 0) {
        span = { key_end, key_end, count };  // boundaries at the end of the walk (no thread owns them)
    }
    __syncthreads();
    int before = incl - sum, total = 0;  // keys before this thread's run, keys of the slot
    for (int w = 0; w < (int) blockDim.x / kWarpSize; w++) {
        const int x = warp_sums[w];
        total += x;
        before += w < warp ? x : 0;
    }
    // Walk-order positions of this part's first key and of the next part's first key.
    const int t_lo = (int) ((int64_t) total * part / n_parts);
    const int t_hi = (int) ((int64_t) total * (part + 1) / n_parts);
    const bool has_lo = t_lo >= before && t_lo < before + sum;
    const bool has_hi = t_hi >= before && t_hi < before + sum;
    if (has_lo || has_hi) {
        for (int r = first, at = before; r < last; r++) {
            const int start = max(__ldg(slot + 1 + 2 * r), 0);
            const int len   = clipped_length(slot, r, key_end);
            if (has_lo && t_lo >= at && t_lo < at + len) {
                span.lo    = start + (t_lo - at);
                span.range = r;
            }
            if (has_hi && t_hi >= at && t_hi < at + len) {
                span.hi = start + (t_hi - at);
            }
            at += len;
        }
    }
    __syncthreads();
    return span;
}

// ---- per-thread rows ----------------------------------------------------------------------------

// A thread holds two score rows of its warp's 16: lane / 4 and lane / 4 + 8 (the mma C layout).
struct thread_row {
    int key_end;         // keys j < key_end exist for this row (pos + 1; 0 for ghost rows)
    const half * mask;   // the query row's mask row (ghost rows: never read)
};

// Whether key j (-1: empty tile slot) exists for the row: 0 <= j < key_end, one unsigned compare.
__device__ __forceinline__ bool key_exists(const thread_row & row, int j) {
    return (unsigned) j < (unsigned) row.key_end;
}

// The mask word of a slot pair (keys j0 = 2k or -1, j1 = 2k + 1 or -1; see build_key_map) for one
// row: mask entries (2k, 2k + 1), the low half first. Only entries of keys below the row's key_end
// are read (the even key of a pair may be read for its odd neighbour's sake). The value is left as
// loaded, combined with nothing, so that the load's latency is only paid where the tile uses it.
__device__ __forceinline__ uint32_t load_mask_word(const thread_row & row, int j0, int j1, bool mask_words) {
    const int j = j0 >= 0 ? j0 : j1 - 1;  // the even key of the pair; -2 if both slots are empty
    const unsigned short * src = reinterpret_cast<const unsigned short *>(row.mask) + j;
    uint32_t word = 0;
    if (mask_words && (unsigned) (j + 1) < (unsigned) row.key_end) {
        word = __ldg(reinterpret_cast<const unsigned int *>(src));
    } else if ((unsigned) j < (unsigned) row.key_end) {
        word = __ldg(src);  // the row's last visible key, or rows not 4-byte aligned (slow, rare)
        if ((unsigned) (j + 1) < (unsigned) row.key_end) {
            word |= (uint32_t) __ldg(src + 1) << 16;
        }
    }
    return word;
}

// The mask of a tile in the warp's score-fragment order: word[nt][i] holds keys 2 * tig and
// 2 * tig + 1 of n-tile nt for the thread's row i, and bit (nt * 2 + i) * 2 + c % 2 of `exists` tells
// whether that key exists for the row (else its score is -inf). Loaded one tile ahead: the mask comes
// from global memory and, unlike K and V, is shared by few CTAs, so its misses would stall every tile.
template <int D, int kKeyParts>
struct tile_mask {
    static constexpr int kKeyFrags = tile_shape<D>::kKeyFrags / kKeyParts;
    static_assert(kKeyFrags * 4 <= 32, "one bit per score of the thread");
    uint32_t word[kKeyFrags][2];
    uint32_t exists;

    // Mask of score c (C-fragment order) of n-tile nt.
    __device__ __forceinline__ float value(int nt, int c) const {
        const int i = c / 2, bit = (nt * 2 + i) * 2 + c % 2;
        const half2 h = *reinterpret_cast<const half2 *>(&word[nt][i]);
        return (exists >> bit) & 1 ? (c % 2 ? __high2float(h) : __low2float(h)) : -INFINITY;
    }
};

template <int D, int kKeyParts>
__device__ __forceinline__ void load_tile_mask(const attn_params & p, const int * tile_keys, int key_part,
                                               const thread_row (&rows)[2], tile_mask<D, kKeyParts> & mask) {
    constexpr int kKeyFrags = tile_mask<D, kKeyParts>::kKeyFrags;
    const int tig      = threadIdx.x % 4;
    const int key_base = key_part * (tile_shape<D>::kTileKeys / kKeyParts);
    mask.exists = 0;
#pragma unroll
    for (int nt = 0; nt < kKeyFrags; nt++) {
        const int2 keys = *reinterpret_cast<const int2 *>(tile_keys + key_base + nt * 8 + 2 * tig);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mask.word[nt][i] = load_mask_word(rows[i], keys.x, keys.y, p.mask_words);
            mask.exists |= (uint32_t) key_exists(rows[i], keys.x) << ((nt * 2 + i) * 2);
            mask.exists |= (uint32_t) key_exists(rows[i], keys.y) << ((nt * 2 + i) * 2 + 1);
        }
    }
}

// ---- one tile: S = Q K^T, soft-cap and mask, online softmax, O += P V ------------------------------

// The warp's rows against its part of the tile: keys [key_part, key_part + 1) * kTileKeys / kKeyParts.
template <int D, int kKeyParts, bool kSoftcap>
__device__ __forceinline__ void attend_tile(const attn_params & p, int row_warp, int key_part, uint32_t q_smem_addr,
                                            const uint32_t (&q_frag)[attn_traits<D>::kQInRegisters ? D / 16 : 1][4],
                                            uint32_t k_addr, uint32_t v_addr, const tile_mask<D, kKeyParts> & mask,
                                            float (&o)[D / 8][4], float (&m_run)[2],
                                            float (&l_run)[2]) {
    using T = tile_shape<D>;
    constexpr int kKeyFrags = T::kKeyFrags / kKeyParts;  // this warp's 8-key n-tiles
    constexpr int kKeySteps = T::kKeySteps / kKeyParts;  // and 16-key k-steps of P.V
    const int lane     = threadIdx.x % kWarpSize;
    const int key_base = key_part * (T::kTileKeys / kKeyParts);

    // S = Q K^T. K tile rows are keys, so plain ldmatrix yields the "col" B fragment; one x4 gives
    // the b0/b1 pairs of two 8-key n-tiles.
    float s[kKeyFrags][4];
#pragma unroll
    for (int nt = 0; nt < kKeyFrags; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < T::kDSteps; ks++) {
        uint32_t a[4];
        if constexpr (T::kQInRegisters) {
            a[0] = q_frag[ks][0]; a[1] = q_frag[ks][1]; a[2] = q_frag[ks][2]; a[3] = q_frag[ks][3];
        } else {
            const int row = row_warp * kWarpRows + lane % 16, chunk = 2 * ks + lane / 16;
            ldmatrix_x4(a, q_smem_addr + 2 * swizzled<D>(row, chunk));
        }
#pragma unroll
        for (int np = 0; np < kKeyFrags / 2; np++) {
            const int mat = lane / 8;
            const int key = key_base + np * 16 + (mat / 2) * 8 + lane % 8, chunk = 2 * ks + mat % 2;
            uint32_t b[4];
            ldmatrix_x4(b, k_addr + 2 * swizzled<D>(key, chunk));
            mma_16816(s[2 * np], a, b[0], b[1]);
            mma_16816(s[2 * np + 1], a, b[2], b[3]);
        }
    }

    // Scores in the log2 domain: [softcap * log2(e) * tanh(.) | .] + mask * log2(e). Q already carries
    // scale * log2(e) (scale / softcap when soft-capping). Missing keys have mask -inf.
    float tile_max[2] = { -INFINITY, -INFINITY };
#pragma unroll
    for (int nt = 0; nt < kKeyFrags; nt++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int i = c / 2;
            const float m = mask.value(nt, c);
            float x = s[nt][c];
            if constexpr (kSoftcap) {
                x = p.softcap_log2e * tanhf(x);
            }
            s[nt][c]    = fmaf(m, kLog2e, x);
            tile_max[i] = fmaxf(tile_max[i], s[nt][c]);
        }
    }

    // Online softmax. The four threads of a quad share a row. A row with no finite score so far keeps
    // max -inf; it then uses 0 as reference, so exp2(-inf - 0) = 0 and no -inf - -inf NaN appears.
    float correction[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
        tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
        const float m_new = fmaxf(m_run[i], tile_max[i]);
        const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
        correction[i] = exp2f(m_run[i] - m_ref);
        m_run[i]      = m_new;
        l_run[i] *= correction[i];  // per-thread partial sums; the quad adds them up at the end
#pragma unroll
        for (int nt = 0; nt < kKeyFrags; nt++) {
            s[nt][2 * i]     = exp2f(s[nt][2 * i] - m_ref);
            s[nt][2 * i + 1] = exp2f(s[nt][2 * i + 1] - m_ref);
            l_run[i] += s[nt][2 * i] + s[nt][2 * i + 1];
        }
    }
#pragma unroll
    for (int dt = 0; dt < T::kOutFrags; dt++) {
        o[dt][0] *= correction[0];
        o[dt][1] *= correction[0];
        o[dt][2] *= correction[1];
        o[dt][3] *= correction[1];
    }

    // O += P V. The C fragments of n-tiles 2kk and 2kk+1 are exactly the A fragment of keys
    // key_base + [16kk, 16kk + 16). V tile rows are keys, so ldmatrix.trans yields the B fragment; one x4 gives
    // the b0/b1 pairs of two 8-column output n-tiles.
#pragma unroll
    for (int kk = 0; kk < kKeySteps; kk++) {
        const uint32_t a[4] = { pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                                pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]) };
#pragma unroll
        for (int dp = 0; dp < T::kOutFrags / 2; dp++) {
            const int mat = lane / 8;
            const int key = key_base + kk * 16 + (mat % 2) * 8 + lane % 8, chunk = 2 * dp + mat / 2;
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_addr + 2 * swizzled<D>(key, chunk));
            mma_16816(o[2 * dp], a, b[0], b[1]);
            mma_16816(o[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// Merges the softmax states of the kKeyParts warps that share a row group (each saw its own keys of
// every tile) into the key_part 0 warp: rescale to the common max (left in m_run), add l and O.
// Partials go through shared memory (the idle ring) in fragment order, so each lane reads back what
// the same lane wrote.
template <int D, int kKeyParts>
__device__ void merge_key_parts(float * partials, float (*m_part)[kWarpRows], float (*l_part)[kWarpRows], int key_part,
                                float (&m_run)[2], float (&l)[2], float (&o)[D / 8][4]) {
    constexpr int kOutFrags = D / 8;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    const int row0 = lane / 4, tig = lane % 4;
    const int first_warp = warp - key_part;  // the row group's key_part 0 warp
    if (tig == 0) {
        m_part[warp][row0]     = m_run[0];
        m_part[warp][row0 + 8] = m_run[1];
    }
    __syncthreads();
    float scale[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float m_all = -INFINITY;
#pragma unroll
        for (int q = 0; q < kKeyParts; q++) {
            m_all = fmaxf(m_all, m_part[first_warp + q][row0 + 8 * i]);
        }
        scale[i] = exp2f(m_run[i] - (m_all == -INFINITY ? 0.0f : m_all));  // 0 for a part without keys
        l[i] *= scale[i];
        m_run[i] = m_all;  // the reference of the merged state (a split walk stores it)
    }
#pragma unroll
    for (int dt = 0; dt < kOutFrags; dt++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            o[dt][c] *= scale[c / 2];
        }
    }
    if (key_part != 0) {
#pragma unroll
        for (int dt = 0; dt < kOutFrags; dt++) {
#pragma unroll
            for (int c = 0; c < 4; c++) {
                partials[((warp * kOutFrags + dt) * 4 + c) * kWarpSize + lane] = o[dt][c];
            }
        }
        if (tig == 0) {
            l_part[warp][row0]     = l[0];
            l_part[warp][row0 + 8] = l[1];
        }
    }
    __syncthreads();
    if (key_part == 0) {
#pragma unroll
        for (int q = 1; q < kKeyParts; q++) {
#pragma unroll
            for (int dt = 0; dt < kOutFrags; dt++) {
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    o[dt][c] += partials[(((warp + q) * kOutFrags + dt) * 4 + c) * kWarpSize + lane];
                }
            }
            l[0] += l_part[warp + q][row0];
            l[1] += l_part[warp + q][row0 + 8];
        }
    }
}

// Normalises the thread's two rows and stores them; a row without any finite score writes zeros (as
// the CPU kernel does). Ghost rows (row_r < 0) are not written.
template <int D>
__device__ __forceinline__ void store_rows(const attn_params & p, const int (&row_r)[2], const int (&row_h)[2],
                                           const float (&l)[2], const float (&o)[D / 8][4]) {
    const int tig = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (row_r[i] < 0) {
            continue;
        }
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        float * out = p.dst + ((int64_t) row_r[i] * p.in.n_head + row_h[i]) * D + 2 * tig;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const float2 val = l[i] > 0.0f ? make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv)
                                           : make_float2(0.0f, 0.0f);
            *reinterpret_cast<float2 *>(out + dt * 8) = val;
        }
    }
}

// Split walks: stores the thread's two rows' unnormalised state (max in the log2 domain, sum, O) as
// part `part_index` (= (b * n_head_kv + g) * n_parts + part) for dhsa_attn_merge_kernel. row_m is the row's
// index in its block, -1 for ghost rows (not written, and not read by the merge).
template <int D>
__device__ __forceinline__ void store_partial(const attn_params & p, int64_t part_index, const int (&row_m)[2],
                                              const float (&m)[2], const float (&l)[2], const float (&o)[D / 8][4]) {
    const int tig = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (row_m[i] < 0) {
            continue;
        }
        const int64_t row = part_index * p.part_rows + row_m[i];
        float * out = p.part_o + row * D + 2 * tig;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<float2 *>(out + dt * 8) = make_float2(o[dt][2 * i], o[dt][2 * i + 1]);
        }
        if (tig == 0) {
            p.part_ml[row] = make_float2(m[i], l[i]);
        }
    }
}

#endif  // DHSA_ATTN_NO_DEVICE_CODE

// ---- the kernel ---------------------------------------------------------------------------------

// One CTA: query block b, KV head g, rows [sub * rows_per_cta, ...) of the block's (row, head) pairs,
// and, for split kernels (kSplit) with n_parts > 1, part `part` of the block's keys.
// Warp w takes row group w / kKeyParts and, of every tile, key part w % kKeyParts.
// kSplit: the few-row kernels always carry the split code (n_parts decides at run time); the prefill
// kernels (kKeyParts = 1) come in two instances, so that the unsplit one is the kernel as it was.
template <int D, int kKeyParts, bool kSoftcap, bool kSplit>
__global__ void __launch_bounds__(attn_traits<D>::kMaxWarps * kWarpSize, 1)
dhsa_attn_kernel(const attn_params p) {
#ifndef DHSA_ATTN_NO_DEVICE_CODE
    if (skipped(p)) {
        return;
    }
    using T = tile_shape<D>;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ int cta_key_end;
    __shared__ __align__(8) int tile_keys[3][T::kTileKeys];  // key of each tile slot, -1: empty
    __shared__ int tile_count[3];                             // keys in each map, 0: past the last tile

    const int lane     = threadIdx.x % kWarpSize;
    const int warp     = threadIdx.x / kWarpSize;
    const int row_warp = warp / kKeyParts;
    const int key_part = warp % kKeyParts;
    const int rows_per_cta = (int) blockDim.x / (kWarpSize * kKeyParts) * kWarpRows;

    // Longest blocks (latest queries) first: less tail when causal work grows with the block index.
    // blockIdx.x = (block from the last * n_sub + sub) * n_parts + part; n_parts is 1 without kSplit.
    const int      part = kSplit ? (int) (blockIdx.x % p.n_parts) : 0;
    const unsigned cta  = kSplit ? blockIdx.x / p.n_parts : blockIdx.x;
    const int      b    = p.n_blocks - 1 - (int) (cta / p.n_sub);
    const int      sub  = (int) (cta % p.n_sub);
    const int      g    = (int) blockIdx.y;

    const int first_row     = b * p.q_block;
    const int rows_in_block = min(p.q_block, p.in.n_q - first_row) * p.group;  // flattened (row, head) pairs
    const int row0_flat     = sub * rows_per_cta;
    if (row0_flat >= rows_in_block) {
        return;  // a sub-tile past a short last block: no rows (uniform over the CTA)
    }

    // This thread's two rows.
    thread_row rows[2];
    int row_r[2], row_h[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int m = row0_flat + row_warp * kWarpRows + lane / 4 + 8 * i;
        row_r[i] = -1;
        row_h[i] = 0;
        rows[i]  = { 0, p.in.mask };
        if (m < rows_in_block) {
            row_r[i] = first_row + m / p.group;
            row_h[i] = g * p.group + m % p.group;
            rows[i]  = { min(__ldg(p.pos + row_r[i]) + 1, p.in.n_kv), p.in.mask + (int64_t) row_r[i] * p.in.mask_row };
        }
    }

    // Keys past the last row's position exist for no row of the warp (skipped) or of the CTA (not loaded).
    int warp_key_end = max(rows[0].key_end, rows[1].key_end);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        warp_key_end = max(warp_key_end, __shfl_xor_sync(0xffffffff, warp_key_end, off));
    }
    if (threadIdx.x == 0) {
        cta_key_end = 0;
    }
    __syncthreads();
    if (lane == 0) {
        atomicMax(&cta_key_end, warp_key_end);
    }

    // Q -> shared (f16, scaled) -> registers when they hold it.
    half * ring   = reinterpret_cast<half *>(smem);
    half * q_smem = reinterpret_cast<half *>(smem + T::kQOffset);
    load_q_tile<D>(p, q_smem, rows_per_cta, row0_flat, rows_in_block, first_row);
    __syncthreads();
    const int key_end = min(cta_key_end, p.in.n_kv);

    // The keys this CTA walks: [span.lo, span.hi) of the slot's ranges, from range span.range on.
    const int32_t * slot = p.slots + ((int64_t) b * p.in.n_head_kv + g) * p.slot_size;
    key_span span = { 0, key_end, 0 };
    __shared__ int64_t cta_part_index;  // where a split walk stores its state; read back at the end (in
                                        // shared memory, not kept live in registers across the tile loop)
    if constexpr (kSplit) {
        if (p.n_parts > 1) {
            if (threadIdx.x == 0) {
                cta_part_index = ((int64_t) b * p.in.n_head_kv + g) * p.n_parts + part;
            }
            span = find_part<T::kMaxWarps>(slot, key_end, part, p.n_parts);
        }
    }

    uint32_t q_frag[T::kQInRegisters ? D / 16 : 1][4];
    if constexpr (T::kQInRegisters) {
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            const int row = row_warp * kWarpRows + lane % 16, chunk = 2 * ks + lane / 16;
            ldmatrix_x4(q_frag[ks], smem_address(q_smem + swizzled<D>(row, chunk)));
        }
        __syncthreads();  // the ring overwrites Q's staging area from here on
    }

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    }
    float m_run[2] = { -INFINITY, -INFINITY };
    float l_run[2] = { 0.0f, 0.0f };

    const half * k_head  = p.in.k + (int64_t) g * p.in.k_head;
    const half * v_head  = p.v + (int64_t) g * p.v_head;
    const uint32_t ring_addr   = smem_address(ring);
    const uint32_t q_smem_addr = smem_address(q_smem);

    // Pipeline over packed tiles: while tile i is multiplied (ring stage i % 2), tile i + 1 is in
    // flight to the other stage and the last warp builds the key map of tile i + 2 (three maps in
    // rotation); the walk's load latency then hides behind the other warps' mmas instead of stalling
    // the whole CTA between two barriers. The barrier after each tile keeps the next iteration's
    // writes off the stage and the map still being read.
    const bool is_builder = warp == (int) blockDim.x / kWarpSize - 1;
    range_walker walker;
    if (is_builder) {
        seek_range(slot, span.range, span.lo, span.hi, walker);
        build_key_map<T::kTileKeys>(slot, span.lo, span.hi, walker, tile_keys[0], &tile_count[0]);
        build_key_map<T::kTileKeys>(slot, span.lo, span.hi, walker, tile_keys[1], &tile_count[1]);
    }
    __syncthreads();
    if (tile_count[0] > 0) {
        load_kv_tile<D>(p, k_head, v_head, tile_keys[0], ring);
    }
    cp_async_commit();
    tile_mask<D, kKeyParts> mask, mask_next;  // the mask of tile i and of tile i + 1
    load_tile_mask<D, kKeyParts>(p, tile_keys[0], key_part, rows, mask);
    for (int i = 0; tile_count[i % 3] > 0; i++) {
        const int stage = i % 2;
        if (tile_count[(i + 1) % 3] > 0) {
            load_kv_tile<D>(p, k_head, v_head, tile_keys[(i + 1) % 3], ring + (stage ^ 1) * (T::kStageBytes / 2));
        }
        cp_async_commit();
        load_tile_mask<D, kKeyParts>(p, tile_keys[(i + 1) % 3], key_part, rows, mask_next);  // past the end: no loads
        cp_async_wait<1>();  // tile i has landed (tile i + 1 may still be in flight)
        __syncthreads();

        if (is_builder) {
            build_key_map<T::kTileKeys>(slot, span.lo, span.hi, walker, tile_keys[(i + 2) % 3],
                                        &tile_count[(i + 2) % 3]);
        }
        // Warp-uniform skip: keys ascend, so the part's first key is its smallest. Its first slot may
        // be a parity gap, never its first two (both empty: the part is past the last key).
        const int * part_keys = tile_keys[i % 3] + key_part * (T::kTileKeys / kKeyParts);
        const int first_key   = part_keys[0] >= 0 ? part_keys[0] : part_keys[1];
        if ((unsigned) first_key < (unsigned) warp_key_end) {
            const uint32_t k_addr = ring_addr + stage * T::kStageBytes;
            attend_tile<D, kKeyParts, kSoftcap>(p, row_warp, key_part, q_smem_addr, q_frag, k_addr,
                                                k_addr + T::kTileBytes, mask, o, m_run, l_run);
        }
        __syncthreads();
        mask = mask_next;
    }

    // Row sums: the four threads of a quad hold partial sums of the same row.
    float l[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] = l_run[i];
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    }
    if constexpr (kKeyParts > 1) {
        __shared__ float m_part[T::kMaxWarps][kWarpRows], l_part[T::kMaxWarps][kWarpRows];
        merge_key_parts<D, kKeyParts>(reinterpret_cast<float *>(smem), m_part, l_part, key_part, m_run, l, o);
        if (key_part != 0) {
            return;
        }
    }
    if constexpr (kSplit) {
        if (p.n_parts > 1) {  // a part of the keys: the merge kernel normalises and writes dst
            // The row's index in its block (few-row kernels: n_sub is 1, the CTA starts at row 0).
            const int row_base = (kKeyParts > 1 ? 0 : row0_flat) + row_warp * kWarpRows + lane / 4;
            int row_m[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                row_m[i] = row_r[i] < 0 ? -1 : row_base + 8 * i;
            }
            store_partial<D>(p, cta_part_index, row_m, m_run, l, o);
            return;
        }
    }
    store_rows<D>(p, row_r, row_h, l, o);
#else
    (void) p;
    __trap();  // built for an architecture without the sm_80 instructions: dhsa_cuda_attn_supported is false
#endif
}

// ---- split walks: the merge ----------------------------------------------------------------------

constexpr int kSplitMaxParts = 256;  // at most one part per thread of the merge kernel
constexpr int kMergeThreads  = 256;
static_assert(kSplitMaxParts <= kMergeThreads, "one part's (max, sum) per merge thread");

// Reduction over the CTA of the merge kernel (a value per thread -> the result in every thread).
template <bool kMax>
__device__ __forceinline__ float merge_reduce(float x, float * red) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const float y = __shfl_xor_sync(0xffffffff, x, off);
        x = kMax ? fmaxf(x, y) : x + y;
    }
    if (threadIdx.x % kWarpSize == 0) {
        red[threadIdx.x / kWarpSize] = x;
    }
    __syncthreads();
    x = red[0];
#pragma unroll
    for (int w = 1; w < kMergeThreads / kWarpSize; w++) {
        x = kMax ? fmaxf(x, red[w]) : x + red[w];
    }
    __syncthreads();  // red is reused by the next reduction
    return x;
}

// Merges the n_parts states of one row of one (block, KV head) and writes its dst row as store_rows
// does: O / l, zeros for a row without a finite score. One CTA per row, with every part's loads in
// flight at once (a loop over the parts in one warp would wait one memory latency per part): thread t
// takes part t's (max, sum); then kGroups threads per float4 column of O each sum every kGroups-th
// part, and shared memory adds up the groups.
template <int D>
__global__ void __launch_bounds__(kMergeThreads) dhsa_attn_merge_kernel(const attn_params p) {
#ifndef DHSA_ATTN_NO_DEVICE_CODE
    if (skipped(p)) {
        return;
    }
    constexpr int kCols   = D / 4;                  // float4 columns of a row
    constexpr int kGroups = kMergeThreads / kCols;  // threads per column
    __shared__ float weight[kSplitMaxParts];
    __shared__ float red[kMergeThreads / kWarpSize];
    __shared__ float4 group_sum[kGroups][kCols];

    const int64_t slot_index = blockIdx.x / p.part_rows;  // b * n_head_kv + g
    const int m = (int) (blockIdx.x % p.part_rows);
    const int b = (int) (slot_index / p.in.n_head_kv), g = (int) (slot_index % p.in.n_head_kv);
    const int first_row = b * p.q_block;
    if (m >= min(p.q_block, p.in.n_q - first_row) * p.group) {
        return;  // past the rows of a short last block (uniform over the CTA)
    }

    // Part q's state of this row is at row0 + q * part_rows. A part without a finite score has max
    // -inf and weight 0; if no part has one, the reference is 0 (no -inf - -inf) and l stays 0.
    const int64_t row0 = slot_index * p.n_parts * p.part_rows + m;
    const int t = threadIdx.x;
    const float2 state = t < p.n_parts ? p.part_ml[row0 + (int64_t) t * p.part_rows] : make_float2(-INFINITY, 0.0f);
    const float  m_max = merge_reduce<true>(state.x, red);
    const float  w     = exp2f(state.x - (m_max == -INFINITY ? 0.0f : m_max));
    if (t < p.n_parts) {
        weight[t] = w;
    }
    const float l = merge_reduce<false>(state.y * w, red);  // also orders the weight stores

    const int col = t % kCols, group = t / kCols;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int q = group; q < p.n_parts; q += kGroups) {
        const float   wq  = weight[q];
        const float * src = p.part_o + (row0 + (int64_t) q * p.part_rows) * D + 4 * col;
        const float4  x   = *reinterpret_cast<const float4 *>(src);
        acc.x = fmaf(x.x, wq, acc.x);
        acc.y = fmaf(x.y, wq, acc.y);
        acc.z = fmaf(x.z, wq, acc.z);
        acc.w = fmaf(x.w, wq, acc.w);
    }
    group_sum[group][col] = acc;
    __syncthreads();
    if (group == 0) {
        for (int k = 1; k < kGroups; k++) {
            const float4 x = group_sum[k][col];
            acc.x += x.x; acc.y += x.y; acc.z += x.z; acc.w += x.w;
        }
        const int r = first_row + m / p.group, h = g * p.group + m % p.group;
        float * out = p.dst + ((int64_t) r * p.in.n_head + h) * D + 4 * col;
        const float inv  = l > 0.0f ? 1.0f / l : 0.0f;
        const bool  seen = l > 0.0f;  // a row without a finite score writes zeros
        *reinterpret_cast<float2 *>(out)     = seen ? make_float2(acc.x * inv, acc.y * inv) : make_float2(0.0f, 0.0f);
        *reinterpret_cast<float2 *>(out + 2) = seen ? make_float2(acc.z * inv, acc.w * inv) : make_float2(0.0f, 0.0f);
    }
#else
    (void) p;
    __trap();
#endif
}

// The merge of split prefill launches: many rows (n_blocks * n_head_kv * part_rows, thousands) and few
// parts (2 to 16), so one warp per row. Every lane reads each part's (max, sum) (one broadcast load)
// and sums the weighted O of its float4 columns; the loads do not depend on the sums, so those of
// several parts are in flight at once. Writes dst as store_rows does (zeros where the sum is 0).
constexpr int kMergeRowsWarps = 8;  // rows per CTA

template <int D>
__global__ void __launch_bounds__(kMergeRowsWarps * kWarpSize) dhsa_attn_merge_rows_kernel(const attn_params p) {
#ifndef DHSA_ATTN_NO_DEVICE_CODE
    if (skipped(p)) {
        return;
    }
    constexpr int kCols    = D / 4;                                  // float4 columns of a row
    constexpr int kPerLane = (kCols + kWarpSize - 1) / kWarpSize;    // 1 (d = 64: lanes 0..15), 1, 2
    const int lane = threadIdx.x % kWarpSize;
    const int64_t row_index = (int64_t) blockIdx.x * kMergeRowsWarps + threadIdx.x / kWarpSize;
    const int64_t slot_index = row_index / p.part_rows;  // b * n_head_kv + g
    if (slot_index >= (int64_t) p.n_blocks * p.in.n_head_kv) {
        return;
    }
    const int m = (int) (row_index % p.part_rows);
    const int b = (int) (slot_index / p.in.n_head_kv), g = (int) (slot_index % p.in.n_head_kv);
    const int first_row = b * p.q_block;
    if (m >= min(p.q_block, p.in.n_q - first_row) * p.group) {
        return;  // past the rows of a short last block (uniform over the warp)
    }

    // Part q's state of this row is at row0 + q * part_rows.
    const int64_t row0 = slot_index * p.n_parts * p.part_rows + m;
    float m_max = -INFINITY;
    for (int q = lane; q < p.n_parts; q += kWarpSize) {
        m_max = fmaxf(m_max, p.part_ml[row0 + (int64_t) q * p.part_rows].x);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffff, m_max, off));
    }
    const float m_ref = m_max == -INFINITY ? 0.0f : m_max;  // no part with a finite score: l stays 0

    float  l = 0.0f;  // the same in every lane (same loads, same order)
    float4 acc[kPerLane];
#pragma unroll
    for (int c = 0; c < kPerLane; c++) {
        acc[c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll 4
    for (int q = 0; q < p.n_parts; q++) {
        const int64_t row = row0 + (int64_t) q * p.part_rows;
        const float2  ml  = p.part_ml[row];
        const float   w   = exp2f(ml.x - m_ref);  // 0 for a part without a finite score (its O is 0)
        l = fmaf(ml.y, w, l);
#pragma unroll
        for (int c = 0; c < kPerLane; c++) {
            const int col = lane + c * kWarpSize;
            if (col < kCols) {
                const float4 x = *reinterpret_cast<const float4 *>(p.part_o + row * D + 4 * col);
                acc[c].x = fmaf(x.x, w, acc[c].x);
                acc[c].y = fmaf(x.y, w, acc[c].y);
                acc[c].z = fmaf(x.z, w, acc[c].z);
                acc[c].w = fmaf(x.w, w, acc[c].w);
            }
        }
    }

    const int r = first_row + m / p.group, h = g * p.group + m % p.group;
    float * out = p.dst + ((int64_t) r * p.in.n_head + h) * D;
    const float inv  = l > 0.0f ? 1.0f / l : 0.0f;
    const bool  seen = l > 0.0f;  // a row without a finite score writes zeros
#pragma unroll
    for (int c = 0; c < kPerLane; c++) {
        const int col = lane + c * kWarpSize;
        if (col < kCols) {
            float * o4 = out + 4 * col;  // dst is only 8-byte aligned: two float2 stores
            *reinterpret_cast<float2 *>(o4) = seen ? make_float2(acc[c].x * inv, acc[c].y * inv) : make_float2(0.0f, 0.0f);
            *reinterpret_cast<float2 *>(o4 + 2) = seen ? make_float2(acc[c].z * inv, acc[c].w * inv) : make_float2(0.0f, 0.0f);
        }
    }
#else
    (void) p;
    __trap();
#endif
}

// ---- host side ----------------------------------------------------------------------------------

// Split walks. A part is at least kSplitMinKeys cache cells (at 30% density about 5 tiles of 64 keys,
// enough to amortise its setup: range scan, Q, pipeline fill). The scratch is sized for at most
// kSplitMaxCtas CTAs per few-row launch and kSplitMaxRows partial rows per prefill launch (pure
// functions of the arguments, no device query); the launch takes as many parts as fit the device.
constexpr int64_t kSplitMinKeys = 1024;
constexpr int64_t kSplitMaxCtas = 1024;
// Prefill kernels hold ~128 rows per SM (d <= 128: one CTA of 8 warps; d = 256: two of 4 warps), so
// 32768 rows are about two waves on 128 SMs: scratch <= 32768 * (4 d + 8) bytes (17 MB for d = 128).
constexpr int64_t kSplitMaxRows = 32768;

// How a launch is laid out; dhsa_cuda_attn_scratch_size and dhsa_cuda_attn derive it the same way.
struct attn_plan {
    int64_t block_rows;  // (query row, head) pairs of a full block
    int64_t n_blocks;
    int64_t n_sub;       // CTAs per (block, KV head) along the rows
    int     cta_groups;  // 16-row groups per CTA
    bool    split_keys;  // few rows: T::kMaxKeyParts warps per row group split every tile's keys
    int     max_parts;   // most CTAs per (block, KV head, sub-tile) along the keys (1: no split)
};

template <int D>
attn_plan make_plan(const dhsa_cuda_attn_args & a) {
    using T = attn_traits<D>;
    const int64_t group = a.in.n_head / a.in.n_head_kv;
    attn_plan plan;
    // Rows of one block: (query row, head) pairs, in groups of 16 (one per warp). Few groups (decode,
    // short ubatches) split every tile's keys between T::kMaxKeyParts warps per group instead, and the
    // block's keys between CTAs when the blocks alone give too few CTAs.
    plan.block_rows = (int64_t) (a.q_block < a.in.n_q ? a.q_block : a.in.n_q) * group;
    const int64_t row_groups = (plan.block_rows + kWarpRows - 1) / kWarpRows;
    plan.split_keys = row_groups * T::kMaxKeyParts <= T::kMaxWarps;
    plan.cta_groups = (int) (row_groups < T::kMaxWarps ? row_groups : T::kMaxWarps);
    plan.n_sub      = (row_groups + plan.cta_groups - 1) / plan.cta_groups;
    plan.n_blocks   = ((int64_t) a.in.n_q + a.q_block - 1) / a.q_block;
    int64_t parts = plan.split_keys ? kSplitMaxCtas / (plan.n_blocks * a.in.n_head_kv)
                                    : kSplitMaxRows / (plan.n_blocks * a.in.n_head_kv * plan.block_rows);
    parts = parts < a.in.n_kv / kSplitMinKeys ? parts : a.in.n_kv / kSplitMinKeys;
    parts = parts < kSplitMaxParts ? parts : kSplitMaxParts;
    if (!plan.split_keys && parts < 3) {
        // A prefill grid of more than kSplitMaxRows / 3 rows (85+ CTAs of 128 rows) is more than half
        // a wave on any device of up to ~170 SMs, so 2 parts would not fit in one wave: no scratch.
        parts = 1;
    }
    plan.max_parts = (int) (parts > 1 ? parts : 1);
    return plan;
}

// Scratch of a split launch: the partial O (d floats) of every (block, KV head, part, row), then its
// (max, sum). split_rows: the number of such rows.
size_t split_rows(const attn_plan & plan, const dhsa_cuda_attn_args & a) {
    return plan.max_parts > 1 ? (size_t) plan.n_blocks * a.in.n_head_kv * plan.max_parts * plan.block_rows : 0;
}

size_t split_scratch_bytes(const attn_plan & plan, const dhsa_cuda_attn_args & a) {
    return split_rows(plan, a) * ((size_t) a.in.d * sizeof(float) + sizeof(float2));
}

// Lets dhsa_attn_kernel<...> use more than 48 KB of dynamic shared memory, once per device (the
// attribute belongs to the device's context; a repeated set is harmless).
template <int D, int kKeyParts, bool kSoftcap, bool kSplit>
cudaError_t allow_smem(size_t smem) {
    using T = attn_traits<D>;
    if (smem <= 48 * 1024) {
        return cudaSuccess;
    }
    constexpr int kMaxDevices = 64;
    static bool opted_in[kMaxDevices] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) {
        return err;
    }
    if (device < 0 || device >= kMaxDevices || !opted_in[device]) {
        err = cudaFuncSetAttribute(dhsa_attn_kernel<D, kKeyParts, kSoftcap, kSplit>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int) T::smem_bytes(T::kMaxWarps * kWarpRows));
        if (err != cudaSuccess) {
            return err;
        }
        if (device >= 0 && device < kMaxDevices) {
            opted_in[device] = true;
        }
    }
    return cudaSuccess;
}

// CTAs of dhsa_attn_kernel<...> with n_warps warps (and their shared memory, allowed by allow_smem)
// that the current device holds at once; 0 if unknown. Cached per kernel, device and block size.
template <int D, int kKeyParts, bool kSoftcap, bool kSplit>
int64_t resident_ctas(int n_warps, size_t smem) {
    constexpr int kMaxDevices = 64;
    static int64_t cache[kMaxDevices][attn_traits<D>::kMaxWarps + 1] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
        return 0;
    }
    const bool cached = device >= 0 && device < kMaxDevices && n_warps <= attn_traits<D>::kMaxWarps;
    if (cached && cache[device][n_warps] > 0) {
        return cache[device][n_warps];
    }
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, dhsa_attn_kernel<D, kKeyParts, kSoftcap, kSplit>,
                                                      n_warps * kWarpSize, smem) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
        (void) cudaGetLastError();  // not knowing only means not splitting
        return 0;
    }
    if (cached) {
        cache[device][n_warps] = (int64_t) per_sm * sms;
    }
    return (int64_t) per_sm * sms;
}

// Parts per CTA of a prefill grid of `ctas` CTAs (1: no split) on a device holding `wave` at once.
// With equal CTAs the time is about ceil(ctas * parts / wave) / parts of the unsplit one; a larger
// count is taken only if it gains 10% (each part costs a setup and merge traffic). At most two waves:
// a grid that fills the device already is not split.
int prefill_parts(int64_t ctas, int64_t wave, int max_parts) {
    if (wave <= 0 || ctas >= wave) {
        return 1;
    }
    int best = 1;
    double best_time = 1.0;
    for (int parts = 2; parts <= max_parts && ctas * parts <= 2 * wave; parts++) {
        const double time = (double) ((ctas * parts + wave - 1) / wave) / parts;
        if (time < 0.9 * best_time) {
            best      = parts;
            best_time = time;
        }
    }
    return best;
}

template <int D, int kKeyParts, bool kSoftcap, bool kSplit>
cudaError_t launch_kernel(attn_params p, int n_warps, cudaStream_t stream) {
    using T = attn_traits<D>;
    const auto kernel = dhsa_attn_kernel<D, kKeyParts, kSoftcap, kSplit>;
    const size_t smem = T::smem_bytes(n_warps / kKeyParts * kWarpRows);
    cudaError_t err = allow_smem<D, kKeyParts, kSoftcap, kSplit>(smem);
    if (err != cudaSuccess) {
        return err;
    }
    if (kKeyParts > 1 && p.n_parts > 1) {
        // As many parts as keep the grid in one wave of resident CTAs (a second wave of a few CTAs
        // would add a whole part's time), and at most what the scratch holds (p.n_parts on entry).
        const int64_t slots = (int64_t) p.n_blocks * p.in.n_head_kv;
        const int64_t parts = resident_ctas<D, kKeyParts, kSoftcap, kSplit>(n_warps, smem) / slots;
        p.n_parts = (int32_t) (parts < 1 ? 1 : parts < p.n_parts ? parts : p.n_parts);
    }
    const dim3 grid((unsigned) ((int64_t) p.n_blocks * p.n_sub * p.n_parts), (unsigned) p.in.n_head_kv);
    kernel<<<grid, n_warps * kWarpSize, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess || !kSplit || p.n_parts == 1) {
        return err;
    }
    const int64_t rows = (int64_t) p.n_blocks * p.in.n_head_kv * p.part_rows;
    if constexpr (kKeyParts > 1) {
        dhsa_attn_merge_kernel<D><<<(unsigned) rows, kMergeThreads, 0, stream>>>(p);  // one CTA per row
    } else {
        const int64_t ctas = (rows + kMergeRowsWarps - 1) / kMergeRowsWarps;           // one warp per row
        dhsa_attn_merge_rows_kernel<D><<<(unsigned) ctas, kMergeRowsWarps * kWarpSize, 0, stream>>>(p);
    }
    return cudaGetLastError();
}

// Prefill (kKeyParts = 1): the unsplit kernel, or, when its grid leaves much of the device idle and
// the scratch allows (p.n_parts = the plan's max_parts on entry), the split one and the merge.
template <int D, bool kSoftcap>
cudaError_t launch_prefill(attn_params p, int n_warps, cudaStream_t stream) {
    using T = attn_traits<D>;
    if (p.n_parts > 1) {
        const size_t  smem = T::smem_bytes(n_warps * kWarpRows);
        const int64_t ctas = (int64_t) p.n_blocks * p.n_sub * p.in.n_head_kv;
        int64_t wave = 0;
        if (allow_smem<D, 1, kSoftcap, true>(smem) == cudaSuccess) {
            wave = resident_ctas<D, 1, kSoftcap, true>(n_warps, smem);
        } else {
            (void) cudaGetLastError();  // not splitting is always possible
        }
        p.n_parts = prefill_parts(ctas, wave, p.n_parts);
        if (p.n_parts > 1) {
            return launch_kernel<D, 1, kSoftcap, true>(p, n_warps, stream);
        }
    }
    p.n_parts = 1;
    return launch_kernel<D, 1, kSoftcap, false>(p, n_warps, stream);
}

template <int D>
cudaError_t launch_attn(const dhsa_cuda_attn_args & a, cudaStream_t stream) {
    using T = attn_traits<D>;
    attn_params p = {};
    p.in = a.in;
    p.v = a.v;       p.v_row = a.v_row;       p.v_head = a.v_head;
    p.pos       = a.sel;
    p.slots     = a.sel + a.in.n_q + 1;  // DHSA_SEL_HEADER(n_q) of ggml-dhsa.h: positions, then the sparse flag
    p.slot_size = 1 + 2 * (int64_t) a.max_ranges;
    p.dst       = a.dst;
    p.q_block = a.q_block;
    p.group   = a.in.n_head / a.in.n_head_kv;
    p.run_if  = a.run_if;

    // ggml's conventions: q is scaled before its f16 conversion; with soft-capping the scale is
    // scale / softcap and the score softcap * tanh(.). log2(e) goes into q (or the cap) for exp2.
    const bool softcap = a.softcap > 0.0f;
    p.q_scale       = softcap ? a.scale / a.softcap : a.scale * kLog2e;
    p.softcap_log2e = softcap ? a.softcap * kLog2e : 0.0f;

    const auto aligned16 = [](const void * ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; };
    p.mask_words = (reinterpret_cast<uintptr_t>(a.in.mask) & 3) == 0 && a.in.mask_row % 2 == 0;
    p.kv_aligned = aligned16(a.in.k) && aligned16(a.v) && a.in.k_row % 8 == 0 && a.in.k_head % 8 == 0 && a.v_row % 8 == 0 &&
                   a.v_head % 8 == 0;

    const attn_plan plan = make_plan<D>(a);
    if (plan.block_rows > INT_MAX || plan.n_blocks * plan.n_sub * plan.max_parts > INT_MAX || a.in.n_head_kv > 65535) {
        return cudaErrorInvalidValue;
    }
    p.n_blocks  = (int32_t) plan.n_blocks;
    p.n_sub     = (int32_t) plan.n_sub;
    p.n_parts   = plan.max_parts;  // launch_kernel takes at most this many
    p.part_rows = (int32_t) plan.block_rows;
    if (plan.max_parts > 1) {
        if (!a.scratch || !aligned16(a.scratch)) {  // the merge reads partial O rows as float4
            return cudaErrorInvalidValue;
        }
        p.part_o  = static_cast<float *>(a.scratch);
        p.part_ml = reinterpret_cast<float2 *>(p.part_o + split_rows(plan, a) * D);
    }

    if (plan.split_keys) {
        const int n_warps = plan.cta_groups * T::kMaxKeyParts;
        return softcap ? launch_kernel<D, T::kMaxKeyParts, true, true>(p, n_warps, stream)
                       : launch_kernel<D, T::kMaxKeyParts, false, true>(p, n_warps, stream);
    }
    return softcap ? launch_prefill<D, true>(p, plan.cta_groups, stream)
                   : launch_prefill<D, false>(p, plan.cta_groups, stream);
}

// The argument checks of dhsa_cuda_attn that do not depend on pointers.
bool args_valid(const dhsa_cuda_attn_args * a) {
    return a && a->in.n_q >= 0 && a->in.n_kv >= 0 && a->in.n_head > 0 && a->in.n_head_kv > 0 && a->in.n_head % a->in.n_head_kv == 0 &&
           a->q_block > 0 && a->max_ranges >= 0;
}

}  // namespace

// Bytes of scratch for the split walks (few-row blocks, and prefill grids that underfill the device);
// 0 when the launch never splits. A function of n_q, n_head, n_head_kv, d, q_block and n_kv only.
size_t dhsa_cuda_attn_scratch_size(const dhsa_cuda_attn_args * a) {
    if (!args_valid(a) || a->in.n_q == 0) {
        return 0;
    }
    switch (a->in.d) {
        case 64:  return split_scratch_bytes(make_plan<64>(*a), *a);
        case 128: return split_scratch_bytes(make_plan<128>(*a), *a);
        case 256: return split_scratch_bytes(make_plan<256>(*a), *a);
        default:  return 0;
    }
}

bool dhsa_cuda_attn_supported(int32_t d, int compute_capability) {
    return (d == 64 || d == 128 || d == 256) && compute_capability >= 800;
}

cudaError_t dhsa_cuda_attn(const dhsa_cuda_attn_args * a, cudaStream_t stream) {
    if (!args_valid(a)) {
        return cudaErrorInvalidValue;
    }
    if (a->in.n_q == 0) {
        return cudaGetLastError();  // nothing to write
    }
    if (!a->in.q || !a->in.k || !a->v || !a->in.mask || !a->sel || !a->dst) {
        return cudaErrorInvalidValue;
    }
    switch (a->in.d) {
        case 64:  return launch_attn<64>(*a, stream);
        case 128: return launch_attn<128>(*a, stream);
        case 256: return launch_attn<256>(*a, stream);
        default:  return cudaErrorInvalidValue;
    }
}
