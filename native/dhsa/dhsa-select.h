/*
 * dhsa-select: DHSA chunk boundaries and key-range selection for one layer, one sequence (plain C11).
 *
 * Computes exactly what pydhsa/reference.py computes (the contract is native/dhsa/ALGORITHM.md):
 * boundaries (keysim or fixed, with a frozen prefix), chunk and query-block representations, and the
 * per (query block, KV head) key ranges the sparse attention kernel walks.
 *
 * Conventions
 *  - Every function returns a dhsa_status (0 = ok); none aborts or prints.
 *  - Tensors are float32, ggml-style, with strides in ELEMENTS (not bytes): element (i, h, j) of a
 *    [rows, heads, d] tensor (i along d, h the head, j the token) is data[j*nb_row + h*nb_head + i].
 *    The d axis must be contiguous; the other two strides are free, so f32 views of ggml tensors can be
 *    passed without copying.
 *  - Positions are int32 key indices in the cache. Queries of the ubatch sit at positions
 *    q_pos0 .. q_pos0 + n_q - 1; a query at position p sees keys 0..p.
 *  - Functions that need scratch memory take (work, work_size): pass a buffer of at least the size the
 *    matching *_workspace_size() returns, or work = NULL to let the function malloc and free it once per
 *    call (never inside a loop).
 *  - Exactness: the float32 scores must match the reference bit for bit, so this file must be compiled
 *    without reassociation (no -ffast-math / -fassociative-math); it turns off FMA contraction itself
 *    (pragma), since a fused multiply-add rounds differently from a multiply then an add.
 *
 * The declarations between "cffi:begin" and "cffi:end" stay plain C (no preprocessor lines), so a cffi
 * binding can read them directly.
 */
#ifndef DHSA_SELECT_H
#define DHSA_SELECT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi:begin */
/* The keysim window the engine runs with (ALGORITHM.md: a constant, not a parameter). */
#define DHSA_KEYSIM_WINDOW 4

typedef enum {
    DHSA_OK           = 0,
    DHSA_ERR_ARGUMENT = 1, /* a parameter is out of range, inconsistent or NULL */
    DHSA_ERR_BUFFER   = 2, /* an output buffer (max_bounds / max_ranges) or the workspace is too small */
    DHSA_ERR_ALLOC    = 3  /* work == NULL and malloc failed */
} dhsa_status;

typedef enum {
    DHSA_BOUNDARY_KEYSIM = 0, /* content-driven cuts: key-window dissimilarity + greedy NMS */
    DHSA_BOUNDARY_FIXED  = 1  /* a cut every chunk_avg keys (block-sparse baseline) */
} dhsa_boundary;

/* dense_from value meaning "no dense tail": no key position reaches it. */
enum { DHSA_DENSE_NONE = 2147483647 };

typedef struct {
    double  budget;       /* 0 < budget; >= 1 means dense. double: ceil(budget*n) must match the reference */
    int32_t boundary;     /* dhsa_boundary */
    int32_t chunk_min;    /* 1 <= chunk_min <= chunk_max */
    int32_t chunk_max;
    int32_t chunk_avg;    /* >= 1 */
    int32_t window;       /* keysim window w (keys on each side of a candidate cut), >= 1; the engine uses
                             DHSA_KEYSIM_WINDOW */
    int32_t q_block;      /* queries per block, >= 1 */
    int32_t sink_tokens;  /* >= 0 */
    int32_t local_tokens; /* >= 0 */
    int32_t dense_from;   /* blocks with a query at pos >= dense_from are dense; may be negative;
                             DHSA_DENSE_NONE = never */
} dhsa_params;

typedef struct {
    const float * data;
    int32_t n_rows;   /* tokens (n_kv for K, n_q for Q) */
    int32_t n_heads;  /* H_kv for K, H for Q */
    int32_t d;        /* head size */
    int64_t nb_row;   /* stride between tokens, in elements */
    int64_t nb_head;  /* stride between heads, in elements */
} dhsa_tensor;

/* The defaults of native/dhsa/ALGORITHM.md (budget 0.3, keysim, 16/128/32, w 4, q_block 64, sink 128, local 128, no dense tail). */
void dhsa_params_default(dhsa_params * p);

/* DHSA_OK if the parameters are usable. */
dhsa_status dhsa_params_check(const dhsa_params * p);

/* ---- step 1: boundaries ------------------------------------------------------------------------------
 * Output: n_bounds = Nc + 1 boundaries b_0 = 0 < ... < b_Nc = n_kv in bounds[0 .. n_bounds).
 * frozen[0 .. n_frozen): boundaries fixed by earlier ubatches (strictly increasing, <= n_kv; a leading
 * 0 may be omitted; frozen may be NULL when n_frozen == 0). They are copied unchanged and only the region
 * after the last one is chunked. max_bounds = n_kv + 1 always suffices (else DHSA_ERR_BUFFER). */
dhsa_status dhsa_keysim_boundaries(const dhsa_tensor * K, int32_t chunk_min, int32_t chunk_max,
                                   int32_t chunk_avg, int32_t window,
                                   const int32_t * frozen, int32_t n_frozen,
                                   int32_t * bounds, int32_t max_bounds, int32_t * n_bounds,
                                   void * work, size_t work_size);

