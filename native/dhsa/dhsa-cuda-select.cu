// dhsa-cuda-select.cu: DHSA selection on the GPU (dhsa_cuda_select, declared in dhsa-cuda.h).
//
// Writes exactly what the CPU op ggml_compute_forward_dhsa_select (ggml-cpu-dhsa.cpp) writes into the
// selection tensor, int32 for int32: row positions, the sparse flag and the per (query block, KV head)
// range lists, computed with the algorithm of dhsa-select.c (contract: ALGORITHM.md; the aligned
// 512-cell segments: ENGINE.md). Notes on the design: CUDA-SELECT-NOTES.md.
//
// Exactness. Selection is a discrete decision, so every float32 value that is compared (keysim scores,
// chunk scores) must be the CPU's to the bit:
//  - every float op is an explicit IEEE intrinsic (__fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn,
//    __fsqrt_rn): the compiler never contracts them into FMAs (whatever -fmad says) and they are
//    correctly rounded whatever -prec-div / -prec-sqrt say;
//  - every sum runs in the C code's order, from +0.0f, one rounding per add; threads only split
//    independent values (candidate cuts, chunks, heads, lanes of a vector sum), never one sum;
//  - orders are total ((score desc, index asc), -0.0 == +0.0), so ties resolve as qsort's comparator.
// Do not build this file with -use_fast_math or -ftz=true: flushing denormals changes float32 results.
//
// Pipeline (one stream; every temporary lives in a->scratch; the per-layer segment cache a->cache, when
// given, is device memory allocated only when it must grow, the one time the host synchronises).
// Grids are sized from host-known bounds (n_kv, n_q, heads, params); kernels read the actual query
// position, sparse flag, cache hits and chunk counts from device memory and return early where there is
// no work.
//   kernel          computes                                               grid x block
//   prologue        query-block sums Qb (a CTA per 32 lanes of a (block,   n_blocks H_kv ceil(d / 32)
//                   KV head), staged in shared memory); pos[r] = last      + ceil(n_q / 8) (+ n_kv / 512)
//                   unmasked key of mask row r (warp per row); with a      x 256
//                   cache, the fingerprint of every complete segment of
//                   n_kv and whether its entry matches (CTA per segment)
//   keysim          control (sparse, n_eff; every CTA votes, CTA 0 stores) min(items, 4 per SM) x 128
//                   and the cache hits (CTA 0); dist_h of every candidate   (at most 128 items a CTA)
//                   cut of the segments that miss, per KV head (items of
//                   128 candidates, looped over by the CTAs)
//   segment_cuts    scores (sum of dist_h in h order), rank, greedy NMS,    n_seg x 512
//                   split (or fixed cuts) per segment
//   kc_and_bounds   chunk sums Kc (8 chunks x 256 (head, lane) pairs per    n_seg x ceil(seg_cap / 8)
//                   CTA); the first CTA of a segment places its cuts in      x ceil(H_kv d / 256) x 256
//                   the sequence's bounds and updates its cache entry
//   chunk_scores    S = Qb . Kc and rank entries, a thread per (chunk, KV   (H_kv n_blocks,
//                   head, query block)                                        chunk_cap / 128) x 128
//   select_ranges   weighted radix select of the take threshold, range runs n_blocks H_kv x 512
//                   per (block, KV head); the last CTA writes the sparse
//                   flag, and dense slots when a list overflowed
// (control replaces keysim..chunk_scores when the parameters rule out a sparse selection; select_ranges
// then writes dense slots.) On sm_90 every kernel after the prologue is launched with programmatic
// dependent launch (pdl_wait below), so that launches overlap the previous kernel's tail.
//
// Segment cache (the CPU op's segment_cache, ENGINE.md). The cuts and Kc of segment s live in the cache
// memory itself (entry s), so a hit needs no copy: keysim, cuts and Kc of a hit segment are skipped and the
// later kernels read the entry. An entry is used when it is valid and its fingerprint equals the one
// computed from the keys of this call: a 64-bit hash of the first 16 bytes of every (key row, KV head) the
// segment's selection reads (the segment's rows, plus the rows before it that keysim's left windows reach
// when window > chunk_min), the row and head positions, the chunking parameters, H_kv, d and the entry
// layout. Only complete segments of the keys that exist (q_pos0 + n_q) become valid, and only when they
// did not fail (too many chunks); a miss invalidates the entry before it is rewritten.

#include "dhsa-cuda.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <new>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__USE_FAST_MATH__)
#    error "dhsa-cuda-select.cu must not be compiled with -use_fast_math: selection needs IEEE float32 results"
#endif

namespace {

// Keys are chunked in aligned segments of this many cells. Must equal DHSA_SEGMENT in ggml-dhsa.h (not
// included here, so that this file does not depend on ggml's headers).
constexpr int kSegment = 512;

constexpr unsigned       kFullMask   = 0xffffffffu;
constexpr unsigned short kHalfNegInf = 0xfc00;  // f16 -inf: the only mask value that hides a key

// ---------------------------------------------------------------------------------------------------
// IEEE float32 operations: one rounding each, never fused, never approximated.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ float add_f32(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_f32(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_f32(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_f32(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_f32(float a) { return __fsqrt_rn(a); }

// A uint32 that sorts ascending in DESCENDING score order (the order of ranked_cmp in dhsa-select.c).
// -0.0 and +0.0 compare equal there, so both map to the key of +0.0. Scores are finite (NaN has no order).
// Programmatic dependent launch (sm_90+): every kernel after the first is launched with
// programmaticStreamSerializationAllowed, so that its launch and CTA set-up overlap the previous kernel's
// tail. Each kernel's first statement is pdl_wait(), executed by every CTA before any read: it returns once
// the previous kernel has completed and its memory is visible (a no-op when the kernel was launched
// without the attribute, and before sm_90). Because every CTA waits before it can exit, a kernel completes
// only after its predecessor, so the chain stays in stream order transitively. pdl_launch_dependents()
// lets the next kernel be launched once every CTA of this one has issued it or exited.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t descending_key(float score) {
    const uint32_t bits      = score == 0.0f ? 0u : __float_as_uint(score);
    const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ~ascending;
}

// ---------------------------------------------------------------------------------------------------
// The plan: every host-known size, the inputs, the output and the scratch sub-buffers.
// ---------------------------------------------------------------------------------------------------

// Values the kernels produce for each other at run time (first bytes of the scratch).
struct select_control {
    int32_t sparse;    // the CPU's `sparse`: one sequence in consecutive cells, enough keys, budget < 1
    int32_t n_eff;     // keys that exist: q_pos0 + n_q (0 when not sparse)
    int32_t q_pos0;    // position of query row 0
    int32_t failed;    // a segment has too many chunks or a range list overflows: dense fallback
    int32_t n_chunks;  // chunks of [0, n_eff)
    int32_t done;      // CTAs of select_ranges_kernel that have finished (the last one writes the flag)
};

struct select_plan {
    dhsa_cuda_views in;  // the inputs (dhsa-cuda.h)
    int32_t group;       // n_head / n_head_kv (G)

    // parameters (dhsa_params) and the CPU op's settings
    double  budget;
    int32_t boundary, chunk_min, chunk_max, chunk_avg, window, q_block, sink_tokens, local_tokens, dense_from;
    int32_t min_context, max_ranges, slot_size;
    int32_t sparse_allowed;  // parameters valid and budget < 1 (else the CPU op is dense)

    // host-known sizes
    int32_t n_blocks;        // query blocks: ceil(n_q / q_block)
    int32_t n_seg;           // segments of n_kv: an upper bound of the segments of n_eff
    int32_t seg_chunks;      // more chunks than this in a segment: failure, as the CPU op
    int32_t seg_cap;         // Kc slots per segment: min(seg_chunks, kSegment)
    int32_t n_pairs;         // (KV head, lane) pairs of a key row: n_head_kv * d
    int32_t chunk_cap;       // bound of the chunk count: min(n_kv, n_seg * seg_cap)
    int32_t bitmap_words;    // ceil(chunk_cap / 32): the taken-chunk bitmap of select_ranges_kernel (shared memory)
    int32_t keysim_parts;    // CTAs per segment and KV head in keysim_and_qb (0: no keysim)
    int32_t qb_ctas;         // CTAs of prologue_kernel computing Qb (kQbLanes lanes of one (block, KV head) each)
    int32_t row_ctas;        // CTAs of prologue_kernel after them computing row positions
    int32_t fp_segments;     // CTAs after those computing the fingerprints of segments 0 .. fp_segments - 1
    int32_t score_tiles;     // CTAs of chunk_scores_kernel along the query blocks (kScoreBlocks blocks each)
    int32_t kc_groups;       // CTAs per segment along its chunks in kc_and_bounds
    int32_t kc_pair_tiles;   // CTAs per segment along the (head, lane) pairs in kc_and_bounds
    int32_t keys_vectorized; // K rows and heads 16-byte aligned, d % 8 == 0: 16-byte key loads

    // output
    int32_t * sel;           // [n_q positions][flag][slots]

    // scratch
    select_control *     ctrl;
    float *              cut_scores;  // [n_seg][n_head_kv][kSegment]: dist_h of candidate t_lo + i (keysim only)
    int32_t *            bounds;      // [chunk_cap + 1]: b_0 = 0 < b_1 < ... < b_Nc = n_eff
    int32_t *            chunk_slot;  // [chunk_cap]: chunk -> Kc slot (segment * seg_cap + chunk in segment)
    int32_t *            block_chunks;// [n_blocks]: chunks starting by the block's last query position
    float *              qb;          // [n_blocks][n_head_kv][d]
    unsigned long long * rank;        // [n_blocks * n_head_kv][chunk_cap]: descending score key << 32 | weight

    // Per-segment results: entries of the cache when there is one (kept between calls), else scratch.
    int32_t * seg_cuts;  // [segments][1 + kSegment]: count (-1: failure), then cuts in (seg0, seg1]
    float *   kc;        // [segments][n_pairs][seg_cap]: Kc of the segment's chunks, transposed so that chunk
                         // scores read consecutive chunks of one (head, lane) pair from consecutive addresses

    // Segment cache (use_cache = 0: none, the pointers below are unused)
    int32_t              use_cache;
    unsigned long long * fp_new;       // scratch [n_seg]: fingerprints of this call's complete segments of n_kv
    int32_t *            fp_match;     // scratch [n_seg]: entry s is valid and its fingerprint is fp_new[s]
    int32_t *            seg_hit;      // scratch [n_seg]: 1 when entry s is used as is (cuts and Kc skipped)
    unsigned long long * cache_fp;     // cache [segments]: the fingerprint entry s was computed from
    int32_t *            cache_valid;  // cache [segments]: 1 when entry s holds the cuts and Kc of cache_fp
};

__device__ __forceinline__ select_control read_control(const select_plan & P) {
    return *P.ctrl;
}

// Segment s of the keys that exist: [seg0, seg1), present when seg0 < n_eff.
struct segment_span {
    int32_t seg0, seg1;
    bool    present;
};

__device__ __forceinline__ segment_span segment_of(int32_t s, int32_t n_eff) {
    segment_span sp;
    sp.seg0    = s * kSegment;
    sp.present = sp.seg0 < n_eff;
    sp.seg1    = sp.present ? min(n_eff, sp.seg0 + kSegment) : sp.seg0;
    return sp;
}

// The keysim search of a segment (dhsa_keysim_boundaries with the keys before seg0 frozen): want cuts,
// candidates t in [t_lo, t_lo + n_cand). n_cand == 0 when nothing is searched (want == 0, or the segment
// is shorter than 2 chunk_min).
struct keysim_search {
    int32_t want, t_lo, n_cand;
};

__device__ __forceinline__ keysim_search keysim_search_of(const select_plan & P, segment_span sp) {
    const int64_t len  = sp.seg1 - sp.seg0;
    const int64_t want = (2 * len + P.chunk_avg) / (2 * (int64_t) P.chunk_avg) - 1;
    const int64_t lo   = (int64_t) sp.seg0 + P.chunk_min;
    const int64_t hi   = (int64_t) sp.seg1 - P.chunk_min + 1;  // exclusive
    keysim_search ks;
    ks.want   = want > 0 ? (int32_t) want : 0;
    ks.n_cand = ks.want > 0 && lo < hi ? (int32_t) (hi - lo) : 0;
    ks.t_lo   = ks.n_cand > 0 ? (int32_t) lo : 0;
    return ks;
}

// Whether segment s's cuts and Kc come from the cache entry s (decided by keysim_kernel, which stores it
// in seg_hit for the later kernels): the segment is complete, the entry is valid and was computed from
// keys and parameters with the same fingerprint (fp_match, written by the fingerprint CTAs of the
// prologue from cache state that only the later cuts and kc kernels modify).
__device__ __forceinline__ bool segment_cached(const select_plan & P, segment_span sp, int s) {
    return P.use_cache && sp.present && sp.seg1 - sp.seg0 == kSegment && s < P.fp_segments && P.fp_match[s] != 0;
}

