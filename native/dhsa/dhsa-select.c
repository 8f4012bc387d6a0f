/*
 * dhsa-select.c: see dhsa-select.h and ALGORITHM.md. Mirrors pydhsa/reference.py function by function.
 *
 * Exactness first: boundaries and ranges must be identical to the NumPy reference, so every float32
 * value that is compared (keysim scores, chunk scores) is computed with the documented operation order:
 * sums in increasing index order, one rounding per multiply and per add.
 */

/* A fused multiply-add skips the rounding of the product and would make scores differ from the
 * reference in the last bit, which can reorder chunks. GCC contracts across statements under
 * -ffp-contract=fast (its default in GNU mode, and ggml builds with -march=native), so turn it off
 * for this file whatever the command line says. */
#if defined(__clang__)
#    pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#    pragma GCC optimize("fp-contract=off")
#elif defined(_MSC_VER)
#    pragma fp_contract(off)
#endif

#if defined(__FAST_MATH__)
#    error "dhsa-select.c must not be compiled with -ffast-math: its float32 sums must keep their order"
#endif

#include "dhsa-select.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------------- */
/* small helpers                                                                                        */
/* ---------------------------------------------------------------------------------------------------- */

/* Bump allocator over the caller's workspace: sub-buffers are 64-byte aligned so any of them can hold
 * floats or int32 regardless of what precedes them. */
#define DHSA_ALIGN 64

typedef struct {
    char * base;
    size_t size;
    size_t used;
} arena;

static size_t align_up(size_t n) {
    return (n + DHSA_ALIGN - 1) & ~(size_t) (DHSA_ALIGN - 1);
}

static void * arena_take(arena * a, size_t bytes) {
    size_t off = align_up((size_t) (uintptr_t) (a->base + a->used)) - (size_t) (uintptr_t) a->base;
    if (off + bytes > a->size) {
        return NULL;
    }
    a->used = off + bytes;
    return a->base + off;
}

/* Room for one sub-buffer of `bytes` in a workspace, alignment slack included. */
static size_t ws_bytes(size_t bytes) {
    return align_up(bytes) + DHSA_ALIGN;
}

/* Either wraps the caller's workspace or mallocs `need` bytes (freed by arena_end). */
static dhsa_status arena_begin(arena * a, void * work, size_t work_size, size_t need, int * owned) {
    *owned = 0;
    if (work == NULL) {
        work = malloc(need > 0 ? need : 1);
        if (work == NULL) {
            return DHSA_ERR_ALLOC;
        }
        work_size = need;
        *owned = 1;
    } else if (work_size < need) {
        return DHSA_ERR_BUFFER;
    }
    a->base = (char *) work;
    a->size = work_size;
    a->used = 0;
    return DHSA_OK;
}

static void arena_end(arena * a, int owned) {
    if (owned) {
        free(a->base);
    }
}

static const float * row_ptr(const dhsa_tensor * t, int64_t j, int64_t h) {
    return t->data + j * t->nb_row + h * t->nb_head;
}

static int tensor_ok(const dhsa_tensor * t) {
    return t != NULL && t->data != NULL && t->n_rows >= 1 && t->n_heads >= 1 && t->d >= 1;
}

/* sum_i a[i]*b[i], i increasing, product rounded to float32 before the add (FP contraction is off). */
static float dot_f32(const float * a, const float * b, int32_t d) {
    float acc = 0.0f;
    for (int32_t i = 0; i < d; i++) {
        acc += a[i] * b[i];
    }
    return acc;
}

/* An entry to rank: a float32 score and an integer key (candidate position or chunk index). Sorting
 * by (score descending, key ascending) is a total order, so qsort's instability does not matter. */
typedef struct {
    float   score;
    int32_t key;
} ranked;

static int ranked_cmp(const void * pa, const void * pb) {
    const ranked * a = (const ranked *) pa;
    const ranked * b = (const ranked *) pb;
    if (a->score > b->score) {
        return -1;
    }
    if (a->score < b->score) {
        return 1;
    }
    return (a->key > b->key) - (a->key < b->key);
}

/* ---------------------------------------------------------------------------------------------------- */
/* parameters                                                                                           */
/* ---------------------------------------------------------------------------------------------------- */

