// The DHSA ops of our ggml fork: selection and block-sparse attention (constructors; CPU kernels live in
// ggml-cpu-dhsa.cpp). The contract of what they compute is native/dhsa/ALGORITHM.md.
//
//   sel = ggml_dhsa_select(ctx, q, k, kq_mask, rt, il)          -> I32 range lists
//   out = ggml_dhsa_attn  (ctx, q, k, v, kq_mask, sel, scale, softcap, rt, il)
//
// The tensors are those of ggml_flash_attn_ext (q [d, n_q, H, 1] f32, k/v [d, n_kv, H_kv, 1] of a type
// ggml_dhsa_supports_kv_type accepts, kq_mask [n_kv, >= n_q] f16 with 0 / -inf), and `out` has
// flash_attn_ext's layout [d_v, H, n_q, 1], so the graph swaps one call for the other. Any GQA group
// (H a multiple of H_kv) and any head size that ggml_dhsa_supports_head_size accepts.
//
// Query positions are read from the mask: row r's position is its last unmasked key (the cache cell the
// query was stored in). Selection works in cache-cell order, which is token order for one sequence.
// Several sequences in one ubatch (a server's parallel slots in a unified cache) are told apart by the
// mask, and each is selected on its own keys, from the first cell it sees (ALGORITHM.md, "Several
// sequences in one ubatch"); query blocks shared by two sequences, and rows that are not in consecutive
// cells, attend densely. The result is always exactly attention under the mask, restricted to the
// selected keys.
//
// The settings are copied from the caller's dhsa_runtime into op_params when the graph is built, as values
// (dhsa-runtime-params.h); the node also keeps the runtime's address for what changes while a graph is
// reused (the decode call's dense tail) and for the segment caches and counters, so the runtime must
// outlive the graphs built from it.
#pragma once

#include "ggml.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DHSA_MAX_LAYERS 512
#define DHSA_MAX_TAIL_ENDS 64  // prompts of one decode call with a dense tail of their own

// Keys are chunked in aligned segments of this many cache cells; boundaries inside a complete segment
// therefore never move when more keys arrive (ALGORITHM.md: "boundaries of keys already in the cache never
// move"), and the last, incomplete segment is the open tail that is re-chunked as it grows.
#define DHSA_SEGMENT 512

struct dhsa_runtime {
    // ALGORITHM.md parameters (validated by the caller)
    double  budget;       // 0 < budget; >= 1 dense
    int32_t boundary;     // 0 keysim, 1 fixed
    int32_t chunk_min, chunk_max, chunk_avg;
    int32_t window;       // keysim window
    int32_t q_block;
    int32_t sink_tokens, local_tokens;
    int32_t dense_tail;
    int32_t min_context;  // fewer keys than this: the graph keeps upstream flash attention
    int32_t all_layers;   // 0: global layers only, 1: sliding-window layers too
    // set by the caller per decode call: blocks with a query at cell >= dense_from attend densely
    int32_t dense_from;
    // set by the caller per decode call of several prompts: the last position of each prompt that asks for
    // logits. A sequence of the ubatch whose last row sits at one of them (counted from the sequence's
    // first cell) has its own dense tail: blocks with a query past end - dense_tail attend densely.
    int32_t n_tail_ends;
    int32_t tail_ends[DHSA_MAX_TAIL_ENDS];
    // set by the caller: graphs built while this is non-zero keep upstream flash attention (dense decode);
    // read when a graph is built, unlike dense_from, so a reused graph may still hold the DHSA ops
    int32_t upstream_graphs;
    // decode=sparse (1) or dense (0): read by whoever sets dense_from and upstream_graphs per call (our C
    // API, or llama-dhsa-auto.cpp for contexts made through plain llama.h), never by the kernels
    int32_t sparse_decode;
    // statistics, accumulated by the attention kernel (atomically): computed and causal query-key pairs
    int64_t pairs_computed[DHSA_MAX_LAYERS];
    int64_t pairs_causal[DHSA_MAX_LAYERS];
    // boundaries and chunk representations of complete segments, kept between calls by the CPU kernel
    // (created on first use; release with ggml_dhsa_runtime_release_cache)
    void * segment_cache;
    // the same for the CUDA kernels, in device memory (created by the CUDA backend on first use; freed by
    // ggml_dhsa_runtime_release_cache through release_device_cache, which the CUDA backend sets)
    void * device_cache;
    void (*release_device_cache)(struct dhsa_runtime * rt);
    // set by the graph hook (llama-dhsa.cpp) each time it builds a layer's attention: an enum
    // dhsa_layer_route, so that the caller can say which layers ran DHSA and why the others did not
    int32_t layer_route[DHSA_MAX_LAYERS];
    // set by the graph hook with layer_route: 1 for a layer with a sliding window (layers=all), whose mask
    // hides the keys before the window, so that the selection does not take them for another sequence's
    int8_t layer_windowed[DHSA_MAX_LAYERS];
    // Which CUDA attention kernel runs an eligible DHSA attention node (enum dhsa_cuda_attn_route): set by
    // the caller; AUTO also honours the PYDHSA_CUDA_ATTN environment variable (ggml-cuda-dhsa-fattn.cu).
    int32_t cuda_attn_route;
    // Counted by the CUDA backend on the host: attention nodes that ran through upstream's sparse flash
    // attention (so that a caller can tell which route ran without synchronising).
    int64_t cuda_fattn_runs;
};