__device__ __forceinline__ bool segment_hit(const select_plan & P, int s) {
    return P.use_cache && P.seg_hit[s] != 0;
}

// One (query block, KV head) as select_block() sees it.
struct block_plan {
    int32_t ps, pe, n_causal;  // first and last query position, keys visible to the block
    int32_t sink_end;          // forced sink [0, sink_end)
    int32_t local_start;       // forced local window [local_start, n_causal)
    bool    dense;             // budget >= 1 or pe >= dense_from: the single range [0, n_causal)
    int64_t need;              // tokens to take from chunks beyond the forced ones (<= 0: none)
};

__device__ __forceinline__ block_plan plan_block(const select_plan & P, int32_t b, int32_t q_pos0) {
    block_plan    bp;
    const int64_t qe = ((int64_t) b + 1) * P.q_block;
    bp.ps            = q_pos0 + b * P.q_block;
    bp.pe            = q_pos0 + (qe < P.in.n_q ? (int32_t) qe : P.in.n_q) - 1;
    bp.n_causal      = bp.pe + 1;
    bp.dense         = P.budget >= 1.0 || bp.pe >= P.dense_from;
    bp.sink_end      = P.sink_tokens < bp.n_causal ? P.sink_tokens : bp.n_causal;
    bp.local_start   = bp.ps - P.local_tokens > 0 ? bp.ps - P.local_tokens : 0;
    const int64_t kept = (int64_t) bp.sink_end + (bp.n_causal - bp.local_start) -
                         (bp.sink_end > bp.local_start ? bp.sink_end - bp.local_start : 0);
    // ceil(budget * n_causal) in double, as the C code (the product cannot be fused with anything).
    const double  want_d = ceil(__dmul_rn(P.budget, (double) bp.n_causal));
    const int64_t want   = want_d < (double) bp.n_causal ? (int64_t) want_d : bp.n_causal;
    bp.need              = want - kept;
    return bp;
}

// Tokens of [s, e) outside the forced set [0, sink_end) u [local_start, ...): unforced_tokens().
__device__ __forceinline__ int32_t unforced_tokens(int32_t s, int32_t e, int32_t sink_end, int32_t local_start) {
    const int32_t a = s > sink_end ? s : sink_end;
    const int32_t b = e < local_start ? e : local_start;
    return b > a ? b - a : 0;
}

// ---------------------------------------------------------------------------------------------------
// Warp and block helpers.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int lane_id() { return (int) (threadIdx.x & 31); }
__device__ __forceinline__ int warp_id() { return (int) (threadIdx.x >> 5); }

template <typename T> __device__ __forceinline__ T warp_inclusive_scan(T v) {
    const int lane = lane_id();
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const T x = __shfl_up_sync(kFullMask, v, off);
        if (lane >= off) {
            v += x;
        }
    }
    return v;
}

// Exclusive prefix sum over the CTA of kThreads threads (all must call); tmp holds kThreads/32 + 1 ints.
template <int kThreads> __device__ int block_exclusive_scan(int v, int * tmp, int & total) {
    static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
    constexpr int kWarps = kThreads / 32;
    const int     lane = lane_id(), warp = warp_id();
    const int     incl = warp_inclusive_scan(v);
    if (lane == 31) {
        tmp[warp] = incl;
    }
    __syncthreads();
    if (warp == 0) {
        const int x  = lane < kWarps ? tmp[lane] : 0;
        const int xi = warp_inclusive_scan(x);
        if (lane < kWarps) {
            tmp[lane] = xi - x;
        }
        if (lane == 31) {
            tmp[kWarps] = xi;
        }
    }
    __syncthreads();
    const int result = tmp[warp] + incl - v;
    total            = tmp[kWarps];
    __syncthreads();  // tmp may be reused right away
    return result;
}

// sum_{j = j0 .. j1-1} float(col[j * stride]) from +0.0f in increasing j, one rounding per add (the key
// sums of keysim_score and dhsa_chunk_reprs). Loads go out in batches so that several are in flight
// before the sequential adds consume them.
__device__ float sequential_key_sum(const half * col, int64_t j0, int64_t j1, int64_t stride) {
    constexpr int kBatch = 16;
    float         acc    = 0.0f;
    for (int64_t j = j0; j < j1; j += kBatch) {
        float x[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            x[u] = j + u < j1 ? __half2float(__ldg(col + (j + u) * stride)) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
            if (j + u < j1) {
                acc = add_f32(acc, x[u]);
            }
        }
    }
    return acc;
}

// ---------------------------------------------------------------------------------------------------
// 1. The prologue: everything that reads only the inputs (and the cache's state), in one launch. CTAs
// [0, qb_ctas) compute the query-block sums Qb (3b below), the next row_ctas the row positions pos[r] =
// last key j with mask[r][j] != -inf, or -1 (row_position()), the last fp_segments the fingerprints (1b).
// ---------------------------------------------------------------------------------------------------

constexpr int kRowsPerCta      = 8;  // one warp per row
constexpr int kRowUnroll       = 8;  // 256 mask values per warp and step: rows usually end near the end
constexpr int kPrologueThreads = kRowsPerCta * 32;

__device__ void fingerprint_cta(const select_plan & P, int s);
__device__ void query_block_reprs_cta(const select_plan & P, int cta);

__global__ void __launch_bounds__(kPrologueThreads) prologue_kernel(const select_plan P) {
    pdl_wait();  // (launched without the attribute: a no-op; kept so that every kernel starts the same way)
    pdl_launch_dependents();
    int cta = (int) blockIdx.x;  // roles are uniform over the CTA
    if (cta < P.qb_ctas) {
        query_block_reprs_cta(P, cta);
        return;
    }
    cta -= P.qb_ctas;
    if (cta >= P.row_ctas) {
        fingerprint_cta(P, cta - P.row_ctas);
        return;
    }
    const int r = cta * kRowsPerCta + warp_id();
    if (r >= P.in.n_q) {
        return;
    }
    const __half * row   = P.in.mask + (int64_t) r * P.in.mask_row;
    const int      lane  = lane_id();
    int32_t        found = -1;
    for (int64_t top = (int64_t) P.in.n_kv - 1; top >= 0 && found < 0; top -= 32 * kRowUnroll) {
        unsigned short bits[kRowUnroll];
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) {
            const int64_t j = top - u * 32 - lane;  // lane 0 holds the largest j of each step
            bits[u]         = j >= 0 ? __half_as_ushort(__ldg(row + j)) : kHalfNegInf;
        }
#pragma unroll
        for (int u = 0; u < kRowUnroll; ++u) {
            const unsigned visible = __ballot_sync(kFullMask, bits[u] != kHalfNegInf);
            if (visible != 0 && found < 0) {
                found = (int32_t) (top - u * 32 - (__ffs(visible) - 1));
            }
        }
    }
    if (lane == 0) {
        P.sel[r] = found;
    }
}

// ---------------------------------------------------------------------------------------------------
// 1b. Segment fingerprints (cache only), in the last CTAs of the prologue: nothing they read depends on
// the row positions. Segment s of n_kv, complete ([seg0, seg0 + 512) inside n_kv), hashes
// the first 16 bytes (8 f16 lanes, fewer when d < 8, zero-padded) of every (key row, KV head) of rows
// [fingerprint_row_lo(seg0), seg0 + 512): every key its cuts and Kc are computed from. Each item is
// hashed with its position (row - seg0, head) into 64 bits, the items are summed modulo 2^64 (an order-
// free, exact reduction), and the sum is mixed with the parameters the cuts and Kc depend on. A change of
// one item always changes its hash (it is a bijection of each 8-byte half for a fixed position), so a
// rewritten segment misses unless several changes cancel (about 2^-64).
// ---------------------------------------------------------------------------------------------------

// splitmix64's finaliser: a bijection of 64-bit values with full avalanche.
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

// First key row the selection of the segment starting at seg0 reads: keysim's left window of its first
// candidate (seg0 + chunk_min) starts at seg0 + chunk_min - window; Kc and fixed cuts read [seg0, seg1).
__device__ __forceinline__ int32_t fingerprint_row_lo(const select_plan & P, int32_t seg0) {
    const int64_t reach = P.boundary == DHSA_BOUNDARY_KEYSIM ? (int64_t) P.window - P.chunk_min : 0;
    return reach > 0 ? (int32_t) max((int64_t) 0, (int64_t) seg0 - reach) : seg0;
}

// The first 8 f16 of key row j, head h (zeros past d), as they lie in memory.
__device__ __forceinline__ uint4 key_prefix(const select_plan & P, int32_t j, int h) {
    const half * src = P.in.k + (int64_t) j * P.in.k_row + (int64_t) h * P.in.k_head;
    if (P.keys_vectorized) {  // 16-byte aligned, d % 8 == 0
        return __ldg(reinterpret_cast<const uint4 *>(src));
    }
    unsigned b[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        b[i] = i < P.in.d ? (unsigned) __half_as_ushort(__ldg(src + i)) : 0u;
    }
    return make_uint4(b[0] | b[1] << 16, b[2] | b[3] << 16, b[4] | b[5] << 16, b[6] | b[7] << 16);
}

__device__ __forceinline__ unsigned long long item_hash(unsigned long long position, uint4 v) {
    const unsigned long long lo = (unsigned long long) v.y << 32 | v.x;
    const unsigned long long hi = (unsigned long long) v.w << 32 | v.z;
    const unsigned long long a  = mix64(lo ^ (position * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull));
    return mix64(hi ^ a);
}

constexpr int kFpThreads = kPrologueThreads;
constexpr int kFpBatch   = 8;                 // items loaded before they are hashed