void dhsa_params_default(dhsa_params * p) {
    if (p == NULL) {
        return;
    }
    p->budget       = 0.3;
    p->boundary     = DHSA_BOUNDARY_KEYSIM;
    p->chunk_min    = 16;
    p->chunk_max    = 128;
    p->chunk_avg    = 32;
    p->window       = DHSA_KEYSIM_WINDOW;
    p->q_block      = 64;
    p->sink_tokens  = 128;
    p->local_tokens = 128;
    p->dense_from   = DHSA_DENSE_NONE;
}

static int chunk_params_ok(int32_t chunk_min, int32_t chunk_max, int32_t chunk_avg, int32_t window) {
    return chunk_min >= 1 && chunk_min <= chunk_max && chunk_avg >= 1 && window >= 1;
}

dhsa_status dhsa_params_check(const dhsa_params * p) {
    if (p == NULL || !(p->budget > 0.0) || p->q_block < 1 || p->sink_tokens < 0 || p->local_tokens < 0) {
        return DHSA_ERR_ARGUMENT;
    }
    if (p->boundary != DHSA_BOUNDARY_KEYSIM && p->boundary != DHSA_BOUNDARY_FIXED) {
        return DHSA_ERR_ARGUMENT;
    }
    return chunk_params_ok(p->chunk_min, p->chunk_max, p->chunk_avg, p->window) ? DHSA_OK : DHSA_ERR_ARGUMENT;
}

/* ---------------------------------------------------------------------------------------------------- */
/* step 1: boundaries                                                                                   */
/* ---------------------------------------------------------------------------------------------------- */

/* Copies the frozen boundaries to bounds (prepending 0 when missing) after checking them; *n_out is the
 * count written and the region to chunk is [bounds[*n_out - 1], n_kv). */
static dhsa_status copy_frozen(int32_t n_kv, const int32_t * frozen, int32_t n_frozen, int32_t * bounds,
                               int32_t max_bounds, int32_t * n_out) {
    if (n_frozen < 0 || (n_frozen > 0 && frozen == NULL) || bounds == NULL || max_bounds < 1) {
        return DHSA_ERR_ARGUMENT;
    }
    int32_t n = 0;
    if (n_frozen == 0 || frozen[0] != 0) {
        bounds[n++] = 0;
    }
    for (int32_t k = 0; k < n_frozen; k++) {
        /* Strictly increasing after the leading 0 (so negatives are rejected too), and inside the cache. */
        if (frozen[k] > n_kv || (n > 0 && frozen[k] <= bounds[n - 1]) || frozen[k] < 0) {
            return DHSA_ERR_ARGUMENT;
        }
        if (n >= max_bounds) {
            return DHSA_ERR_BUFFER;
        }
        bounds[n++] = frozen[k];
    }
    *n_out = n;
    return DHSA_OK;
}

/* Appends the region's boundaries after `start` (already in bounds[n-1]) up to n_kv, splitting each
 * chunk longer than chunk_max into ceil(len/chunk_max) pieces, piece k starting at s + floor(k*len/n).
 * `cuts` are the accepted interior cuts in increasing order. */
static dhsa_status append_split(const int32_t * cuts, int32_t n_cuts, int32_t n_kv, int32_t chunk_max,
                                int32_t * bounds, int32_t max_bounds, int32_t * n) {
    int32_t s = bounds[*n - 1];
    for (int32_t c = 0; c <= n_cuts; c++) {
        const int32_t e      = c < n_cuts ? cuts[c] : n_kv;
        const int64_t len    = (int64_t) e - s;
        const int64_t pieces = (len + chunk_max - 1) / chunk_max;
        for (int64_t k = 1; k <= pieces; k++) {
            if (*n >= max_bounds) {
                return DHSA_ERR_BUFFER;
            }
            bounds[(*n)++] = (int32_t) (s + (k * len) / pieces);  /* int64: k*len may pass 2^31 */
        }
        s = e;
    }
    return DHSA_OK;
}

