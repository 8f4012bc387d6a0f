// The op parameters of a DHSA node, and the selection parameters (dhsa-select.h) they give; shared by the
// constructors (ggml-dhsa.c) and the CPU and CUDA kernels, so that both backends select with exactly the
// same settings.
//
// As in every ggml op, a node's settings are values in its op_params, copied from the caller's dhsa_runtime
// when the graph is built: the settings travel with the graph, which is what CUDA graphs, RPC and graph
// comparison rely on. They are not all of what a node computes: the node also holds the address of the
// caller's dhsa_runtime, for what changes while a graph is reused: the per-decode-call dense tail
// (dense_from, tail_ends, which decide which rows run dense), the segment caches (which change the time,
// never the result) and the density counters. That object is owned by
// the session (or context) that built the graph and outlives it.
#pragma once

#include "dhsa-select.h"
#include "ggml-dhsa.h"

#include <string.h>

struct dhsa_op_params {
    struct dhsa_runtime * state;  // mutable per-call fields, caches, counters (see above)
    double  budget;
    float   scale, softcap;       // attention only (0 in a selection node)
    int32_t il;                   // layer: the index of its segment cache and counters
    int32_t sink_tokens, local_tokens, dense_tail, min_context;
    // bounded by dhsa-params.c: chunk sizes <= DHSA_SEGMENT, q_block <= 4096, window a small constant
    int16_t chunk_min, chunk_max, chunk_avg, q_block, window;
    int8_t  boundary;
    int8_t  windowed;             // a sliding-window layer (layers=all): the mask hides keys before the window
    int8_t  cuda_attn_route;      // enum dhsa_cuda_attn_route
};

#ifdef __cplusplus
static_assert(sizeof(struct dhsa_op_params) <= GGML_MAX_OP_PARAMS, "DHSA op parameters exceed ggml's op_params");
#else
_Static_assert(sizeof(struct dhsa_op_params) <= GGML_MAX_OP_PARAMS, "DHSA op parameters exceed ggml's op_params");
#endif

// The node's parameters from the runtime's settings (at graph-build time).
static inline struct dhsa_op_params dhsa_op_params_from_runtime(struct dhsa_runtime * rt, int32_t il, float scale,
                                                                float softcap) {
    struct dhsa_op_params p;
    memset(&p, 0, sizeof(p));  // padding included: op_params are compared byte by byte
    p.state           = rt;
    p.budget          = rt->budget;
    p.scale           = scale;
    p.softcap         = softcap;
    p.il              = il;
    p.sink_tokens     = rt->sink_tokens;
    p.local_tokens    = rt->local_tokens;
    p.dense_tail      = rt->dense_tail;
    p.min_context     = rt->min_context;
    p.chunk_min       = (int16_t) rt->chunk_min;
    p.chunk_max       = (int16_t) rt->chunk_max;
    p.chunk_avg       = (int16_t) rt->chunk_avg;
    p.q_block         = (int16_t) rt->q_block;
    p.window          = (int16_t) rt->window;
    p.boundary        = (int8_t) rt->boundary;
    p.windowed        = rt->layer_windowed[il];
    p.cuda_attn_route = (int8_t) rt->cuda_attn_route;
    return p;
}

static inline void dhsa_write_op_params(struct ggml_tensor * t, const struct dhsa_op_params * p) {
    memcpy(t->op_params, p, sizeof(*p));
}

static inline struct dhsa_op_params dhsa_read_op_params(const struct ggml_tensor * t) {
    struct dhsa_op_params p;
    memcpy(&p, t->op_params, sizeof(p));
    return p;
}

// The selection parameters of a node: its settings, and the dense tail of the current decode call.
static inline dhsa_params dhsa_select_params(const struct dhsa_op_params * op) {
    // Every field is set here (no dhsa_params_default: that lives in ggml-cpu, which ggml-cuda does not link).
    dhsa_params p;
    p.budget       = op->budget;
    p.boundary     = op->boundary;
    p.chunk_min    = op->chunk_min;
    p.chunk_max    = op->chunk_max;
    p.chunk_avg    = op->chunk_avg;
    p.window       = op->window;
    p.q_block      = op->q_block;
    p.sink_tokens  = op->sink_tokens;
    p.local_tokens = op->local_tokens;
    p.dense_from   = op->state->dense_from;
    return p;
}
