// Between our C API's pydhsa_dhsa_params (a struct the Python binding fills) and the parameter table's
// dhsa_settings (native/dhsa/dhsa-params.h), which holds the defaults and the checks.
#pragma once

#include "dhsa-params.h"
#include "pydhsa.h"

inline dhsa_settings pydhsa_settings_from_params(const pydhsa_dhsa_params & d) {
    dhsa_settings s;
    s.v[DHSA_PARAM_BUDGET]       = d.budget;
    s.v[DHSA_PARAM_BOUNDARY]     = d.boundary;
    s.v[DHSA_PARAM_CHUNK_MIN]    = d.chunk_min;
    s.v[DHSA_PARAM_CHUNK_MAX]    = d.chunk_max;
    s.v[DHSA_PARAM_CHUNK_AVG]    = d.chunk_avg;
    s.v[DHSA_PARAM_Q_BLOCK]      = d.q_block;
    s.v[DHSA_PARAM_SINK_TOKENS]  = d.sink_tokens;
    s.v[DHSA_PARAM_LOCAL_TOKENS] = d.local_tokens;
    s.v[DHSA_PARAM_DENSE_TAIL]   = d.dense_tail;
    s.v[DHSA_PARAM_MIN_CONTEXT]  = d.min_context;
    s.v[DHSA_PARAM_LAYERS]       = d.all_layers ? 1 : 0;
    s.v[DHSA_PARAM_DECODE]       = d.sparse_decode ? 1 : 0;
    return s;
}

inline pydhsa_dhsa_params pydhsa_params_from_settings(const dhsa_settings & s, bool enabled) {
    pydhsa_dhsa_params d;
    d.enabled       = enabled;
    d.budget        = s.v[DHSA_PARAM_BUDGET];
    d.boundary      = (int32_t) s.v[DHSA_PARAM_BOUNDARY];
    d.chunk_min     = (int32_t) s.v[DHSA_PARAM_CHUNK_MIN];
    d.chunk_max     = (int32_t) s.v[DHSA_PARAM_CHUNK_MAX];
    d.chunk_avg     = (int32_t) s.v[DHSA_PARAM_CHUNK_AVG];
    d.q_block       = (int32_t) s.v[DHSA_PARAM_Q_BLOCK];
    d.sink_tokens   = (int32_t) s.v[DHSA_PARAM_SINK_TOKENS];
    d.local_tokens  = (int32_t) s.v[DHSA_PARAM_LOCAL_TOKENS];
    d.dense_tail    = (int32_t) s.v[DHSA_PARAM_DENSE_TAIL];
    d.min_context   = (int32_t) s.v[DHSA_PARAM_MIN_CONTEXT];
    d.all_layers    = s.v[DHSA_PARAM_LAYERS] == 1;
    d.sparse_decode = s.v[DHSA_PARAM_DECODE] == 1;
    return d;
}