dhsa_status dhsa_fixed_boundaries(int32_t n_kv, int32_t chunk_avg, const int32_t * frozen, int32_t n_frozen,
                                  int32_t * bounds, int32_t max_bounds, int32_t * n_bounds) {
    if (n_kv < 1 || chunk_avg < 1 || n_bounds == NULL) {
        return DHSA_ERR_ARGUMENT;
    }
    int32_t     n;
    dhsa_status st = copy_frozen(n_kv, frozen, n_frozen, bounds, max_bounds, &n);
    if (st != DHSA_OK) {
        return st;
    }
    /* Cuts every chunk_avg keys from the region start (not absolute multiples), so re-chunking the
     * open tail with the earlier cuts frozen equals chunking everything at once. */
    for (int64_t b = (int64_t) bounds[n - 1] + chunk_avg; b < n_kv + (int64_t) chunk_avg; b += chunk_avg) {
        if (n >= max_bounds) {
            return DHSA_ERR_BUFFER;
        }
        bounds[n++] = (int32_t) (b < n_kv ? b : n_kv);
    }
    *n_bounds = n;
    return DHSA_OK;
}

/* Scratch for chunking a region of region_len keys; the public size takes the whole cache as region. */
static size_t keysim_region_bytes(int32_t region_len, int32_t d) {
    return ws_bytes((size_t) region_len * sizeof(ranked))   /* candidates with scores */
         + ws_bytes((size_t) region_len)                    /* per-position NMS flags */
         + ws_bytes((size_t) region_len * sizeof(int32_t))  /* accepted cuts, in order */
         + ws_bytes(2 * (size_t) d * sizeof(float));        /* left and right window sums */
}

size_t dhsa_keysim_workspace_size(int32_t n_kv, int32_t d) {
    return n_kv < 1 || d < 1 ? 0 : keysim_region_bytes(n_kv, d);
}

/* keysim score of cut t: sum over heads of (1 - cos(L_h, R_h)), L_h = sum of K[max(0,t-w) .. t-1],
 * R_h = sum of K[t .. min(n_kv,t+w)-1]. Means are replaced by sums and the head average by the head
 * sum: neither changes a cosine or a ranking, and each saved division is a rounding fewer to match.
 * Float32 order as documented in ALGORITHM.md (keys increasing, i increasing, heads increasing). */
static float keysim_score(const dhsa_tensor * K, int32_t t, int32_t w, float * L, float * R) {
    const int32_t d   = K->d;
    const int32_t jl0 = t - w > 0 ? t - w : 0;
    const int32_t jr1 = t + w < K->n_rows ? t + w : K->n_rows;
    float         score = 0.0f;
    for (int32_t h = 0; h < K->n_heads; h++) {
        for (int32_t i = 0; i < d; i++) {
            L[i] = 0.0f;
            R[i] = 0.0f;
        }
        for (int32_t j = jl0; j < t; j++) {
            const float * k = row_ptr(K, j, h);
            for (int32_t i = 0; i < d; i++) {
                L[i] += k[i];
            }
        }
        for (int32_t j = t; j < jr1; j++) {
            const float * k = row_ptr(K, j, h);
            for (int32_t i = 0; i < d; i++) {
                R[i] += k[i];
            }
        }
        const float dot = dot_f32(L, R, d);
        const float nl  = dot_f32(L, L, d);
        const float nr  = dot_f32(R, R, d);
        const float den = sqrtf(nl) * sqrtf(nr);
        /* A zero window sum has no direction: no evidence of a boundary, distance 0. */
        score += den > 0.0f ? 1.0f - dot / den : 0.0f;
    }
    return score;
}

dhsa_status dhsa_keysim_scores(const dhsa_tensor * K, int32_t window, int32_t t0, int32_t t1, float * scores) {
    if (!tensor_ok(K) || window < 1 || t0 < 1 || t1 < t0 || t1 > K->n_rows || (scores == NULL && t1 > t0)) {
        return DHSA_ERR_ARGUMENT;
    }
    float * L = malloc(2 * (size_t) K->d * sizeof(float));
    if (L == NULL) {
        return DHSA_ERR_ALLOC;
    }
    for (int32_t t = t0; t < t1; t++) {
        scores[t - t0] = keysim_score(K, t, window, L, L + K->d);
    }
    free(L);
    return DHSA_OK;
}

/* Marks positions within chunk_min of an accepted cut t (exclusive) as blocked, so the NMS test of a
 * later candidate is one lookup instead of a scan over all accepted cuts. flags are region-relative. */