__device__ void fingerprint_cta(const select_plan & P, int s) {
    __shared__ unsigned long long warp_sums[kFpThreads / 32];

    const int32_t seg0 = s * kSegment, seg1 = seg0 + kSegment;
    const int32_t lo   = fingerprint_row_lo(P, seg0);
    const int64_t n    = (int64_t) (seg1 - lo) * P.in.n_head_kv;  // items (row, head), heads inner
    unsigned long long sum = 0;
    for (int64_t base = 0; base < n; base += (int64_t) kFpBatch * kFpThreads) {
        uint4 v[kFpBatch];
#pragma unroll
        for (int u = 0; u < kFpBatch; ++u) {
            const int64_t item = base + u * kFpThreads + threadIdx.x;
            v[u] = item < n ? key_prefix(P, lo + (int32_t) (item / P.in.n_head_kv), (int) (item % P.in.n_head_kv))
                            : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kFpBatch; ++u) {
            const int64_t item = base + u * kFpThreads + threadIdx.x;
            if (item < n) {
                // position: (row - seg0) * H_kv + head, rows before seg0 negative (two's complement)
                const int64_t position = (int64_t) (lo - seg0) * P.in.n_head_kv + item;
                sum += item_hash((unsigned long long) position, v[u]);
            }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        sum += __shfl_xor_sync(kFullMask, sum, off);
    }
    if (lane_id() == 0) {
        warp_sums[warp_id()] = sum;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long total = 0;
        for (int w = 0; w < kFpThreads / 32; ++w) {
            total += warp_sums[w];
        }
        // What else the entry depends on: its place, the rows hashed, the parameters and the layout.
        const int64_t params[] = { 0x44485341, kSegment, s, seg0 - lo, P.boundary, P.chunk_min, P.chunk_max,
                                   P.chunk_avg, P.window, P.in.n_head_kv, P.in.d, P.seg_cap };
        unsigned long long h = 0x243f6a8885a308d3ull;
        for (int i = 0; i < (int) (sizeof(params) / sizeof(params[0])); ++i) {
            h = mix64(h ^ (unsigned long long) params[i]);
        }
        const unsigned long long fp = mix64(h + total);
        P.fp_new[s]   = fp;
        // Read here rather than in the keysim launch: only the cuts and kc kernels, later in the stream,
        // change the entry.
        P.fp_match[s] = P.cache_valid[s] != 0 && P.cache_fp[s] == fp ? 1 : 0;
    }
}

// ---------------------------------------------------------------------------------------------------
// 2. Control: the CPU op's `sparse` and n_eff, from the row positions.
// ---------------------------------------------------------------------------------------------------

// Every thread of the CTA must call it (CTA-wide vote). Reads the n_q positions: a few KB from L2.
__device__ select_control derive_control(const select_plan & P) {
    const int32_t * pos         = P.sel;
    const int32_t   q_pos0      = pos[0];
    bool            consecutive = true;
    for (int r = threadIdx.x; r < P.in.n_q; r += blockDim.x) {
        consecutive = consecutive && (int64_t) pos[r] == (int64_t) q_pos0 + r;
    }
    const bool sparse = __syncthreads_and(consecutive) && P.sparse_allowed && q_pos0 >= 0 &&
                        (int64_t) q_pos0 + P.in.n_q >= P.min_context;
    select_control c;
    c.sparse   = sparse ? 1 : 0;
    c.n_eff    = sparse ? q_pos0 + P.in.n_q : 0;
    c.q_pos0   = q_pos0;
    c.failed   = 0;
    c.n_chunks = 0;
    c.done     = 0;
    return c;
}

// Only launched when the parameters rule out a sparse selection (the keysim launch derives the control
// itself otherwise): select_ranges_kernel then writes dense slots.
__global__ void __launch_bounds__(32) control_kernel(const select_plan P) {
    pdl_wait();
    pdl_launch_dependents();
    const select_control c = derive_control(P);
    if (threadIdx.x == 0) {
        *P.ctrl = c;
    }
}

// ---------------------------------------------------------------------------------------------------
// 3a. Keysim scores of the candidate cuts (keysim_score(), the segment's keys before seg0 frozen).
//
// score(t) = sum_h (1 - dot_h / (sqrt(nl_h) * sqrt(nr_h))) with, for lanes i increasing,
// dot_h = sum L_i R_i, nl_h = sum L_i L_i, nr_h = sum R_i R_i, L = sum of keys [max(0, t-w), t),
// R = sum of keys [t, min(seg1, t+w)). A CTA computes dist_h = 1 - dot_h / (...) of 128 candidates for
// one KV head h; the heads run in parallel CTAs and segment_cuts_kernel adds dist_0, dist_1, ... in h
// order from +0.0f, which is keysim_score()'s sum exactly. One thread per candidate keeps the i order of
// the three sums and computes its own window sums (each lane's sum is sequential over its <= w keys). The
// keys the CTA's candidates need are staged in shared memory kLaneSlice lanes at a time (a pass),
// converted to f32 once; the next pass's keys are loaded into registers while this pass computes.
// ---------------------------------------------------------------------------------------------------

constexpr int kKeysimPart      = 128;  // candidates per CTA, one thread each
constexpr int kKeysimThreads   = kKeysimPart;
constexpr int kLaneSlice       = 32;   // lanes of d per pass
constexpr int kLaneGroup       = 8;    // window sums held in registers at once
constexpr int kRawStride       = kLaneSlice + 4;  // 16-byte rows; 8 consecutive rows hit distinct banks
constexpr int kMaxStagedWindow = 32;   // wider windows sum straight from global memory (slow, rare)
constexpr int kRawRows         = kKeysimPart + 2 * kMaxStagedWindow;  // >= span + 2 w - 1 keys
constexpr int kVecLanes        = 8;    // f16 lanes per 16-byte load
constexpr int kVecPerRow       = kLaneSlice / kVecLanes;
constexpr int kVecRowsPerStep  = kKeysimThreads / kVecPerRow;
constexpr int kVecPerThread    = kRawRows / kVecRowsPerStep;
static_assert(kRawRows % kVecRowsPerStep == 0, "vector staging split");
static_assert(kLaneSlice % kLaneGroup == 0 && kLaneGroup % 4 == 0, "lane groups are read as float4");

struct keysim_part {
    int32_t seg1;              // right windows stop at the end of the segment
    int32_t t0, span;          // candidates t0 .. t0 + span - 1
    int32_t raw_lo, raw_rows;  // staged keys [raw_lo, raw_lo + raw_rows): every window of the part
    bool    staged;            // window <= kMaxStagedWindow
};

// Keys of one pass as raw f16 vectors (8 lanes each), loaded a pass ahead of their use. Vector m of a
// thread is key row tid / kVecPerRow + m * kVecRowsPerStep, lanes (tid % kVecPerRow) * 8 ...
__device__ __forceinline__ void load_key_vectors(const select_plan & P, const keysim_part & kp, int h, int i0,
                                                 uint4 (&v)[kVecPerThread]) {
    const int     row0 = threadIdx.x / kVecPerRow, lane0 = (threadIdx.x % kVecPerRow) * kVecLanes;
    const bool    lanes_ok = i0 + lane0 < P.in.d;  // d % 8 == 0 on this path: a vector is all in or all out
    const half *  src  = P.in.k + (int64_t) (kp.raw_lo + row0) * P.in.k_row + (int64_t) h * P.in.k_head + i0 + lane0;
    const int64_t step = (int64_t) kVecRowsPerStep * P.in.k_row;
#pragma unroll
    for (int m = 0; m < kVecPerThread; ++m) {
        v[m] = make_uint4(0u, 0u, 0u, 0u);
        if (lanes_ok && row0 + m * kVecRowsPerStep < kp.raw_rows) {
            v[m] = __ldg(reinterpret_cast<const uint4 *>(src + m * step));
        }
    }
}

__device__ __forceinline__ float2 half2_bits_to_float2(unsigned bits) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&bits));
}

__device__ __forceinline__ void store_key_vectors(const uint4 (&v)[kVecPerThread], float * raw_s) {
    const int row0 = threadIdx.x / kVecPerRow, lane0 = (threadIdx.x % kVecPerRow) * kVecLanes;
#pragma unroll
    for (int m = 0; m < kVecPerThread; ++m) {
        const float2 a = half2_bits_to_float2(v[m].x), b = half2_bits_to_float2(v[m].y);
        const float2 c = half2_bits_to_float2(v[m].z), d = half2_bits_to_float2(v[m].w);
        float4 *     dst = reinterpret_cast<float4 *>(raw_s + (row0 + m * kVecRowsPerStep) * kRawStride + lane0);
        dst[0] = make_float4(a.x, a.y, b.x, b.y);
        dst[1] = make_float4(c.x, c.y, d.x, d.y);
    }
}

// Unaligned keys or d % 8 != 0: stage one f16 at a time, without prefetch.
__device__ void stage_keys_scalar(const select_plan & P, const keysim_part & kp, int h, int i0, float * raw_s) {
    for (int item = threadIdx.x; item < kp.raw_rows * kLaneSlice; item += kKeysimThreads) {
        const int row = item / kLaneSlice, lane = item % kLaneSlice;
        float     x   = 0.0f;
        if (i0 + lane < P.in.d) {
            x = __half2float(__ldg(P.in.k + (int64_t) (kp.raw_lo + row) * P.in.k_row + (int64_t) h * P.in.k_head + i0 + lane));
        }
        raw_s[row * kRawStride + lane] = x;
    }
}

// sum over staged rows [row, row + n) of lanes g .. g + kLaneGroup - 1, each lane from +0.0f in row
// order. kRows > 0: n == kRows is known at compile time and all rows are loaded before the adds.
template <int kRows>
__device__ __forceinline__ void staged_window_sums(const float * raw_s, int row, int n, int g, float (&sum)[kLaneGroup]) {
    constexpr int kQuads = kLaneGroup / 4;
#pragma unroll
    for (int k = 0; k < kLaneGroup; ++k) {
        sum[k] = 0.0f;
    }
    if constexpr (kRows > 0) {
        float4 x[kRows][kQuads];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
#pragma unroll
            for (int q = 0; q < kQuads; ++q) {
                x[j][q] = reinterpret_cast<const float4 *>(raw_s + (row + j) * kRawStride + g)[q];
            }
        }
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
#pragma unroll
            for (int q = 0; q < kQuads; ++q) {
                sum[4 * q + 0] = add_f32(sum[4 * q + 0], x[j][q].x);
                sum[4 * q + 1] = add_f32(sum[4 * q + 1], x[j][q].y);
                sum[4 * q + 2] = add_f32(sum[4 * q + 2], x[j][q].z);
                sum[4 * q + 3] = add_f32(sum[4 * q + 3], x[j][q].w);
            }
        }
    } else {
        for (int j = 0; j < n; ++j) {
            const float4 * src = reinterpret_cast<const float4 *>(raw_s + (row + j) * kRawStride + g);
#pragma unroll
            for (int q = 0; q < kQuads; ++q) {
                const float4 x = src[q];
                sum[4 * q + 0] = add_f32(sum[4 * q + 0], x.x);
                sum[4 * q + 1] = add_f32(sum[4 * q + 1], x.y);
                sum[4 * q + 2] = add_f32(sum[4 * q + 2], x.z);
                sum[4 * q + 3] = add_f32(sum[4 * q + 3], x.w);
            }
        }
    }
}

// Window sum straight from global memory, for windows too wide to stage: rare, so a plain loop (a
// batched one would add registers to the staged path that every default run takes).
__device__ __forceinline__ float window_sum_global(const half * col, int64_t j0, int64_t j1, int64_t stride) {
    float acc = 0.0f;
#pragma unroll 1
    for (int64_t j = j0; j < j1; ++j) {
        acc = add_f32(acc, __half2float(__ldg(col + j * stride)));
    }
    return acc;
}

// The three lane sums of keysim_score() over one product term each, in lane order.
struct cosine_sums {
    float dot = 0.0f, nl = 0.0f, nr = 0.0f;

    __device__ __forceinline__ void add(float l, float r) {
        dot = add_f32(dot, mul_f32(l, r));
        nl  = add_f32(nl, mul_f32(l, l));
        nr  = add_f32(nr, mul_f32(r, r));
    }

    // 1 - cos, or 0 when a window sum is zero (no direction: no evidence of a boundary)
    __device__ __forceinline__ float distance() const {
        const float den = mul_f32(sqrt_f32(nl), sqrt_f32(nr));
        return den > 0.0f ? sub_f32(1.0f, div_f32(dot, den)) : 0.0f;
    }
};

// One pass (one head, lanes [i0, i0 + lanes)) of one candidate from the staged keys: window sums of its
// left rows [left_row, left_row + n_left) and right rows, then the cosine sums in lane order. kW > 0:
// windows of kW keys are unrolled (clipped windows, at key 0 or the segment end, take the general loop).
template <int kW>
__device__ __forceinline__ void keysim_pass_staged(const float * raw_s, int left_row, int n_left, int right_row,
                                                   int n_right, int lanes, cosine_sums & head) {
    const bool unrolled = kW > 0 && n_left == kW && n_right == kW;
    for (int g = 0; g < lanes; g += kLaneGroup) {
        float L[kLaneGroup], R[kLaneGroup];
        if (unrolled) {
            staged_window_sums<kW>(raw_s, left_row, kW, g, L);
            staged_window_sums<kW>(raw_s, right_row, kW, g, R);
        } else {
            staged_window_sums<0>(raw_s, left_row, n_left, g, L);
            staged_window_sums<0>(raw_s, right_row, n_right, g, R);
        }
#pragma unroll
        for (int k = 0; k < kLaneGroup; ++k) {
            if (g + k < lanes) {
                head.add(L[k], R[k]);
            }
        }
    }
}

__device__ void keysim_pass_staged_any(int w, const float * raw_s, int left_row, int n_left, int right_row, int n_right,
                                       int lanes, cosine_sums & head) {
    switch (w) {
        case 1: keysim_pass_staged<1>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 2: keysim_pass_staged<2>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 3: keysim_pass_staged<3>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 4: keysim_pass_staged<4>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 5: keysim_pass_staged<5>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 6: keysim_pass_staged<6>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 7: keysim_pass_staged<7>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        case 8: keysim_pass_staged<8>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
        default: keysim_pass_staged<0>(raw_s, left_row, n_left, right_row, n_right, lanes, head); break;
    }
}

// dist_h of the part's candidates for KV head h (score(t) = sum_h dist_h is summed in h order by
// segment_cuts_kernel, so the heads run in parallel CTAs).
__device__ void keysim_scores_cta(const select_plan & P, const select_control & ctl, int s, int part, int h) {
    __shared__ __align__(16) float raw_s[kRawRows * kRawStride];

    if (!ctl.sparse) {
        return;
    }
    const segment_span sp = segment_of(s, ctl.n_eff);
    if (!sp.present) {  // (cache hits are not called)
        return;
    }
    const keysim_search ks = keysim_search_of(P, sp);
    if (part * kKeysimPart >= ks.n_cand) {
        return;
    }
    const int32_t w = P.window;
    keysim_part   kp;
    kp.seg1     = sp.seg1;
    kp.t0       = ks.t_lo + part * kKeysimPart;
    kp.span     = min(kKeysimPart, ks.n_cand - part * kKeysimPart);
    kp.staged   = w <= kMaxStagedWindow;
    kp.raw_lo   = max(0, kp.t0 - w);
    kp.raw_rows = kp.staged ? min(sp.seg1, kp.t0 + kp.span - 1 + w) - kp.raw_lo : 0;

    // This thread's candidate and its windows (rows relative to raw_lo).
    const int     x      = threadIdx.x;
    const bool    scorer = x < kp.span;
    const int32_t t      = kp.t0 + x;
    const int32_t left0  = max(0, t - w);
    const int32_t right1 = (int32_t) min((int64_t) sp.seg1, (int64_t) t + w);

    const int  n_passes   = (P.in.d + kLaneSlice - 1) / kLaneSlice;  // lane slices of head h
    const bool vectorized = kp.staged && P.keys_vectorized;

    uint4 next[kVecPerThread];
    if (vectorized) {
        load_key_vectors(P, kp, h, 0, next);
    }
    cosine_sums head;
    for (int pass = 0; pass < n_passes; ++pass) {
        const int i0    = pass * kLaneSlice;
        const int lanes = min(kLaneSlice, P.in.d - i0);
        if (kp.staged) {
            __syncthreads();  // the previous pass is done with raw_s
            if (vectorized) {
                store_key_vectors(next, raw_s);
            } else {
                stage_keys_scalar(P, kp, h, i0, raw_s);
            }
            __syncthreads();
            if (vectorized && pass + 1 < n_passes) {  // the next pass's keys travel while this one computes
                load_key_vectors(P, kp, h, (pass + 1) * kLaneSlice, next);
            }
        }
        if (scorer) {
            if (kp.staged) {
                keysim_pass_staged_any(w, raw_s, left0 - kp.raw_lo, t - left0, t - kp.raw_lo, right1 - t, lanes, head);
            } else {
                const half * col = P.in.k + (int64_t) h * P.in.k_head + i0;
                for (int i = 0; i < lanes; ++i) {
                    head.add(window_sum_global(col + i, left0, t, P.in.k_row), window_sum_global(col + i, t, right1, P.in.k_row));
                }
            }
        }
    }
    if (scorer) {
        P.cut_scores[((int64_t) s * P.in.n_head_kv + h) * kSegment + part * kKeysimPart + x] = head.distance();
    }
}

