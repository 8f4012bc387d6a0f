// Public additions to libllama (new functions; llama.h itself is unchanged).
//
// llama_dhsa_attach: attach DHSA settings to a context. From then on the graph of any architecture whose
// attention goes through build_attn_mha's flash-attention path uses the DHSA ops on the layers the
// settings select and the op supports (llama_dhsa_layer_route); the others keep flash attention. The
// caller owns `rt` and keeps it alive as long as the context; it may change rt->dense_from between
// llama_decode calls (it is read at compute time). NULL detaches.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

struct dhsa_runtime;
struct dhsa_settings;

// Replaces whatever DHSA settings the context had, including a runtime libllama made for it from the
// model's keys or PYDHSA_DHSA (llama-dhsa-auto.h): explicit settings win.
LLAMA_API void llama_dhsa_attach(struct llama_context * ctx, struct dhsa_runtime * rt);

// Whether contexts this thread creates from now on take DHSA settings from the model's keys and
// PYDHSA_DHSA (default true). Our C API turns it off around llama_init_from_model, so that a dense session
// stays upstream's dense path (flash attention as asked) and no "DHSA on" line is logged for it.
LLAMA_API void llama_dhsa_use_model_keys(bool use);

// A runtime's parameters from checked settings (dhsa_settings_check); per-call fields start at "no dense
// tail, DHSA graphs", statistics and caches empty. The one place a table value becomes a runtime field.
LLAMA_API void llama_dhsa_runtime_init(struct dhsa_runtime * rt, const struct dhsa_settings * s);

// The DHSA settings the context runs with, or NULL when DHSA is off for it (not owned by the caller; valid
// until the context is freed or llama_dhsa_attach replaces them). Its pairs_computed / pairs_causal say
// how dense attention was, per layer.
LLAMA_API const struct dhsa_runtime * llama_dhsa_get(const struct llama_context * ctx);
// The same counters summed over the layers (for bindings that do not know struct dhsa_runtime, such as
// ctypes): true when DHSA is on for the context; computed / causal query-key pairs so far (either may be
// NULL). computed / causal is the density of the layers that ran the DHSA kernel.
LLAMA_API bool llama_dhsa_pairs(const struct llama_context * ctx, int64_t * computed, int64_t * causal);

// The route (enum dhsa_layer_route, ggml-dhsa.h) layer il of `model` takes under DHSA with these
// settings and K/V cache types (ggml_type values), decided from the hyperparameters and weights alone;
// -1 for a layer index out of range. A graph can still run a DHSA layer densely for reasons only the
// graph knows (several KV streams, upstream's own sparse attention): dhsa_runtime.layer_route says.
LLAMA_API int32_t llama_dhsa_layer_route(const struct llama_model * model, int32_t il, bool all_layers,
                                         int32_t type_k, int32_t type_v);
// A short text for a route: "dhsa", or "dense: <why>".
LLAMA_API const char * llama_dhsa_route_name(int32_t route);

#ifdef __cplusplus
}
#endif