/* Scratch for dhsa_keysim_boundaries (and dhsa_boundaries) with n_kv keys of head size d. */
size_t dhsa_keysim_workspace_size(int32_t n_kv, int32_t d);

dhsa_status dhsa_fixed_boundaries(int32_t n_kv, int32_t chunk_avg,
                                  const int32_t * frozen, int32_t n_frozen,
                                  int32_t * bounds, int32_t max_bounds, int32_t * n_bounds);

/* The keysim scores of candidate cuts t in [t0, t1) (1 <= t0 <= t1 <= n_kv) into scores[t - t0], as the
 * boundary search ranks them. Exposed so other backends and tests can compare values bit for bit.
 * Mallocs 2*d floats (once per call). */
dhsa_status dhsa_keysim_scores(const dhsa_tensor * K, int32_t window, int32_t t0, int32_t t1, float * scores);

/* Dispatch on p->boundary. */
dhsa_status dhsa_boundaries(const dhsa_params * p, const dhsa_tensor * K,
                            const int32_t * frozen, int32_t n_frozen,
                            int32_t * bounds, int32_t max_bounds, int32_t * n_bounds,
                            void * work, size_t work_size);

/* ---- steps 2-3: representations ----------------------------------------------------------------------
 * Kc: [n_chunks][K->n_heads][K->d] contiguous, Kc[c] = sum_{j in c} K[j] / sqrt(len_c).
 * Qb: [ceil(n_q/q_block)][n_head_kv][Q->d] contiguous, Qb[b][g] = sum over the block's queries and the
 *     G = H/H_kv query heads g*G .. g*G+G-1 of Q, divided by sqrt(len_b). */
dhsa_status dhsa_chunk_reprs(const dhsa_tensor * K, const int32_t * bounds, int32_t n_chunks, float * Kc);

dhsa_status dhsa_query_block_reprs(const dhsa_tensor * Q, int32_t n_head_kv, int32_t q_block, float * Qb);

/* Chunk-level similarities S[b][g][c] = Qb[b][g] . Kc[c][g] (n_blocks x n_head_kv x n_chunks, contiguous),
 * as the selection ranks them (it computes them itself; this is for comparing backends). */
dhsa_status dhsa_chunk_scores(const float * Qb, const float * Kc, int32_t n_blocks, int32_t n_chunks,
                              int32_t n_head_kv, int32_t d, float * S);

/* ---- steps 4-5: range selection -----------------------------------------------------------------------
 * Range list layout (int32): one slot per (block b, KV head g), slots in order b * n_head_kv + g, each
 * slot dhsa_ranges_slot_size(max_ranges) = 1 + 2*max_ranges int32:
 *     slot[0] = count, slot[1 + 2k] = start_k, slot[2 + 2k] = end_k   (k < count)
 * Ranges are [start, end), sorted, disjoint and non-adjacent (touching ranges are merged), within
 * [0, pe + 1) where pe is the block's last query position. Entries past count are not written.
 * Total buffer: n_blocks * n_head_kv * dhsa_ranges_slot_size(max_ranges) int32.
 * A list longer than max_ranges gives DHSA_ERR_BUFFER; max_ranges = dhsa_max_ranges(n_kv, n_chunks)
 * always suffices. */
int32_t dhsa_max_ranges(int32_t n_kv, int32_t n_chunks);
int32_t dhsa_ranges_slot_size(int32_t max_ranges);
int32_t dhsa_n_blocks(int32_t n_q, int32_t q_block);

dhsa_status dhsa_select_ranges(const dhsa_params * p, const float * Qb, const float * Kc,
                               const int32_t * bounds, int32_t n_chunks,
                               int32_t n_q, int32_t q_pos0, int32_t n_head_kv, int32_t d,
                               int32_t * ranges, int32_t max_ranges,
                               void * work, size_t work_size);

/* Scratch for dhsa_select_ranges. */
size_t dhsa_select_ranges_workspace_size(int32_t n_chunks);

/* ---- everything at once -------------------------------------------------------------------------------
 * Boundaries (into bounds, as dhsa_boundaries), representations and ranges (as dhsa_select_ranges).
 * Needs n_kv >= q_pos0 + n_q. Kc and Qb live in the workspace. */
dhsa_status dhsa_select(const dhsa_params * p, const dhsa_tensor * Q, const dhsa_tensor * K, int32_t q_pos0,
                        const int32_t * frozen, int32_t n_frozen,
                        int32_t * bounds, int32_t max_bounds, int32_t * n_bounds,
                        int32_t * ranges, int32_t max_ranges,
                        void * work, size_t work_size);

/* Scratch for dhsa_select when the boundaries give at most max_chunks chunks (max_chunks = n_kv always
 * suffices; a caller that knows a tighter bound saves memory: Kc takes max_chunks*n_head_kv*d floats).
 * A workspace too small for the chunks actually found gives DHSA_ERR_BUFFER. */
size_t dhsa_select_workspace_size(int32_t n_kv, int32_t max_chunks, int32_t n_q, int32_t n_head_kv, int32_t d,
                                  int32_t q_block);
/* cffi:end */

#ifdef __cplusplus
}
#endif

#endif /* DHSA_SELECT_H */