// ---------------------------------------------------------------------------------------------------
// 3b. Query-block representations (dhsa_query_block_reprs): Qb[b][g][i] = (sum over the block's rows r,
// outer, and the group's heads, inner, of Q[r][g G + k][i]) / sqrt(len_b), one accumulator. Computed by
// CTAs of the prologue. A CTA owns kQbLanes lanes of one (block, KV head): its 256 threads stage the
// terms (row, head) of those lanes in shared memory, up to kQbTerms at a time with every load in flight
// at once (32 per thread, a warp per term: 128-byte rows), then warp 0 adds them, one lane per i, in the
// C order. A thread summing alone would wait for its loads (q_block * G of them) a batch at a time.
// ---------------------------------------------------------------------------------------------------

constexpr int kQbLanes  = 32;                              // lanes of d per CTA: warp 0 sums one each
constexpr int kQbStage  = 8192;                            // floats staged per pass (32 KB)
constexpr int kQbTerms  = kQbStage / kQbLanes;             // (row, head) terms per pass
constexpr int kQbPerThr = kQbStage / kPrologueThreads;     // loads per thread and pass
static_assert(kQbStage % kPrologueThreads == 0 && kPrologueThreads % kQbLanes == 0, "Qb staging split");

__device__ void query_block_reprs_cta(const select_plan & P, int cta) {
    __shared__ __align__(16) float stage_s[kQbStage];  // [term][lane]

    const int     slices = (P.in.d + kQbLanes - 1) / kQbLanes;
    const int64_t bg     = cta / slices;
    const int     i0     = (cta % slices) * kQbLanes;
    const int32_t g = (int32_t) (bg % P.in.n_head_kv), b = (int32_t) (bg / P.in.n_head_kv);
    const int32_t r0 = b * P.q_block;
    const int32_t r1 = (int32_t) min((int64_t) P.in.n_q, (int64_t) r0 + P.q_block);
    const int32_t G  = P.group;
    const float * q0 = P.in.q + (int64_t) r0 * P.in.q_row + (int64_t) g * G * P.in.q_head + i0;
    const int32_t n_terms = (r1 - r0) * G;  // term t = (row t / G, head t % G): rows outer, heads inner
    const int     lane    = lane_id();
    const bool    lane_ok = i0 + lane < P.in.d;  // the same lane for loading and summing (kQbLanes == 32)

    float acc = 0.0f;
    for (int32_t t0 = 0; t0 < n_terms; t0 += kQbTerms) {
        const int32_t n = min(kQbTerms, n_terms - t0);
        float         v[kQbPerThr];
#pragma unroll
        for (int u = 0; u < kQbPerThr; ++u) {
            const int32_t term = u * (kPrologueThreads / kQbLanes) + warp_id();  // element u * 256 + tid
            v[u] = 0.0f;
            if (term < n && lane_ok) {
                const int32_t t = t0 + term, r = t / G, hh = t - r * G;
                v[u] = __ldg(q0 + (int64_t) r * P.in.q_row + (int64_t) hh * P.in.q_head + lane);
            }
        }
        __syncthreads();  // warp 0 is done with the previous pass
#pragma unroll
        for (int u = 0; u < kQbPerThr; ++u) {
            stage_s[u * kPrologueThreads + threadIdx.x] = v[u];
        }
        __syncthreads();
        if (warp_id() == 0) {
#pragma unroll 8
            for (int32_t k = 0; k < n; ++k) {
                acc = add_f32(acc, stage_s[k * kQbLanes + lane]);
            }
        }
    }
    if (warp_id() == 0 && lane_ok) {
        P.qb[bg * P.in.d + i0 + lane] = div_f32(acc, sqrt_f32((float) (r1 - r0)));
    }
}

// ---------------------------------------------------------------------------------------------------
// 3c. The keysim launch. It derives the control (sparse flag, n_eff): every CTA votes on the positions
// itself, CTA 0 stores it and records which segments are cache hits for the later kernels (the other CTAs
// decide it the same way from the same values). Work items (segment, part, KV head), heads inner, are
// spread over a grid of at most kKeysimCtasPerSm CTAs per SM (but at most kKeysimThreads items per CTA):
// a CTA first looks up, in parallel, which of its items need scores (a miss of a present segment), then
// runs only those. Hits cost no CTA of their own (all of them in a warm call).
// ---------------------------------------------------------------------------------------------------

constexpr int kKeysimCtasPerSm = 4;  // as __launch_bounds__ below (128 registers a thread)

