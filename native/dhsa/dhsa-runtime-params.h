// The selection parameters (dhsa-select.h) of a session's dhsa_runtime (ggml-dhsa.h), shared by the
// CPU and CUDA kernels so that both backends select with exactly the same settings.
#pragma once

#include "dhsa-select.h"
#include "ggml-dhsa.h"

#include <string.h>

static inline dhsa_params dhsa_params_from_runtime(const struct dhsa_runtime * rt) {
    // Every field is set here (no dhsa_params_default: that lives in ggml-cpu, which ggml-cuda does not link).
    dhsa_params p;
    p.budget       = rt->budget;
    p.boundary     = rt->boundary;
    p.chunk_min    = rt->chunk_min;
    p.chunk_max    = rt->chunk_max;
    p.chunk_avg    = rt->chunk_avg;
    p.window       = rt->window;
    p.q_block      = rt->q_block;
    p.sink_tokens  = rt->sink_tokens;
    p.local_tokens = rt->local_tokens;
    p.dense_from   = rt->dense_from;
    return p;
}

// The op parameters every DHSA node carries (ggml-dhsa.c writes them): [0..1] the runtime pointer,
// [2] layer, [3] scale (f32), [4] softcap (f32).
struct dhsa_op_params {
    struct dhsa_runtime * rt;
    int32_t il;
    float scale;
    float softcap;
};

static inline struct dhsa_op_params dhsa_read_op_params(const struct ggml_tensor * t) {
    struct dhsa_op_params p;
    memcpy(&p.rt, t->op_params, sizeof(p.rt));
    p.il = t->op_params[2];
    memcpy(&p.scale, &t->op_params[3], sizeof(float));
    memcpy(&p.softcap, &t->op_params[4], sizeof(float));
    return p;
}
