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

LLAMA_API void llama_dhsa_attach(struct llama_context * ctx, struct dhsa_runtime * rt);

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