__global__ void __launch_bounds__(kKeysimThreads, kKeysimCtasPerSm) keysim_kernel(const select_plan P) {
    __shared__ unsigned char work_s[kKeysimThreads];

    pdl_wait();
    pdl_launch_dependents();
    const select_control ctl = derive_control(P);
    if (blockIdx.x == 0) {
        if (threadIdx.x == 0) {
            *P.ctrl = ctl;
        }
        if (P.use_cache) {
            for (int s = threadIdx.x; s < P.n_seg; s += kKeysimThreads) {
                P.seg_hit[s] = segment_cached(P, segment_of(s, ctl.n_eff), s) ? 1 : 0;
            }
        }
    }
    const int64_t per_seg = (int64_t) P.keysim_parts * P.in.n_head_kv;  // (part, head) items of a segment
    const int64_t total   = (int64_t) P.n_seg * per_seg;
    const int64_t first   = blockIdx.x, stride = gridDim.x;
    const int     n_items = first < total ? (int) ((total - 1 - first) / stride + 1) : 0;  // <= kKeysimThreads
    if (threadIdx.x < n_items) {
        const int          s  = (int) ((first + threadIdx.x * stride) / per_seg);
        const segment_span sp = segment_of(s, ctl.n_eff);
        work_s[threadIdx.x]   = ctl.sparse && sp.present && !segment_cached(P, sp, s) ? 1 : 0;
    }
    __syncthreads();
    for (int k = 0; k < n_items; ++k) {
        if (work_s[k]) {  // uniform over the CTA
            const int64_t item = first + k * stride;
            const int     rest = (int) (item % per_seg);
            keysim_scores_cta(P, ctl, (int) (item / per_seg), rest / P.in.n_head_kv, rest % P.in.n_head_kv);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 4. Segment cuts: what segment_bounds() writes, count then cuts in (seg0, seg1], count -1 on failure.
// keysim: rank candidates by (score desc, t asc), greedy NMS, split; fixed: cuts every chunk_avg.
// ---------------------------------------------------------------------------------------------------

constexpr int kCutsThreads = kSegment;  // one candidate per thread in the sort
static_assert(kSegment == 512, "the bitonic sort and the cut buffers assume 512-cell segments");

// Bitonic sort of kCutsThreads 64-bit keys, one per thread, ascending; returns this thread's key of the
// sorted sequence. Exchanges inside a warp go through shuffles, wider ones through shared memory.
__device__ unsigned long long bitonic_sort(unsigned long long v, unsigned long long * buf) {
    const int i = threadIdx.x;
#pragma unroll 1
    for (int k = 2; k <= kCutsThreads; k <<= 1) {
#pragma unroll 1
        for (int j = k >> 1; j > 0; j >>= 1) {
            unsigned long long other;
            if (j >= 32) {
                buf[i] = v;
                __syncthreads();
                other = buf[i ^ j];
                __syncthreads();
            } else {
                other = __shfl_xor_sync(kFullMask, v, j);
            }
            const bool keep_min = ((i & j) == 0) == ((i & k) == 0);
            v = keep_min ? (v < other ? v : other) : (v < other ? other : v);
        }
    }
    return v;
}

// Region-relative position bitmaps of a segment (kSegment bits).
constexpr int kSegmentWords = kSegment / 32;

__device__ __forceinline__ bool test_bit(const uint32_t * bits, int p) {
    return (bits[p >> 5] >> (p & 31)) & 1u;
}

// Sets bits [lo, hi) (lo < hi); atomic, since accepted lanes of a warp may share words.
__device__ void set_bit_range(uint32_t * bits, int lo, int hi) {
    for (int w = lo >> 5; w <= (hi - 1) >> 5; ++w) {
        const int      a    = max(lo, w * 32) - w * 32, b = min(hi, w * 32 + 32) - w * 32;  // [a, b) in word w
        const uint32_t mask = (b - a == 32) ? ~0u : ((1u << (b - a)) - 1u) << a;
        atomicOr(&bits[w], mask);
    }
}

// Greedy NMS over the ranked candidates by one warp (dhsa_keysim_boundaries): walk the ranking in
// batches of 32; a candidate is accepted unless blocked by an earlier accepted cut (closer than
// chunk_min). Inside a batch the lowest-ranked alive lane is always accepted next and removes the lanes
// it blocks, which is the sequential walk exactly. blocked/accepted: region-relative bitmaps, zeroed.
__device__ void greedy_nms_warp(const unsigned long long * ranked, int n_cand, int want, int seg0, int len,
                                int chunk_min, uint32_t * blocked, uint32_t * accepted) {
    const int lane = lane_id();
    int       n_accepted = 0;
    for (int base = 0; base < n_cand && n_accepted < want; base += 32) {
        const int  idx   = base + lane;
        const bool valid = idx < n_cand;
        const int  rel   = valid ? (int) (uint32_t) ranked[idx] - seg0 : 0;
        unsigned   alive = __ballot_sync(kFullMask, valid && !test_bit(blocked, rel));
        unsigned   mine  = 0;
        while (alive != 0 && n_accepted < want) {
            const int lead = __ffs(alive) - 1;
            const int a    = __shfl_sync(kFullMask, rel, lead);
            mine |= 1u << lead;
            ++n_accepted;
            alive &= ~__ballot_sync(kFullMask, valid && abs(rel - a) < chunk_min);
        }
        if ((mine >> lane) & 1u) {  // block_around(): positions closer than chunk_min
            set_bit_range(blocked, (int) max((int64_t) 0, (int64_t) rel - chunk_min + 1),
                          (int) min((int64_t) len, (int64_t) rel + chunk_min));
            atomicOr(&accepted[rel >> 5], 1u << (rel & 31));
        }
        __syncwarp();
    }
}

// Accepted cuts in position order (one warp; lane w < kSegmentWords expands word w).
__device__ int collect_cuts_warp(const uint32_t * accepted, int seg0, int32_t * cuts) {
    const int      lane  = lane_id();
    uint32_t       word  = lane < kSegmentWords ? accepted[lane] : 0u;
    const int      n     = __popc(word);
    const int      incl  = warp_inclusive_scan(n);
    int            at    = incl - n;
    while (word != 0) {
        const int bit = __ffs(word) - 1;
        cuts[at++]    = seg0 + lane * 32 + bit;
        word &= word - 1;
    }
    return __shfl_sync(kFullMask, incl, 31);
}

// append_split(): the chunks between seg0, the cuts and seg1, each longer than chunk_max split into
// n = ceil(len / chunk_max) pieces starting at s + floor(k len / n) (64-bit). Writes the boundaries
// after seg0 to out and returns their count (one warp; at most seg1 - seg0 of them).
__device__ int split_chunks_warp(const int32_t * cuts, int n_cuts, int seg0, int seg1, int chunk_max, int32_t * out) {
    const int lane  = lane_id();
    int       total = 0;
    for (int base = 0; base <= n_cuts; base += 32) {
        const int     c      = base + lane;
        const bool    valid  = c <= n_cuts;
        const int32_t s      = valid ? (c == 0 ? seg0 : cuts[c - 1]) : 0;
        const int32_t e      = valid ? (c < n_cuts ? cuts[c] : seg1) : 0;
        const int64_t len    = (int64_t) e - s;
        const int64_t pieces = valid ? (len + chunk_max - 1) / chunk_max : 0;
        const int     incl   = warp_inclusive_scan((int) pieces);
        const int     first  = total + incl - (int) pieces;
        for (int64_t k = 1; k <= pieces; ++k) {
            out[first + k - 1] = (int32_t) (s + (k * len) / pieces);
        }
        total += __shfl_sync(kFullMask, incl, 31);
    }
    return total;
}

__global__ void __launch_bounds__(kCutsThreads) segment_cuts_kernel(const select_plan P) {
    __shared__ unsigned long long sort_s[kCutsThreads];
    __shared__ uint32_t           blocked_s[kSegmentWords], accepted_s[kSegmentWords];
    __shared__ int32_t            cuts_s[kSegment];
    __shared__ int32_t            n_cuts_s;

    pdl_wait();
    pdl_launch_dependents();
    const select_control ctl = read_control(P);
    if (!ctl.sparse) {
        return;
    }
    const int          s  = blockIdx.x;
    const segment_span sp = segment_of(s, ctl.n_eff);
    if (!sp.present || segment_hit(P, s)) {  // a hit's cuts are in its cache entry already
        return;
    }
    int32_t *   out = P.seg_cuts + (int64_t) s * (1 + kSegment);
    const int   len = sp.seg1 - sp.seg0;
    const int   tid = threadIdx.x;
    if (P.use_cache && tid == 0) {
        P.cache_valid[s] = 0;  // the entry is rewritten from here on (kc_and_bounds_kernel revalidates it)
    }

    if (P.boundary != DHSA_BOUNDARY_KEYSIM) {
        // dhsa_fixed_boundaries(): seg0 + k chunk_avg while < seg1, then seg1.
        const int64_t count = (len + (int64_t) P.chunk_avg - 1) / P.chunk_avg;
        for (int64_t k = tid; k < count; k += kCutsThreads) {
            out[1 + k] = (int32_t) min((int64_t) sp.seg0 + (k + 1) * P.chunk_avg, (int64_t) sp.seg1);
        }
        if (tid == 0) {
            out[0] = count > P.seg_chunks ? -1 : (int32_t) count;
        }
        return;
    }

    const keysim_search ks = keysim_search_of(P, sp);
    if (tid == 0) {
        n_cuts_s = 0;
    }
    if (ks.n_cand > 0) {  // uniform over the CTA
        unsigned long long key = ~0ull;  // padding sorts last
        if (tid < ks.n_cand) {
            // keysim_score(): score = ((0 + dist_0) + dist_1) + ..., heads in increasing order
            const float * dist  = P.cut_scores + (int64_t) s * P.in.n_head_kv * kSegment + tid;
            float         score = 0.0f;
            for (int h = 0; h < P.in.n_head_kv; ++h) {
                score = add_f32(score, dist[(int64_t) h * kSegment]);
            }
            key = (unsigned long long) descending_key(score) << 32 | (uint32_t) (ks.t_lo + tid);
        }
        key = bitonic_sort(key, sort_s);
        sort_s[tid] = key;  // the sort's last read of sort_s was followed by a barrier
        if (tid < kSegmentWords) {
            blocked_s[tid]  = 0;
            accepted_s[tid] = 0;
        }
        __syncthreads();
        if (warp_id() == 0) {
            greedy_nms_warp(sort_s, ks.n_cand, ks.want, sp.seg0, len, P.chunk_min, blocked_s, accepted_s);
            const int n = collect_cuts_warp(accepted_s, sp.seg0, cuts_s);
            if (lane_id() == 0) {
                n_cuts_s = n;
            }
        }
    }
    __syncthreads();
    if (warp_id() == 0) {
        const int total = split_chunks_warp(cuts_s, n_cuts_s, sp.seg0, sp.seg1, P.chunk_max, out + 1);
        if (lane_id() == 0) {
            out[0] = total > P.seg_chunks ? -1 : total;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 5a. Chunk representations (dhsa_chunk_reprs): Kc[c][h][i] = (sum of the chunk's keys, increasing) /
// sqrt(len). A warp sums one chunk; each lane holds 8 (head, lane) pairs and reads them with one 16-byte
// load per key (a warp reads 256 pairs of a key row at once). The results go through shared memory so
// that the transposed Kc (chunks contiguous per pair) is written coalesced too.
// ---------------------------------------------------------------------------------------------------

constexpr int kKcChunks       = 8;   // chunks per CTA, one warp each
constexpr int kKcPairsPerLane = 8;
constexpr int kKcPairs        = 32 * kKcPairsPerLane;  // (head, lane) pairs per CTA
constexpr int kKcThreads      = kKcChunks * 32;
constexpr int kKcStride       = kKcPairs + 4;  // 16-byte rows of the staging buffer
constexpr int kKcRowBatch     = 8;   // key rows loaded before their adds

// Sums of keys [start, end) for the 8 pairs pair0 .. pair0 + 7 (pair = head * d + lane), each from +0.0f
// in key order. 16-byte loads when the keys allow it (the 8 pairs are then contiguous in one head).
__device__ void chunk_pair_sums(const select_plan & P, int pair0, int32_t start, int32_t end, float (&sum)[kKcPairsPerLane]) {
#pragma unroll
    for (int u = 0; u < kKcPairsPerLane; ++u) {
        sum[u] = 0.0f;
    }
    const int n_pairs = P.in.n_head_kv * P.in.d;
    if (P.keys_vectorized) {
        if (pair0 >= n_pairs) {
            return;
        }
        const half * src = P.in.k + (int64_t) start * P.in.k_row + (int64_t) (pair0 / P.in.d) * P.in.k_head + pair0 % P.in.d;
        for (int32_t j = start; j < end; j += kKcRowBatch) {
            uint4 v[kKcRowBatch];
#pragma unroll
            for (int r = 0; r < kKcRowBatch; ++r) {
                v[r] = j + r < end ? __ldg(reinterpret_cast<const uint4 *>(src + (int64_t) r * P.in.k_row)) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int r = 0; r < kKcRowBatch; ++r) {
                if (j + r < end) {
                    const unsigned w4[4] = { v[r].x, v[r].y, v[r].z, v[r].w };
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float2 f = half2_bits_to_float2(w4[q]);
                        sum[2 * q]     = add_f32(sum[2 * q], f.x);
                        sum[2 * q + 1] = add_f32(sum[2 * q + 1], f.y);
                    }
                }
            }
            src += (int64_t) kKcRowBatch * P.in.k_row;
        }
    } else {
#pragma unroll 1
        for (int u = 0; u < kKcPairsPerLane; ++u) {
            const int pair = pair0 + u;
            if (pair < n_pairs) {
                sum[u] = sequential_key_sum(P.in.k + (int64_t) (pair / P.in.d) * P.in.k_head + pair % P.in.d, start, end, P.in.k_row);
            }
        }
    }
}

__device__ void chunk_reprs_cta(const select_plan & P, segment_span sp, int s, int group, int pair_tile) {
    __shared__ __align__(16) float staged[kKcChunks * kKcStride];

    const int32_t * seg   = P.seg_cuts + (int64_t) s * (1 + kSegment);
    const int32_t   count = seg[0];  // -1: failed segment
    const int       k0    = group * kKcChunks;
    if (k0 >= count) {
        return;
    }
    const int pair_base = pair_tile * kKcPairs;
    const int c         = k0 + warp_id();
    if (c < count) {
        const int32_t start = c == 0 ? sp.seg0 : seg[c];  // seg[1 + (c - 1)]
        const int32_t end   = seg[1 + c];
        float         sum[kKcPairsPerLane];
        chunk_pair_sums(P, pair_base + lane_id() * kKcPairsPerLane, start, end, sum);
        // sqrt(len) * mean = sum / sqrt(len): one correctly rounded division, as the C code.
        const float den = sqrt_f32((float) (end - start));
        float4 *    dst = reinterpret_cast<float4 *>(staged + warp_id() * kKcStride + lane_id() * kKcPairsPerLane);
        dst[0] = make_float4(div_f32(sum[0], den), div_f32(sum[1], den), div_f32(sum[2], den), div_f32(sum[3], den));
        dst[1] = make_float4(div_f32(sum[4], den), div_f32(sum[5], den), div_f32(sum[6], den), div_f32(sum[7], den));
    }
    __syncthreads();
    const int n_pairs = P.in.n_head_kv * P.in.d;
    for (int idx = threadIdx.x; idx < kKcPairs * kKcChunks; idx += kKcThreads) {
        const int p = idx / kKcChunks, kk = idx % kKcChunks;
        if (pair_base + p < n_pairs && k0 + kk < count) {
            P.kc[((int64_t) s * P.n_pairs + pair_base + p) * P.seg_cap + k0 + kk] = staged[kk * kKcStride + p];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 5b. Segment s's share of the whole sequence's boundaries [0, cuts of segment 0, cuts of segment 1, ...]:
// its chunks start after the earlier segments' chunks (their counts are final: the cuts kernel is done).
// Also the chunk -> Kc slot map and, per query block whose last position pe lies in the segment, the
// number of chunks starting by pe. A failed segment fails the selection (the CPU's `sparse = false`).
// ---------------------------------------------------------------------------------------------------

__device__ void place_segment_bounds(const select_plan & P, const select_control & ctl, int s, segment_span sp) {
    __shared__ int scan_tmp[kKcThreads / 32 + 1];

    const int32_t * seg   = P.seg_cuts + (int64_t) s * (1 + kSegment);
    const int32_t   count = seg[0];
    int             mine  = 0;
    for (int i = threadIdx.x; i < s; i += kKcThreads) {
        mine += max(0, P.seg_cuts[(int64_t) i * (1 + kSegment)]);
    }
    int before;
    block_exclusive_scan<kKcThreads>(mine, scan_tmp, before);  // only the total is used
    if (count < 0) {
        if (threadIdx.x == 0) {
            P.ctrl->failed = 1;
        }
        return;
    }
    for (int k = threadIdx.x; k < count; k += kKcThreads) {
        P.bounds[1 + before + k]  = seg[1 + k];
        P.chunk_slot[before + k] = s * P.seg_cap + k;
    }
    if (threadIdx.x == 0) {
        if (s == 0) {
            P.bounds[0] = 0;
        }
        if (sp.seg1 == ctl.n_eff) {
            P.ctrl->n_chunks = before + count;
        }
    }
    // Chunk c starts by pe iff c <= the chunk holding pe, whose index is the segment's first chunk plus
    // the segment's cuts <= pe (cuts are chunk ends).
    for (int b = warp_id(); b < P.n_blocks; b += kKcThreads / 32) {
        const int64_t qe = ((int64_t) b + 1) * P.q_block;
        const int32_t pe = ctl.q_pos0 + (qe < P.in.n_q ? (int32_t) qe : P.in.n_q) - 1;
        if (pe < sp.seg0 || pe >= sp.seg1) {
            continue;
        }
        int ends = 0;
        for (int k0 = 0; k0 < count; k0 += 32) {
            ends += __popc(__ballot_sync(kFullMask, k0 + lane_id() < count && seg[1 + k0 + lane_id()] <= pe));
        }
        if (lane_id() == 0) {
            P.block_chunks[b] = before + ends + 1;
        }
    }
}

// Both only need the segments' cuts: the first CTA of each segment also places its boundaries and, for a
// segment computed in this call, updates its cache entry. A cache hit's Kc is in its entry already.
__global__ void __launch_bounds__(kKcThreads, 3) kc_and_bounds_kernel(const select_plan P) {
    pdl_wait();
    pdl_launch_dependents();
    const select_control ctl = read_control(P);
    if (!ctl.sparse) {
        return;
    }
    const int          per_seg = P.kc_groups * P.kc_pair_tiles;
    const int          s = blockIdx.x / per_seg, rest = blockIdx.x % per_seg;
    const segment_span sp = segment_of(s, ctl.n_eff);
    if (!sp.present) {
        return;
    }
    const bool hit = segment_hit(P, s);  // uniform over the CTA
    if (rest == 0) {
        if (P.use_cache && !hit && threadIdx.x == 0) {
            // The entry holds this call's cuts, and its Kc once this launch is done (later calls read it
            // after that, in stream order): valid for the keys of fp_new when the segment is complete and
            // has not failed (too many chunks). The cuts kernel has invalidated it meanwhile.
            const bool complete = sp.seg1 - sp.seg0 == kSegment;
            if (complete && P.seg_cuts[(int64_t) s * (1 + kSegment)] >= 0) {
                P.cache_fp[s]    = P.fp_new[s];
                P.cache_valid[s] = 1;
            }
        }
        place_segment_bounds(P, ctl, s, sp);
    }
    if (!hit) {
        chunk_reprs_cta(P, sp, s, rest / P.kc_pair_tiles, rest % P.kc_pair_tiles);
    }
}

// ---------------------------------------------------------------------------------------------------
// 6. Chunk scores and rank entries per (block b, KV head g): for each chunk c starting by pe, its
// unforced tokens u (the take weight) and, for candidates (u > 0), S = Qb[b][g] . Kc[c][g] (i increasing,
// product rounded). Entry = descending_key(S) << 32 | u; u = 0 marks a non-candidate. A thread owns one
// chunk of one KV head for kScoreBlocks query blocks (one accumulator each, every one in i order; each Kc
// value is then read once per kScoreBlocks blocks).
// ---------------------------------------------------------------------------------------------------

constexpr int kScoreThreads = 128;
constexpr int kScoreBatch   = 32;  // Kc lanes per batch; two batches in flight
// Query blocks per thread. Measured on an H200 (ncu, 512 queries = 8 blocks): 8 made the kernel slower,
// 7 -> 20 us at 32K keys (8/4 heads, d 128; a thread's 8 chains of d adds are latency-bound and the grid 8x
// smaller) and no faster at 128K (46 -> 44 us, 16/8 heads, d 256), so each thread does one block.
constexpr int kScoreBlocks  = 1;

// Kc lanes i0 .. i0 + kScoreBatch - 1 of one chunk (consecutive lanes are seg_cap apart), zero past d.
__device__ __forceinline__ void load_kc_batch(const float * kc_col, int64_t stride, int i0, int d, float (&x)[kScoreBatch]) {
    if (i0 + kScoreBatch <= d) {
#pragma unroll
        for (int u = 0; u < kScoreBatch; ++u) {
            x[u] = kc_col[(int64_t) (i0 + u) * stride];
        }
    } else {
#pragma unroll
        for (int u = 0; u < kScoreBatch; ++u) {
            x[u] = i0 + u < d ? kc_col[(int64_t) (i0 + u) * stride] : 0.0f;
        }
    }
}

// acc + sum of qb[i0 + u] * x[u] for the lanes below d, in lane order (dot_f32). qb_s is padded to a
// multiple of 2 kScoreBatch and 16-byte aligned, so it is read as float4 broadcasts.
__device__ __forceinline__ float dot_batch(float acc, const float * qb_s, int i0, int d, const float (&x)[kScoreBatch]) {
    float q[kScoreBatch];
#pragma unroll
    for (int u = 0; u < kScoreBatch; u += 4) {
        const float4 v = *reinterpret_cast<const float4 *>(qb_s + i0 + u);
        q[u] = v.x;
        q[u + 1] = v.y;
        q[u + 2] = v.z;
        q[u + 3] = v.w;
    }
#pragma unroll
    for (int u = 0; u < kScoreBatch; ++u) {
        if (i0 + u < d) {
            acc = add_f32(acc, mul_f32(q[u], x[u]));
        }
    }
    return acc;
}

// The batch for the CTA's nb blocks (Qb of block j at qb_s + j * dp).
__device__ __forceinline__ void dot_batch_blocks(float (&acc)[kScoreBlocks], const float * qb_s, int dp, int nb, int i0,
                                                 int d, const float (&x)[kScoreBatch]) {
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
        if (j < nb) {
            acc[j] = dot_batch(acc[j], qb_s + j * dp, i0, d, x);
        }
    }
}

__global__ void __launch_bounds__(kScoreThreads) chunk_scores_kernel(const select_plan P) {
    extern __shared__ __align__(16) float qb_s[];  // [kScoreBlocks][dp]
    __shared__ int32_t n_cc_s[kScoreBlocks], n_causal_s[kScoreBlocks], sink_s[kScoreBlocks], local_s[kScoreBlocks];

    pdl_wait();
    pdl_launch_dependents();
    const select_control ctl = read_control(P);
    if (!ctl.sparse || ctl.failed) {
        return;
    }
    const int g  = (int) (blockIdx.x % P.in.n_head_kv);
    const int b0 = (int) (blockIdx.x / P.in.n_head_kv) * kScoreBlocks;
    const int nb = min(kScoreBlocks, P.n_blocks - b0);
    const int c0 = blockIdx.y * kScoreThreads;
    const int dp = (int) ceil_div_dev(P.in.d, 2 * kScoreBatch) * 2 * kScoreBatch;  // the loop's last batch
    if ((int) threadIdx.x < nb) {
        // n_cc 0: select_ranges_kernel takes no chunk of this block (dense, or nothing to take): no entries
        const block_plan bp = plan_block(P, b0 + threadIdx.x, ctl.q_pos0);
        n_cc_s[threadIdx.x]     = bp.dense || bp.need <= 0 ? 0 : P.block_chunks[b0 + threadIdx.x];
        n_causal_s[threadIdx.x] = bp.n_causal;
        sink_s[threadIdx.x]     = bp.sink_end;
        local_s[threadIdx.x]    = bp.local_start;
    }
    for (int i = threadIdx.x; i < nb * dp; i += kScoreThreads) {
        const int j = i / dp, lane = i - j * dp;
        qb_s[i] = lane < P.in.d ? P.qb[((int64_t) (b0 + j) * P.in.n_head_kv + g) * P.in.d + lane] : 0.0f;
    }
    __syncthreads();
    int max_cc = 0;
    for (int j = 0; j < nb; ++j) {
        max_cc = max(max_cc, n_cc_s[j]);
    }
    const int c = c0 + threadIdx.x;
    if (c >= max_cc) {
        return;  // (no barrier follows)
    }
    const int32_t cs = P.bounds[c], ce = P.bounds[c + 1];
    int32_t       u[kScoreBlocks];
    bool          any = false;
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
        u[j] = 0;
        if (j < nb && c < n_cc_s[j]) {
            u[j] = unforced_tokens(cs, min(ce, n_causal_s[j]), sink_s[j], local_s[j]);
            any  = any || u[j] > 0;
        }
    }
    float acc[kScoreBlocks];
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
        acc[j] = 0.0f;
    }
    if (any) {
        // Kc of chunk k of segment seg, pairs (g, i) for i = 0 .. d - 1: seg_cap floats apart
        const int32_t slot   = P.chunk_slot[c];
        const int32_t seg    = slot / P.seg_cap, k = slot - seg * P.seg_cap;
        const float * kc_col = P.kc + ((int64_t) seg * P.n_pairs + (int64_t) g * P.in.d) * P.seg_cap + k;
        float         a[kScoreBatch], b2[kScoreBatch];
        load_kc_batch(kc_col, P.seg_cap, 0, P.in.d, a);
        for (int i0 = 0; i0 < P.in.d; i0 += 2 * kScoreBatch) {  // double buffer: load ahead, then add in order
            load_kc_batch(kc_col, P.seg_cap, i0 + kScoreBatch, P.in.d, b2);
            dot_batch_blocks(acc, qb_s, dp, nb, i0, P.in.d, a);
            load_kc_batch(kc_col, P.seg_cap, i0 + 2 * kScoreBatch, P.in.d, a);
            dot_batch_blocks(acc, qb_s, dp, nb, i0 + kScoreBatch, P.in.d, b2);
        }
    }
#pragma unroll
    for (int j = 0; j < kScoreBlocks; ++j) {
        if (j < nb && c < n_cc_s[j]) {
            const unsigned long long entry =
                u[j] > 0 ? (unsigned long long) descending_key(acc[j]) << 32 | (uint32_t) u[j] : ~0ull << 32;
            P.rank[((int64_t) (b0 + j) * P.in.n_head_kv + g) * P.chunk_cap + c] = entry;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 7. Range lists per (block b, KV head g): select_block() without sorting.
//
// select_block takes candidates in (S desc, c asc) order while kept < budget_tokens, so candidate x is
// taken iff the weight of the candidates ranked before it is < need (= budget_tokens - forced). With T
// the smallest score key whose cumulative weight W(key <= T) reaches need (radix select on the 32-bit
// keys, weighted histograms), x is taken iff key_x < T, or key_x == T and the weight of the ties before
// it in chunk order is < need - W(key < T). Every candidate is taken when the total weight is < need.
// The runs of taken chunks, between the sink and the local window, are then emitted in parallel.
// ---------------------------------------------------------------------------------------------------

constexpr int kSelectThreads   = 512;
constexpr int kCachedTiles     = 8;  // rank entries of the first 8 x 512 chunks stay in registers
constexpr int kAggregateRounds = 4;  // per-bin warp sums before falling back to one atomic per lane

// Adds w to hist[bin] for the active lanes of the warp (all lanes call). Lanes with the same bin are
// summed first: scores share their top bits, and 32 atomics on one address would serialise.
__device__ __forceinline__ void add_weight_aggregated(unsigned * hist, unsigned bin, unsigned w, bool active) {
    const int lane    = lane_id();
    unsigned  pending = __ballot_sync(kFullMask, active);
    for (int round = 0; round < kAggregateRounds && pending != 0; ++round) {
        const int      leader     = __ffs(pending) - 1;
        const unsigned leader_bin = __shfl_sync(kFullMask, bin, leader);
        const bool     mine       = ((pending >> lane) & 1u) && bin == leader_bin;
        const unsigned sum        = __reduce_add_sync(kFullMask, mine ? w : 0u);
        if (lane == leader) {
            atomicAdd(&hist[leader_bin], sum);
        }
        pending &= ~__ballot_sync(kFullMask, mine);
    }
    if ((pending >> lane) & 1u) {
        atomicAdd(&hist[bin], w);
    }
}

// The rank entries of chunks [0, n_cc), tile by tile (tile t0 holds chunk t0 + threadIdx.x): the first
// kCachedTiles tiles from registers, any further ones from global memory. Loop bounds are uniform, so
// bodies may use barriers and warp votes.
struct rank_entries {
    const unsigned long long * global;
    int                        n_cc;
    unsigned long long         cached[kCachedTiles];

    __device__ __forceinline__ void load(const unsigned long long * entries, int n) {
        global = entries;
        n_cc   = n;
#pragma unroll
        for (int k = 0; k < kCachedTiles; ++k) {
            const int c = k * kSelectThreads + threadIdx.x;
            cached[k]   = c < n_cc ? global[c] : 0ull;
        }
    }

    template <typename Body> __device__ __forceinline__ void for_each_tile(Body body) const {
#pragma unroll
        for (int k = 0; k < kCachedTiles; ++k) {
            if (k * kSelectThreads < n_cc) {
                body(k * kSelectThreads, cached[k]);
            }
        }
        for (int t0 = kCachedTiles * kSelectThreads; t0 < n_cc; t0 += kSelectThreads) {
            const int c = t0 + threadIdx.x;
            body(t0, c < n_cc ? global[c] : 0ull);
        }
    }
};

struct select_shared {
    unsigned hist[256];
    int      scan_tmp[kSelectThreads / 32 + 1];
    uint32_t prefix, prefix_mask, remaining;
    int32_t  take_all;
    int32_t  last_end;
    int32_t  last_cta;  // this CTA is the last of the launch to finish
};

// Warp 0: the smallest digit whose cumulative histogram weight reaches sh.remaining; narrows the prefix.
__device__ void pick_digit_warp(select_shared & sh, int shift) {
    const int lane = lane_id();
    unsigned  local[8], sum = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
        local[q] = sh.hist[lane * 8 + q];
        sum += local[q];
    }
    const unsigned incl      = warp_inclusive_scan(sum);
    const unsigned remaining = sh.remaining;
    const unsigned reach     = __ballot_sync(kFullMask, incl >= remaining);
    if (reach == 0) {  // only in the first pass: the candidates' total weight is below need
        if (lane == 0) {
            sh.take_all = 1;
        }
        return;
    }
    if (lane == __ffs(reach) - 1) {
        unsigned cum = incl - sum;
        for (int q = 0; q < 8; ++q) {
            if (cum + local[q] >= remaining) {
                sh.prefix |= (unsigned) (lane * 8 + q) << shift;
                sh.prefix_mask |= 0xffu << shift;
                sh.remaining = remaining - cum;
                break;
            }
            cum += local[q];
        }
    }
}

// Radix select of the take threshold over the rank entries (4 passes of 8 bits of the score key).
__device__ void find_take_threshold(const rank_entries & entries, uint32_t need, select_shared & sh) {
    if (threadIdx.x == 0) {
        sh.prefix      = 0;
        sh.prefix_mask = 0;
        sh.remaining   = need;
        sh.take_all    = 0;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += kSelectThreads) {
            sh.hist[i] = 0;
        }
        __syncthreads();
        const uint32_t prefix = sh.prefix, prefix_mask = sh.prefix_mask;
        entries.for_each_tile([&](int, unsigned long long e) {
            const uint32_t key = (uint32_t) (e >> 32), w = (uint32_t) e;
            add_weight_aggregated(sh.hist, (key >> shift) & 0xffu, w, w > 0 && (key & prefix_mask) == prefix);
        });
        __syncthreads();
        if (warp_id() == 0) {
            pick_digit_warp(sh, shift);
        }
        __syncthreads();
        if (sh.take_all) {
            return;
        }
    }
}

__device__ __forceinline__ bool bit_of(const uint32_t * words, int c) {
    return (words[c >> 5] >> (c & 31)) & 1u;
}

// Marks the taken chunks in the shared bitmap (one word per warp and tile). Needs the tie prefix in chunk
// order.
__device__ void mark_taken_chunks(const rank_entries & entries, select_shared & sh, uint32_t * words) {
    const bool     take_all = sh.take_all != 0;
    const uint32_t T = sh.prefix, tie_room = sh.remaining;
    const int      n_cc = entries.n_cc;
    int            tie_carry = 0;
    entries.for_each_tile([&](int t0, unsigned long long e) {
        const uint32_t key = (uint32_t) (e >> 32), w = (uint32_t) e;
        const bool     tie = !take_all && w > 0 && key == T;
        int            ties_in_tile;
        const int      ties_before =
            tie_carry + block_exclusive_scan<kSelectThreads>(tie ? (int) w : 0, sh.scan_tmp, ties_in_tile);
        const bool     taken = w > 0 && (take_all || key < T || (tie && (uint32_t) ties_before < tie_room));
        const unsigned word  = __ballot_sync(kFullMask, taken);
        if (lane_id() == 0 && t0 + warp_id() * 32 < n_cc) {
            words[(t0 >> 5) + warp_id()] = word;
        }
        tie_carry += ties_in_tile;
    });
    __syncthreads();  // the bitmap is read by other threads next
}

// Emits sink, runs of taken chunks and local window as rw_push() would: sorted, merged when touching.
// A taken chunk starts a new range unless the previous chunk is taken or it starts inside the sink
// (bounds[c] <= sink_end); a run ends at its last taken chunk. Returns the range count, or -1 on overflow.
__device__ int emit_ranges(const select_plan & P, const block_plan & bp, int n_cc, bool any_taken,
                           const uint32_t * words, select_shared & sh, int32_t * slot) {
    const int has_sink = bp.sink_end > 0 ? 1 : 0;
    const int max_r    = P.max_ranges;
    if (threadIdx.x == 0) {
        if (has_sink) {
            slot[1] = 0;
            slot[2] = bp.sink_end;
        }
        sh.last_end = has_sink ? bp.sink_end : 0;
    }
    int starts = 0;  // ranges opened by chunk runs so far (uniform)
    if (any_taken) {
        for (int t0 = 0; t0 < n_cc; t0 += kSelectThreads) {  // the barriers below also order slot[2]
            const int     c     = t0 + threadIdx.x;
            const bool    taken = c < n_cc && bit_of(words, c);
            const bool    prev  = taken && c > 0 && bit_of(words, c - 1);
            const bool    next  = taken && c + 1 < n_cc && bit_of(words, c + 1);
            const int32_t cs    = taken ? P.bounds[c] : 0;
            const bool    opens = taken && !prev && !(has_sink && cs <= bp.sink_end);
            int           opened;
            const int     idx = has_sink + starts + block_exclusive_scan<kSelectThreads>(opens ? 1 : 0, sh.scan_tmp, opened);
            if (opens && idx < max_r) {
                slot[1 + 2 * idx] = cs;
            }
            if (taken && !next) {
                const int     run = idx + (opens ? 1 : 0) - 1;  // its range (the sink's when merged into it)
                const int32_t end = min(P.bounds[c + 1], bp.n_causal);
                if (run < max_r) {
                    slot[2 + 2 * run] = end;
                }
                atomicMax(&sh.last_end, end);
            }
            starts += opened;
        }
    }
    __syncthreads();
    int count = has_sink + starts;
    if (count > max_r) {
        return -1;
    }
    const bool local_merges = count > 0 && bp.local_start <= sh.last_end;
    if (threadIdx.x == 0) {
        if (local_merges) {
            slot[2 * count] = bp.n_causal;  // the last range grows to pe + 1 (its end is <= n_causal)
        } else if (count < max_r) {
            slot[1 + 2 * count] = bp.local_start;
            slot[2 + 2 * count] = bp.n_causal;
        }
    }
    if (!local_merges) {
        if (count >= max_r) {
            return -1;
        }
        ++count;
    }
    return count;
}

// The range list of (block, KV head) bg when the selection is sparse and has not failed so far.
__device__ void select_block_ranges(const select_plan & P, const select_control & ctl, int bg, select_shared & sh,
                                    uint32_t * words) {
    const int        b    = bg / P.in.n_head_kv;
    const block_plan bp   = plan_block(P, b, ctl.q_pos0);
    int32_t *        slot = P.sel + (P.in.n_q + 1) + (int64_t) bg * P.slot_size;
    if (bp.dense) {  // uniform
        if (threadIdx.x == 0) {
            slot[0] = 1;
            slot[1] = 0;
            slot[2] = bp.n_causal;
        }
        return;
    }
    const int  n_cc      = P.block_chunks[b];
    const bool any_taken = bp.need > 0 && n_cc > 0;
    if (any_taken) {  // uniform
        rank_entries entries;
        entries.load(P.rank + (int64_t) bg * P.chunk_cap, n_cc);
        find_take_threshold(entries, (uint32_t) bp.need, sh);
        mark_taken_chunks(entries, sh, words);
    }
    const int count = emit_ranges(P, bp, n_cc, any_taken, words, sh, slot);
    if (threadIdx.x == 0) {
        if (count < 0) {
            P.ctrl->failed = 1;  // the CPU's DHSA_ERR_BUFFER: every slot becomes dense
        } else {
            slot[0] = count;
        }
    }
}

// write_dense_slots() for one (block, KV head): [0, pe + 1) with pe the block's last row position (none
// when every row is masked), as the CPU op writes when the selection is not sparse or failed.
__device__ void write_dense_slot(const select_plan & P, int64_t bg) {
    const int64_t b  = bg / P.in.n_head_kv;
    const int64_t r0 = b * P.q_block, r1 = min((int64_t) P.in.n_q, r0 + P.q_block);
    int32_t       pe = -1;
    for (int64_t r = r0; r < r1; ++r) {
        pe = max(pe, P.sel[r]);
    }
    int32_t * slot = P.sel + (P.in.n_q + 1) + bg * P.slot_size;
    slot[0]        = pe >= 0 ? 1 : 0;
    slot[1]        = 0;
    slot[2]        = pe + 1;
}

// One CTA per (block, KV head). Also what a separate finish kernel did: the last CTA to finish (a
// counter in the control, reset by the keysim or control launch) writes the sparse flag and, when a range
// list overflowed in this launch, dense slots for every (block, KV head). When the selection was already
// not sparse or failed (a segment with too many chunks) as the launch starts, each CTA writes its own
// dense slot.
__global__ void __launch_bounds__(kSelectThreads, 1) select_ranges_kernel(const select_plan P) {
    __shared__ select_shared sh;
    extern __shared__ uint32_t taken_s[];  // bit c: chunk c taken (bitmap_words words)

    pdl_wait();
    pdl_launch_dependents();
    const select_control ctl      = read_control(P);
    const bool           selected = ctl.sparse && !ctl.failed;
    if (selected) {
        select_block_ranges(P, ctl, (int) blockIdx.x, sh, taken_s);
    } else if (threadIdx.x == 0) {
        write_dense_slot(P, blockIdx.x);
    }
    // Every thread's writes (slots, the failed flag) are ordered before the CTA's count (threadFenceReduction).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        sh.last_cta = atomicAdd(&P.ctrl->done, 1) == (int) gridDim.x - 1 ? 1 : 0;
    }
    __syncthreads();
    if (!sh.last_cta) {
        return;
    }
    __threadfence();
    const bool ok = selected && *(volatile const int32_t *) &P.ctrl->failed == 0;
    if (threadIdx.x == 0) {
        P.sel[P.in.n_q] = ok ? 1 : 0;
    }
    if (selected && !ok) {  // a list overflowed in this launch: every slot becomes dense
        const int64_t n_bg = (int64_t) P.n_blocks * P.in.n_head_kv;
        for (int64_t bg = threadIdx.x; bg < n_bg; bg += kSelectThreads) {
            write_dense_slot(P, bg);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Host side: sizes, scratch layout, launches.
// ---------------------------------------------------------------------------------------------------

constexpr size_t kScratchAlign = 256;

size_t align_up(size_t n) {
    return (n + kScratchAlign - 1) & ~(kScratchAlign - 1);
}

// Lays out aligned regions one after another in a buffer: take(bytes) returns the region's offset; off
// is the size so far. Shared by the scratch and the segment-cache layouts.
struct offset_taker {
    size_t off = 0;
    size_t operator()(size_t bytes) {
        const size_t at = off;
        off += align_up(bytes);
        return at;
    }
};

int64_t ceil_div(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}

// dhsa_params_check() and the CPU op's other conditions for a sparse selection that the host can check.
bool sparse_allowed(const dhsa_cuda_select_args * a) {
    const dhsa_params & p = a->params;
    return p.budget > 0.0 && p.budget < 1.0 && p.q_block >= 1 && p.sink_tokens >= 0 && p.local_tokens >= 0 &&
           (p.boundary == DHSA_BOUNDARY_KEYSIM || p.boundary == DHSA_BOUNDARY_FIXED) && p.chunk_min >= 1 &&
           p.chunk_min <= p.chunk_max && p.chunk_avg >= 1 && p.window >= 1 && a->in.n_head % a->in.n_head_kv == 0 &&
           a->max_ranges >= 1;
}

bool args_usable(const dhsa_cuda_select_args * a) {
    return a != nullptr && a->in.q != nullptr && a->in.k != nullptr && a->in.mask != nullptr && a->sel != nullptr &&
           a->in.n_q >= 1 && a->in.n_kv >= 1 && a->in.n_head >= 1 && a->in.n_head_kv >= 1 && a->in.d >= 1 &&
           a->params.q_block >= 1 && a->max_ranges >= 1;
}

// Byte offsets of the scratch sub-buffers.
struct scratch_layout {
    size_t ctrl, fp_new, fp_match, seg_hit, cut_scores, bounds, chunk_slot, block_chunks, qb, rank, seg_cuts, kc, total;
};

// Fills the host-known sizes of the plan and returns the scratch layout.
scratch_layout plan_sizes(const dhsa_cuda_select_args * a, select_plan & P) {
    const dhsa_params & p = a->params;
    P.n_blocks     = (int32_t) ceil_div(a->in.n_q, p.q_block);
    P.n_seg        = (int32_t) ceil_div(a->in.n_kv, kSegment);
    const int32_t shortest = p.chunk_min < p.chunk_avg ? p.chunk_min : p.chunk_avg;
    P.seg_chunks   = kSegment / (shortest > 1 ? shortest : 1) + 3;  // as select_geometry::seg_chunks
    P.seg_cap      = P.seg_chunks < kSegment ? P.seg_chunks : kSegment;  // a segment has <= 512 chunks
    P.n_pairs      = a->in.n_head_kv * a->in.d;
    const int64_t n_slots = (int64_t) P.n_seg * P.seg_cap;  // Kc slots of all segments
    P.chunk_cap    = (int32_t) (a->in.n_kv < n_slots ? a->in.n_kv : n_slots);
    P.bitmap_words = (int32_t) ceil_div(P.chunk_cap, 32);
    // keysim candidates of a segment: [seg0 + chunk_min, seg1 - chunk_min], at most 512 - 2 chunk_min + 1
    const int64_t max_cand = p.chunk_min >= 1 ? (int64_t) kSegment - 2 * (int64_t) p.chunk_min + 1 : 0;
    P.keysim_parts  = p.boundary == DHSA_BOUNDARY_KEYSIM && max_cand > 0 ? (int32_t) ceil_div(max_cand, kKeysimPart) : 0;
    P.qb_ctas       = (int32_t) ((int64_t) P.n_blocks * a->in.n_head_kv * ceil_div(a->in.d, kQbLanes));
    P.score_tiles   = (int32_t) ceil_div(P.n_blocks, kScoreBlocks);
    P.kc_groups     = (int32_t) ceil_div(P.seg_cap, kKcChunks);
    P.kc_pair_tiles = (int32_t) ceil_div((int64_t) a->in.n_head_kv * a->in.d, kKcPairs);
    P.row_ctas      = (int32_t) ceil_div(a->in.n_q, kRowsPerCta);

    // With a cache the per-segment results (cuts, Kc) live in its entries, and the scratch holds the
    // fingerprints and hit flags of this call instead.
    const bool    cached = a->cache != nullptr;
    const int64_t bg     = (int64_t) P.n_blocks * a->in.n_head_kv;
    scratch_layout L;
    offset_taker   take;
    L.ctrl       = take(sizeof(select_control));
    L.fp_new     = take(cached ? sizeof(unsigned long long) * (size_t) P.n_seg : 0);
    L.fp_match   = take(cached ? sizeof(int32_t) * (size_t) P.n_seg : 0);
    L.seg_hit    = take(cached ? sizeof(int32_t) * (size_t) P.n_seg : 0);
    L.cut_scores = take(P.keysim_parts > 0 ? sizeof(float) * (size_t) P.n_seg * a->in.n_head_kv * kSegment : 0);
    L.bounds     = take(sizeof(int32_t) * ((size_t) P.chunk_cap + 1));
    L.chunk_slot = take(sizeof(int32_t) * (size_t) P.chunk_cap);
    L.block_chunks = take(sizeof(int32_t) * (size_t) P.n_blocks);
    L.qb         = take(sizeof(float) * (size_t) bg * a->in.d);
    L.rank       = take(sizeof(unsigned long long) * (size_t) bg * P.chunk_cap);
    L.seg_cuts   = take(cached ? 0 : sizeof(int32_t) * (size_t) P.n_seg * (1 + kSegment));
    L.kc         = take(cached ? 0 : sizeof(float) * (size_t) n_slots * P.n_pairs);
    L.total      = take.off;
    return L;
}

// PYDHSA_CUDA_SELECT_PDL=0 launches the kernels without programmatic dependent launch (for comparison).
bool pdl_enabled() {
    static const bool enabled = [] {
        const char * v = getenv("PYDHSA_CUDA_SELECT_PDL");
        return v == nullptr || v[0] != '0';
    }();
    return enabled;
}

// A launch on the stream; pdl: the kernel may be launched before the previous one completes (it waits in
// pdl_wait()).
cudaError_t launch(void (*kernel)(select_plan), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                   const select_plan & P) {
    cudaLaunchAttribute attr[1];
    attr[0].id                                         = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg                             = {};
    cfg.gridDim                                        = grid;
    cfg.blockDim                                       = block;
    cfg.dynamicSmemBytes                               = smem;
    cfg.stream                                         = stream;
    cfg.attrs                                          = attr;
    cfg.numAttrs                                       = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, P);
}

}  // namespace

// The per-layer segment cache (dhsa-cuda.h): one device allocation holding `segments` entries laid out
// for one geometry (seg_cap Kc slots per entry, n_pairs floats per slot):
//   fp [segments] u64 | valid [segments] i32 | cuts [segments][1 + 512] i32 | kc [segments][n_pairs][seg_cap] f32
// The host only acts when a call needs more entries or another geometry: every entry is then invalidated
// (the valid flags are cleared on the call's stream, after the kernels of earlier calls), and the memory is
// reallocated when it is too small (after a device synchronisation: earlier calls may still read it).
struct dhsa_cuda_cache {
    int     device   = -1;       // where mem lives
    void *  mem      = nullptr;
    size_t  bytes    = 0;        // size of mem
    int32_t segments = 0;        // entries laid out in mem (0: none usable)
    int32_t seg_cap  = 0;        // geometry of the layout
    int32_t n_pairs  = 0;
};

namespace {

constexpr int64_t kMinCacheSegments = 8;

struct cache_layout {
    size_t fp, valid, cuts, kc, total;
};

cache_layout cache_layout_of(int64_t segments, int64_t seg_cap, int64_t n_pairs) {
    cache_layout L;
    offset_taker take;
    L.fp    = take(sizeof(unsigned long long) * (size_t) segments);
    L.valid = take(sizeof(int32_t) * (size_t) segments);
    L.cuts  = take(sizeof(int32_t) * (size_t) segments * (1 + kSegment));
    L.kc    = take(sizeof(float) * (size_t) segments * (size_t) n_pairs * (size_t) seg_cap);
    L.total = take.off;
    return L;
}

// Frees the cache's memory (on its device) once no kernel can use it; the cache is then empty.
cudaError_t cache_release(dhsa_cuda_cache * c) {
    cudaError_t st = cudaSuccess;
    if (c->mem != nullptr) {
        int        current = -1;
        const bool other   = cudaGetDevice(&current) == cudaSuccess && current != c->device;
        if (other) {
            st = cudaSetDevice(c->device);
        }
        if (st == cudaSuccess) {
            st = cudaDeviceSynchronize();
        }
        const cudaError_t st_free = cudaFree(c->mem);
        if (st == cudaSuccess) {
            st = st_free;
        }
        if (other) {
            cudaSetDevice(current);
        }
    }
    c->device   = -1;
    c->mem      = nullptr;
    c->bytes    = 0;
    c->segments = 0;
    c->seg_cap  = 0;
    c->n_pairs  = 0;
    return st;
}

// Makes the cache hold at least `segments` entries of the given geometry on the current device; L: its
// layout. Keeps the entries when it already does; otherwise lays it out anew with every entry invalid.
cudaError_t cache_reserve(dhsa_cuda_cache * c, int32_t segments, int32_t seg_cap, int32_t n_pairs, cudaStream_t stream,
                          cache_layout & L) {
    int         device = -1;
    cudaError_t st     = cudaGetDevice(&device);
    if (st != cudaSuccess) {
        return st;
    }
    if (c->mem != nullptr && c->device != device) {  // not expected (a layer stays on its device): start over
        st = cache_release(c);
        if (st != cudaSuccess) {
            return st;
        }
    }
    const bool same_geometry = c->mem != nullptr && c->seg_cap == seg_cap && c->n_pairs == n_pairs;
    if (same_geometry && c->segments >= segments) {
        L = cache_layout_of(c->segments, seg_cap, n_pairs);
        return cudaSuccess;
    }
    // A growing context grows the cache by half each time, so it is laid out anew (and recomputed) only
    // O(log n_kv) times; another geometry (chunking parameters, head shape) starts from what is needed.
    int64_t want = segments > kMinCacheSegments ? segments : kMinCacheSegments;
    if (same_geometry && (int64_t) c->segments + c->segments / 2 > want) {
        want = (int64_t) c->segments + c->segments / 2;
    }
    const cache_layout N = cache_layout_of(want, seg_cap, n_pairs);
    if (c->mem == nullptr || N.total > c->bytes) {
        st = cache_release(c);
        if (st != cudaSuccess) {
            return st;
        }
        void * mem = nullptr;
        st         = cudaMalloc(&mem, N.total);
        if (st != cudaSuccess) {
            (void) cudaGetLastError();  // reported through the return value
            return st;
        }
        c->device = device;
        c->mem    = mem;
        c->bytes  = N.total;
    }
    c->segments = 0;  // not usable until the flags are cleared
    st          = cudaMemsetAsync((char *) c->mem + N.valid, 0, sizeof(int32_t) * (size_t) want, stream);
    if (st != cudaSuccess) {
        return st;
    }
    c->segments = (int32_t) want;
    c->seg_cap  = seg_cap;
    c->n_pairs  = n_pairs;
    L           = N;
    return cudaSuccess;
}

}  // namespace

struct dhsa_cuda_cache * dhsa_cuda_cache_create(void) {
    return new (std::nothrow) dhsa_cuda_cache();
}

void dhsa_cuda_cache_free(struct dhsa_cuda_cache * cache) {
    if (cache != nullptr) {
        (void) cache_release(cache);
        delete cache;
    }
}

size_t dhsa_cuda_select_scratch_size(const struct dhsa_cuda_select_args * a) {
    if (!args_usable(a)) {
        return 0;
    }
    select_plan P{};
    return plan_sizes(a, P).total;
}

cudaError_t dhsa_cuda_select(const struct dhsa_cuda_select_args * a, cudaStream_t stream) {
    if (!args_usable(a) || a->scratch == nullptr) {
        return cudaErrorInvalidValue;
    }
    const dhsa_params & p = a->params;
    select_plan         P{};
    P.in = a->in;
    P.group = a->in.n_head / a->in.n_head_kv;
    P.budget = p.budget;
    P.boundary = p.boundary;
    P.chunk_min = p.chunk_min;
    P.chunk_max = p.chunk_max;
    P.chunk_avg = p.chunk_avg;
    P.window = p.window;
    P.q_block = p.q_block;
    P.sink_tokens = p.sink_tokens;
    P.local_tokens = p.local_tokens;
    P.dense_from = p.dense_from;
    P.min_context = a->min_context;
    P.max_ranges = a->max_ranges;
    P.slot_size = 1 + 2 * a->max_ranges;
    P.sparse_allowed = sparse_allowed(a) ? 1 : 0;
    P.keys_vectorized = (uintptr_t) a->in.k % 16 == 0 && a->in.k_row % 8 == 0 && a->in.k_head % 8 == 0 && a->in.d % 8 == 0;
    P.sel = a->sel;

    const scratch_layout L    = plan_sizes(a, P);
    char *               base = (char *) a->scratch;
    P.ctrl       = (select_control *) (base + L.ctrl);
    P.cut_scores = (float *) (base + L.cut_scores);
    P.bounds     = (int32_t *) (base + L.bounds);
    P.chunk_slot = (int32_t *) (base + L.chunk_slot);
    P.block_chunks = (int32_t *) (base + L.block_chunks);
    P.qb         = (float *) (base + L.qb);
    P.rank       = (unsigned long long *) (base + L.rank);
    if (a->cache == nullptr) {
        P.seg_cuts = (int32_t *) (base + L.seg_cuts);
        P.kc       = (float *) (base + L.kc);
    } else if (P.sparse_allowed) {  // (not sparse: no kernel reads per-segment results, the cache is untouched)
        cache_layout      C;
        const cudaError_t st = cache_reserve(a->cache, P.n_seg, P.seg_cap, P.n_pairs, stream, C);
        if (st != cudaSuccess) {
            return st;
        }
        char * mem    = (char *) a->cache->mem;
        P.use_cache   = 1;
        P.fp_new      = (unsigned long long *) (base + L.fp_new);
        P.fp_match    = (int32_t *) (base + L.fp_match);
        P.seg_hit     = (int32_t *) (base + L.seg_hit);
        P.cache_fp    = (unsigned long long *) (mem + C.fp);
        P.cache_valid = (int32_t *) (mem + C.valid);
        P.seg_cuts    = (int32_t *) (mem + C.cuts);
        P.kc          = (float *) (mem + C.kc);
        P.fp_segments = P.in.n_kv / kSegment;  // the complete segments of n_kv (those of n_eff are among them)
    }

    if (!P.sparse_allowed) {
        P.qb_ctas = 0;  // nothing reads Qb
    }
    const unsigned n_bg = (unsigned) ((int64_t) P.n_blocks * P.in.n_head_kv);
    int            device = 0, cc_major = 0, n_sm = 0;
    cudaError_t    st = cudaGetDevice(&device);
    if (st == cudaSuccess) {
        st = cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device);
    }
    if (st == cudaSuccess) {
        st = cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device);
    }
    if (st != cudaSuccess) {
        return st;
    }
    const bool pdl = cc_major >= 9 && pdl_enabled();

    st = launch(prologue_kernel, (unsigned) (P.qb_ctas + P.row_ctas + P.fp_segments), kPrologueThreads, 0, stream,
                false, P);
    if (st != cudaSuccess) {
        return st;
    }
    if (P.sparse_allowed) {
        // keysim items over a grid of at most kKeysimCtasPerSm CTAs per SM, at most kKeysimThreads items each
        const int64_t items  = (int64_t) P.n_seg * P.keysim_parts * P.in.n_head_kv;
        const int64_t capped = items < (int64_t) n_sm * kKeysimCtasPerSm ? items : (int64_t) n_sm * kKeysimCtasPerSm;
        const int64_t least  = ceil_div(items, kKeysimThreads);
        const int64_t keysim_ctas = capped > least ? capped : least;
        st = launch(keysim_kernel, (unsigned) (keysim_ctas > 1 ? keysim_ctas : 1), kKeysimThreads, 0, stream, pdl, P);
        if (st == cudaSuccess) {
            st = launch(segment_cuts_kernel, (unsigned) P.n_seg, kCutsThreads, 0, stream, pdl, P);
        }
        if (st == cudaSuccess) {
            st = launch(kc_and_bounds_kernel, (unsigned) (P.n_seg * P.kc_groups * P.kc_pair_tiles), kKcThreads, 0, stream,
                        pdl, P);
        }
        if (st != cudaSuccess) {
            return st;
        }
        const size_t qb_bytes =
            sizeof(float) * kScoreBlocks * (size_t) (ceil_div(P.in.d, 2 * kScoreBatch) * 2 * kScoreBatch);
        if (qb_bytes > 48 * 1024) {
            st = cudaFuncSetAttribute(chunk_scores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) qb_bytes);
            if (st != cudaSuccess) {
                return st;
            }
        }
        st = launch(chunk_scores_kernel, dim3((unsigned) (P.score_tiles * P.in.n_head_kv), (unsigned) ceil_div(P.chunk_cap, kScoreThreads)),
                    kScoreThreads, qb_bytes, stream, pdl, P);
        if (st != cudaSuccess) {
            return st;
        }
        const size_t bitmap_bytes = sizeof(uint32_t) * (size_t) P.bitmap_words;
        if (bitmap_bytes > 48 * 1024) {  // more than 393K chunks
            st = cudaFuncSetAttribute(select_ranges_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) bitmap_bytes);
            if (st != cudaSuccess) {
                return st;
            }
        }
        st = launch(select_ranges_kernel, n_bg, kSelectThreads, bitmap_bytes, stream, pdl, P);
    } else {
        // Invalid parameters or budget >= 1: the CPU op is dense. (Sizes derived from invalid parameters,
        // chunk_min 0 and such, would not be meaningful, so only the control and the dense slots are
        // written: select_ranges_kernel sees a selection that is not sparse.)
        st = launch(control_kernel, 1, 32, 0, stream, pdl, P);
        if (st == cudaSuccess) {
            st = launch(select_ranges_kernel, n_bg, kSelectThreads, 0, stream, pdl, P);
        }
    }
    if (st != cudaSuccess) {
        return st;
    }
    return cudaGetLastError();
}