static void block_around(uint8_t * blocked, int32_t rel, int32_t chunk_min, int32_t region_len) {
    const int64_t lo = (int64_t) rel - chunk_min + 1 > 0 ? (int64_t) rel - chunk_min + 1 : 0;
    const int64_t hi = (int64_t) rel + chunk_min < region_len ? (int64_t) rel + chunk_min : region_len;
    memset(blocked + lo, 1, (size_t) (hi - lo));
}

dhsa_status dhsa_keysim_boundaries(const dhsa_tensor * K, int32_t chunk_min, int32_t chunk_max,
                                   int32_t chunk_avg, int32_t window, const int32_t * frozen, int32_t n_frozen,
                                   int32_t * bounds, int32_t max_bounds, int32_t * n_bounds,
                                   void * work, size_t work_size) {
    if (!tensor_ok(K) || !chunk_params_ok(chunk_min, chunk_max, chunk_avg, window) || n_bounds == NULL) {
        return DHSA_ERR_ARGUMENT;
    }
    const int32_t n_kv = K->n_rows;
    int32_t       n;
    dhsa_status   st = copy_frozen(n_kv, frozen, n_frozen, bounds, max_bounds, &n);
    if (st != DHSA_OK) {
        return st;
    }
    const int32_t r0         = bounds[n - 1];
    const int32_t region_len = n_kv - r0;
    if (region_len == 0) {  /* everything is frozen */
        *n_bounds = n;
        return DHSA_OK;
    }
    /* round(region_len / chunk_avg) - 1 cuts, halves rounded up, in integers. */
    const int64_t want_r = (2 * (int64_t) region_len + chunk_avg) / (2 * (int64_t) chunk_avg) - 1;
    const int32_t want   = want_r > 0 ? (int32_t) want_r : 0;
    /* Only cuts at least chunk_min from both region ends can be accepted: score just those. */
    const int64_t lo = (int64_t) r0 + chunk_min;        /* int64: chunk_min may be huge */
    const int64_t hi = (int64_t) n_kv - chunk_min + 1;  /* exclusive */

    arena a;
    int   owned;
    st = arena_begin(&a, work, work_size, keysim_region_bytes(region_len, K->d), &owned);
    if (st != DHSA_OK) {
        return st;
    }
    ranked *  cand    = arena_take(&a, (size_t) region_len * sizeof(ranked));
    uint8_t * blocked = arena_take(&a, (size_t) region_len);
    int32_t * cuts    = arena_take(&a, (size_t) region_len * sizeof(int32_t));
    float *   L       = arena_take(&a, 2 * (size_t) K->d * sizeof(float));
    if (cand == NULL || blocked == NULL || cuts == NULL || L == NULL) {
        arena_end(&a, owned);
        return DHSA_ERR_BUFFER;
    }
    float * R = L + K->d;

    int32_t n_cuts = 0;
    if (want > 0 && lo < hi) {
        const int32_t n_cand = (int32_t) (hi - lo);
        for (int32_t c = 0; c < n_cand; c++) {
            cand[c].key   = (int32_t) lo + c;
            cand[c].score = keysim_score(K, (int32_t) lo + c, window, L, R);
        }
        qsort(cand, (size_t) n_cand, sizeof(ranked), ranked_cmp);

        /* Greedy NMS: best first, skip any cut closer than chunk_min to an accepted one. */
        memset(blocked, 0, (size_t) region_len);
        for (int32_t c = 0; c < n_cand && n_cuts < want; c++) {
            const int32_t rel = cand[c].key - r0;
            if (!blocked[rel]) {
                block_around(blocked, rel, chunk_min, region_len);
                blocked[rel] = 2;  /* 2 marks an accepted cut, for the in-order collection below */
                n_cuts++;
            }
        }
        /* Accepted cuts in position order (a scan instead of a second sort). */
        int32_t k = 0;
        for (int32_t rel = 0; rel < region_len; rel++) {
            if (blocked[rel] == 2) {
                cuts[k++] = r0 + rel;
            }
        }
    }
    st = append_split(cuts, n_cuts, n_kv, chunk_max, bounds, max_bounds, &n);
    arena_end(&a, owned);
    if (st == DHSA_OK) {
        *n_bounds = n;
    }
    return st;
}