// The CUDA attention routes of a DHSA attention node: our block-sparse kernel, or upstream's MMA flash
// attention kernel gathering the selected keys from index lists (ggml-cuda-dhsa-fattn.cu says which nodes
// qualify). The CPU backend has one kernel and ignores this.
enum dhsa_cuda_attn_route {
    DHSA_CUDA_ATTN_AUTO = 0,   // the environment's PYDHSA_CUDA_ATTN, else the route measured faster: ours
    DHSA_CUDA_ATTN_OWN,        // always our kernel
    DHSA_CUDA_ATTN_FATTN,      // upstream's sparse kernel where the node qualifies, else ours
};

// Why a layer's attention did or did not become DHSA (dhsa_runtime.layer_route; names in
// llama_dhsa_route_name). Transient reasons (a short context, a dense-decode graph) are not recorded:
// they say nothing about the layer.
enum dhsa_layer_route {
    DHSA_ROUTE_UNSEEN = 0,      // no graph has built this layer's attention yet
    DHSA_ROUTE_DHSA,            // DHSA select + attention
    DHSA_ROUTE_SLIDING_WINDOW,  // a sliding-window layer, and layers=global
    DHSA_ROUTE_ALIBI,           // ALiBi position bias (the kernel adds no per-head slope)
    DHSA_ROUTE_SINKS,           // attention-sink logits (gpt-oss)
    DHSA_ROUTE_MLA,             // multi-head latent attention (v_mla projection after attention)
    DHSA_ROUTE_TOP_K,           // upstream's own sparse attention (DeepSeek's indexer top-k)
    DHSA_ROUTE_HEAD_SIZE,       // a head size the kernels have no path for
    DHSA_ROUTE_CACHE_TYPE,      // a K/V cache type the kernels cannot read
    DHSA_ROUTE_STREAMS,         // several sequences in separate KV streams in one ubatch
    DHSA_ROUTE_MASK,            // a mask that is not f16 (or none)
    DHSA_ROUTE_ARCH_LAYERS,     // a layer index past DHSA_MAX_LAYERS
    DHSA_ROUTE_COUNT
};

// K/V cache types the DHSA kernels read directly: f32, f16, bf16 and q8_0 (others: upstream attention).
GGML_API bool ggml_dhsa_supports_kv_type(enum ggml_type type);
// Head sizes (of K, and of V) the kernels handle: multiples of 16 up to 512.
GGML_API bool ggml_dhsa_supports_head_size(int64_t d);

GGML_API struct ggml_tensor * ggml_dhsa_select(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                               struct ggml_tensor * kq_mask, struct dhsa_runtime * rt, int32_t il);

GGML_API struct ggml_tensor * ggml_dhsa_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                             struct ggml_tensor * v, struct ggml_tensor * kq_mask,
                                             struct ggml_tensor * sel, float scale, float softcap,
                                             struct dhsa_runtime * rt, int32_t il);

// Layout of the selection tensor (I32, 1-D): [n_q row positions][1 flag][slots], slot (b, g) at
// DHSA_SEL_HEADER(n_q) + (b * H_kv + g) * (1 + 2 * max_ranges): count, then start/end pairs.
#define DHSA_SEL_HEADER(n_q) ((n_q) + 1)
GGML_API int32_t ggml_dhsa_max_ranges(int64_t n_kv, int32_t chunk_min, int32_t chunk_avg);

#ifdef __cplusplus
}
#endif