dhsa_status dhsa_boundaries(const dhsa_params * p, const dhsa_tensor * K, const int32_t * frozen,
                            int32_t n_frozen, int32_t * bounds, int32_t max_bounds, int32_t * n_bounds,
                            void * work, size_t work_size) {
    if (p == NULL || !tensor_ok(K)) {
        return DHSA_ERR_ARGUMENT;
    }
    switch (p->boundary) {
        case DHSA_BOUNDARY_KEYSIM:
            return dhsa_keysim_boundaries(K, p->chunk_min, p->chunk_max, p->chunk_avg, p->window, frozen,
                                          n_frozen, bounds, max_bounds, n_bounds, work, work_size);
        case DHSA_BOUNDARY_FIXED:
            return dhsa_fixed_boundaries(K->n_rows, p->chunk_avg, frozen, n_frozen, bounds, max_bounds, n_bounds);
        default:
            return DHSA_ERR_ARGUMENT;
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* steps 2-3: representations                                                                           */
/* ---------------------------------------------------------------------------------------------------- */

dhsa_status dhsa_chunk_reprs(const dhsa_tensor * K, const int32_t * bounds, int32_t n_chunks, float * Kc) {
    if (!tensor_ok(K) || bounds == NULL || n_chunks < 1 || Kc == NULL || bounds[0] != 0 ||
        bounds[n_chunks] > K->n_rows) {
        return DHSA_ERR_ARGUMENT;
    }
    const int32_t d = K->d;
    for (int32_t c = 0; c < n_chunks; c++) {
        if (bounds[c + 1] <= bounds[c]) {
            return DHSA_ERR_ARGUMENT;
        }
        /* sqrt(len) * mean = sum / sqrt(len): one correctly rounded division instead of two roundings. */
        const float den = sqrtf((float) (bounds[c + 1] - bounds[c]));
        for (int32_t h = 0; h < K->n_heads; h++) {
            float * out = Kc + ((size_t) c * K->n_heads + h) * d;
            for (int32_t i = 0; i < d; i++) {
                out[i] = 0.0f;
            }
            for (int32_t j = bounds[c]; j < bounds[c + 1]; j++) {  /* keys in increasing position */
                const float * k = row_ptr(K, j, h);
                for (int32_t i = 0; i < d; i++) {
                    out[i] += k[i];
                }
            }
            for (int32_t i = 0; i < d; i++) {
                out[i] = out[i] / den;
            }
        }
    }
    return DHSA_OK;
}

int32_t dhsa_n_blocks(int32_t n_q, int32_t q_block) {
    return n_q > 0 && q_block > 0 ? (int32_t) (((int64_t) n_q + q_block - 1) / q_block) : 0;
}

dhsa_status dhsa_query_block_reprs(const dhsa_tensor * Q, int32_t n_head_kv, int32_t q_block, float * Qb) {
    if (!tensor_ok(Q) || n_head_kv < 1 || Q->n_heads % n_head_kv != 0 || q_block < 1 || Qb == NULL) {
        return DHSA_ERR_ARGUMENT;
    }
    const int32_t d  = Q->d;
    const int32_t G  = Q->n_heads / n_head_kv;  /* query head h belongs to KV head h / G (ggml GQA) */
    const int32_t nb = dhsa_n_blocks(Q->n_rows, q_block);
    for (int32_t b = 0; b < nb; b++) {
        const int32_t r0  = b * q_block;
        const int32_t r1  = r0 + q_block < Q->n_rows ? r0 + q_block : Q->n_rows;
        const float   den = sqrtf((float) (r1 - r0));
        for (int32_t g = 0; g < n_head_kv; g++) {
            float * out = Qb + ((size_t) b * n_head_kv + g) * d;
            for (int32_t i = 0; i < d; i++) {
                out[i] = 0.0f;
            }
            /* One accumulator: queries in order (outer), the group's heads in order (inner). */
            for (int32_t r = r0; r < r1; r++) {
                for (int32_t hh = 0; hh < G; hh++) {
                    const float * q = row_ptr(Q, r, (int64_t) g * G + hh);
                    for (int32_t i = 0; i < d; i++) {
                        out[i] += q[i];
                    }
                }
            }
            for (int32_t i = 0; i < d; i++) {
                out[i] = out[i] / den;
            }
        }
    }
    return DHSA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* steps 4-5: selection                                                                                 */
/* ---------------------------------------------------------------------------------------------------- */

/* Query block b, KV head g against every chunk: the per-(block, head) dot products select_block ranks. */
dhsa_status dhsa_chunk_scores(const float * Qb, const float * Kc, int32_t n_blocks, int32_t n_chunks,
                              int32_t n_head_kv, int32_t d, float * S) {
    if (Qb == NULL || Kc == NULL || S == NULL || n_blocks < 1 || n_chunks < 1 || n_head_kv < 1 || d < 1) {
        return DHSA_ERR_ARGUMENT;
    }
    for (int32_t b = 0; b < n_blocks; b++) {
        for (int32_t g = 0; g < n_head_kv; g++) {
            const float * qb = Qb + ((size_t) b * n_head_kv + g) * (size_t) d;
            for (int32_t c = 0; c < n_chunks; c++) {
                S[((size_t) b * n_head_kv + g) * (size_t) n_chunks + (size_t) c] =
                    dot_f32(qb, Kc + ((size_t) c * n_head_kv + g) * (size_t) d, d);
            }
        }
    }
    return DHSA_OK;
}

int32_t dhsa_max_ranges(int32_t n_kv, int32_t n_chunks) {
    /* Every merged range holds the sink, the local window or a selected chunk: <= n_chunks + 2. Ranges
     * are non-empty and separated by at least one key inside [0, n_kv): <= ceil(n_kv / 2). */
    const int64_t by_chunks = (int64_t) n_chunks + 2;
    const int64_t by_keys   = ((int64_t) n_kv + 1) / 2;
    const int64_t m         = by_chunks < by_keys ? by_chunks : by_keys;
    return m > 1 ? (int32_t) m : 1;
}

int32_t dhsa_ranges_slot_size(int32_t max_ranges) {
    return 1 + 2 * max_ranges;
}

size_t dhsa_select_ranges_workspace_size(int32_t n_chunks) {
    if (n_chunks < 1) {
        return 0;
    }
    return ws_bytes((size_t) n_chunks * sizeof(ranked)) + ws_bytes((size_t) n_chunks);
}

/* Writer of one slot: appends [s, e) (starts must not decrease), merging with the previous range when
 * they overlap or touch, so the output is sorted, disjoint and non-adjacent. */
typedef struct {
    int32_t * slot;
    int32_t   max_ranges;
    int       overflow;
} range_writer;

static void rw_push(range_writer * w, int32_t s, int32_t e) {
    if (e <= s) {
        return;
    }
    int32_t * cnt = &w->slot[0];
    if (*cnt > 0 && s <= w->slot[2 * *cnt]) {
        if (e > w->slot[2 * *cnt]) {
            w->slot[2 * *cnt] = e;
        }
        return;
    }
    if (*cnt >= w->max_ranges) {
        w->overflow = 1;
        return;
    }
    w->slot[1 + 2 * *cnt] = s;
    w->slot[2 + 2 * *cnt] = e;
    (*cnt)++;
}

/* Tokens of [s, e) not inside the forced set [0, sink_end) ∪ [local_start, end): the chunk's new
 * contribution to the block's kept count (selected chunks are disjoint, so only forced tokens can
 * already be kept). */
static int32_t unforced_tokens(int32_t s, int32_t e, int32_t sink_end, int32_t local_start) {
    const int32_t a = s > sink_end ? s : sink_end;      /* skip the sink part */
    const int32_t b = e < local_start ? e : local_start; /* stop at the local window */
    return b > a ? b - a : 0;
}

/* Selection for one (query block, KV head): queries at ps..pe, chunk scores computed from qb. */
static void select_block(const dhsa_params * p, const float * qb, const float * Kc, int32_t n_head_kv,
                         int32_t g, int32_t d, const int32_t * bounds, int32_t n_chunks, int32_t ps, int32_t pe,
                         ranked * cand, uint8_t * taken, range_writer * w) {
    const int32_t n_causal = pe + 1;
    w->slot[0]             = 0;
    if (p->budget >= 1.0 || pe >= p->dense_from) {
        rw_push(w, 0, n_causal);
        return;
    }
    const int32_t sink_end    = p->sink_tokens < n_causal ? p->sink_tokens : n_causal;
    const int32_t local_start = ps - p->local_tokens > 0 ? ps - p->local_tokens : 0;
    /* Forced tokens count in the budget. The two forced ranges may overlap or touch. */
    int64_t       kept = sink_end + (n_causal - local_start) - (sink_end > local_start ? sink_end - local_start : 0);
    /* ceil(budget * n_causal) in double, as the reference does; capped at n_causal. */
    const double  want_d = ceil(p->budget * (double) n_causal);
    const int64_t want   = want_d < (double) n_causal ? (int64_t) want_d : n_causal;

    /* Candidates: chunks starting in the causal range that bring at least one unforced key. */
    int32_t n_cand = 0;
    for (int32_t c = 0; c < n_chunks && bounds[c] <= pe; c++) {
        const int32_t e = bounds[c + 1] < n_causal ? bounds[c + 1] : n_causal;
        taken[c]        = 0;
        if (unforced_tokens(bounds[c], e, sink_end, local_start) > 0) {
            cand[n_cand].key   = c;
            cand[n_cand].score = dot_f32(qb, Kc + ((size_t) c * n_head_kv + g) * d, d);
            n_cand++;
        }
    }
    qsort(cand, (size_t) n_cand, sizeof(ranked), ranked_cmp);  /* score desc, lower chunk first */
    for (int32_t k = 0; k < n_cand && kept < want; k++) {
        const int32_t c = cand[k].key;
        const int32_t e = bounds[c + 1] < n_causal ? bounds[c + 1] : n_causal;
        kept += unforced_tokens(bounds[c], e, sink_end, local_start);
        taken[c] = 1;
    }

    /* Emit in start order: the sink (starts at 0), the taken chunks that start before the local window
     * in chunk order, then the local window, which reaches pe+1 and so covers every later chunk. */
    rw_push(w, 0, sink_end);
    for (int32_t c = 0; c < n_chunks && bounds[c] < local_start; c++) {
        if (taken[c]) {
            rw_push(w, bounds[c], bounds[c + 1] < n_causal ? bounds[c + 1] : n_causal);
        }
    }
    rw_push(w, local_start, n_causal);
}

static int bounds_ok(const int32_t * bounds, int32_t n_chunks) {
    if (bounds == NULL || n_chunks < 1 || bounds[0] != 0) {
        return 0;
    }
    for (int32_t c = 0; c < n_chunks; c++) {
        if (bounds[c + 1] <= bounds[c]) {
            return 0;
        }
    }
    return 1;
}

dhsa_status dhsa_select_ranges(const dhsa_params * p, const float * Qb, const float * Kc, const int32_t * bounds,
                               int32_t n_chunks, int32_t n_q, int32_t q_pos0, int32_t n_head_kv, int32_t d,
                               int32_t * ranges, int32_t max_ranges, void * work, size_t work_size) {
    if (dhsa_params_check(p) != DHSA_OK || Qb == NULL || Kc == NULL || !bounds_ok(bounds, n_chunks) || n_q < 1 ||
        q_pos0 < 0 || (int64_t) q_pos0 + n_q > bounds[n_chunks] || n_head_kv < 1 || d < 1 || ranges == NULL ||
        max_ranges < 1) {
        return DHSA_ERR_ARGUMENT;
    }
    arena       a;
    int         owned;
    dhsa_status st = arena_begin(&a, work, work_size, dhsa_select_ranges_workspace_size(n_chunks), &owned);
    if (st != DHSA_OK) {
        return st;
    }
    ranked *  cand  = arena_take(&a, (size_t) n_chunks * sizeof(ranked));
    uint8_t * taken = arena_take(&a, (size_t) n_chunks);
    if (cand == NULL || taken == NULL) {
        arena_end(&a, owned);
        return DHSA_ERR_BUFFER;
    }
    const int32_t nb   = dhsa_n_blocks(n_q, p->q_block);
    const size_t  slot = (size_t) dhsa_ranges_slot_size(max_ranges);
    range_writer  w    = { NULL, max_ranges, 0 };
    for (int32_t b = 0; b < nb && !w.overflow; b++) {
        const int32_t ps = q_pos0 + b * p->q_block;
        const int64_t qe = ((int64_t) b + 1) * p->q_block;  /* end of the block in the ubatch */
        const int32_t pe = q_pos0 + (qe < n_q ? (int32_t) qe : n_q) - 1;
        for (int32_t g = 0; g < n_head_kv && !w.overflow; g++) {
            w.slot = ranges + ((size_t) b * n_head_kv + g) * slot;
            select_block(p, Qb + ((size_t) b * n_head_kv + g) * d, Kc, n_head_kv, g, d, bounds, n_chunks, ps, pe,
                         cand, taken, &w);
        }
    }
    arena_end(&a, owned);
    return w.overflow ? DHSA_ERR_BUFFER : DHSA_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* all at once                                                                                          */
/* ---------------------------------------------------------------------------------------------------- */

/* Kc, Qb and the selection scratch, carved after the boundaries are known. */
static size_t reprs_bytes(int32_t n_chunks, int32_t n_blocks, int32_t n_head_kv, int32_t d) {
    return ws_bytes((size_t) n_chunks * n_head_kv * d * sizeof(float)) +
           ws_bytes((size_t) n_blocks * n_head_kv * d * sizeof(float)) +
           ws_bytes(dhsa_select_ranges_workspace_size(n_chunks));
}

size_t dhsa_select_workspace_size(int32_t n_kv, int32_t max_chunks, int32_t n_q, int32_t n_head_kv, int32_t d,
                                  int32_t q_block) {
    if (n_kv < 1 || max_chunks < 1 || n_q < 1 || n_head_kv < 1 || d < 1 || q_block < 1) {
        return 0;
    }
    /* The boundary scratch is dead once the boundaries exist, so the two phases share the buffer. */
    const size_t bnd = dhsa_keysim_workspace_size(n_kv, d);
    const size_t sel = reprs_bytes(max_chunks, dhsa_n_blocks(n_q, q_block), n_head_kv, d);
    return bnd > sel ? bnd : sel;
}

dhsa_status dhsa_select(const dhsa_params * p, const dhsa_tensor * Q, const dhsa_tensor * K, int32_t q_pos0,
                        const int32_t * frozen, int32_t n_frozen, int32_t * bounds, int32_t max_bounds,
                        int32_t * n_bounds, int32_t * ranges, int32_t max_ranges, void * work, size_t work_size) {
    if (dhsa_params_check(p) != DHSA_OK || !tensor_ok(Q) || !tensor_ok(K) || Q->d != K->d || n_bounds == NULL ||
        Q->n_heads % K->n_heads != 0 || q_pos0 < 0 || (int64_t) q_pos0 + Q->n_rows > K->n_rows) {
        return DHSA_ERR_ARGUMENT;
    }
    /* Phase 1: boundaries, in the caller's workspace (or their own malloc when work is NULL). */
    dhsa_status st = dhsa_boundaries(p, K, frozen, n_frozen, bounds, max_bounds, n_bounds, work, work_size);
    if (st != DHSA_OK) {
        return st;
    }
    /* Phase 2: representations and ranges, reusing the same workspace (sized now that Nc is known). */
    const int32_t d        = K->d;
    const int32_t n_kv_h   = K->n_heads;
    const int32_t n_chunks = *n_bounds - 1;
    const int32_t nb       = dhsa_n_blocks(Q->n_rows, p->q_block);
    arena         a;
    int           owned;
    st = arena_begin(&a, work, work_size, reprs_bytes(n_chunks, nb, n_kv_h, d), &owned);
    if (st != DHSA_OK) {
        return st;
    }
    const size_t sel_size = dhsa_select_ranges_workspace_size(n_chunks);
    float *      Kc       = arena_take(&a, (size_t) n_chunks * n_kv_h * d * sizeof(float));
    float *      Qb       = arena_take(&a, (size_t) nb * n_kv_h * d * sizeof(float));
    void *       sel      = arena_take(&a, sel_size);
    if (Kc == NULL || Qb == NULL || sel == NULL) {
        arena_end(&a, owned);
        return DHSA_ERR_BUFFER;
    }
    st = dhsa_chunk_reprs(K, bounds, n_chunks, Kc);
    if (st == DHSA_OK) {
        st = dhsa_query_block_reprs(Q, n_kv_h, p->q_block, Qb);
    }
    if (st == DHSA_OK) {
        st = dhsa_select_ranges(p, Qb, Kc, bounds, n_chunks, Q->n_rows, q_pos0, n_kv_h, d, ranges, max_ranges, sel,
                                sel_size);
    }
    arena_end(&a, owned);
    return st;
}
