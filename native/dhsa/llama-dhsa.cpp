// DHSA in libllama: the context attachment, the per-layer route rules and the graph hook (see
// llama-dhsa.h, llama-dhsa-graph.h).
#include "llama-dhsa.h"

#include "dhsa-params.h"
#include "dhsa-select.h"
#include "ggml-dhsa.h"
#include "llama-context.h"
#include "llama-dhsa-auto.h"
#include "llama-dhsa-graph.h"
#include "llama-graph.h"
#include "llama-model.h"

namespace {

// What a layer's hyperparameters and weights decide, before any graph exists. One definition, used by
// the graph hook and by llama_dhsa_layer_route (pydhsa info), so that the plan and the run agree.
// `model` may be null (the graph builder has only the hyperparameters; it sees the sink tensor itself).
dhsa_layer_route static_route(const llama_hparams & hp, const llama_model * model, int32_t il, bool all_layers,
                              ggml_type type_k, ggml_type type_v) {
    if (il < 0 || il >= DHSA_MAX_LAYERS) {
        return DHSA_ROUTE_ARCH_LAYERS;
    }
    if (hp.is_swa((uint32_t) il) && !all_layers) {
        return DHSA_ROUTE_SLIDING_WINDOW;
    }
    if (hp.use_alibi || hp.f_max_alibi_bias > 0.0f) {
        return DHSA_ROUTE_ALIBI;
    }
    if (hp.is_mla()) {
        return DHSA_ROUTE_MLA;
    }
    if (model != nullptr && (size_t) il < model->layers.size() && model->layers[il].attn_sinks != nullptr) {
        return DHSA_ROUTE_SINKS;
    }
    if (!ggml_dhsa_supports_head_size(hp.n_embd_head_k((uint32_t) il)) ||
        !ggml_dhsa_supports_head_size(hp.n_embd_head_v((uint32_t) il))) {
        return DHSA_ROUTE_HEAD_SIZE;
    }
    if (!ggml_dhsa_supports_kv_type(type_k) || !ggml_dhsa_supports_kv_type(type_v)) {
        return DHSA_ROUTE_CACHE_TYPE;
    }
    return DHSA_ROUTE_DHSA;
}

// The route of one attention call as the graph builder hands it over (tensors already in flash
// attention's layout); DHSA_ROUTE_DHSA when the op can run it exactly.
dhsa_layer_route graph_route(const llm_graph_context & g, const dhsa_runtime & rt, ggml_tensor * q, ggml_tensor * k,
                             ggml_tensor * v, ggml_tensor * kq_mask, ggml_tensor * sinks, ggml_tensor * v_mla,
                             int64_t n_kv_max, int il) {
    const dhsa_layer_route r = static_route(g.hparams, nullptr, il, rt.all_layers != 0, k->type, v->type);
    if (r != DHSA_ROUTE_DHSA) {
        return r;
    }
    if (sinks != nullptr) {
        return DHSA_ROUTE_SINKS;
    }
    if (v_mla != nullptr) {
        return DHSA_ROUTE_MLA;
    }
    if (n_kv_max != 0) {
        return DHSA_ROUTE_TOP_K;
    }
    if (!ggml_dhsa_supports_head_size(k->ne[0]) || !ggml_dhsa_supports_head_size(v->ne[0]) || q->ne[0] != k->ne[0]) {
        return DHSA_ROUTE_HEAD_SIZE;
    }
    if (v->nb[0] != ggml_type_size(v->type)) {  // a transposed V (the types were checked by static_route)
        return DHSA_ROUTE_CACHE_TYPE;
    }
    if (q->ne[3] != 1 || k->ne[3] != 1 || v->ne[3] != 1) {
        return DHSA_ROUTE_STREAMS;
    }
    if (kq_mask == nullptr || kq_mask->type != GGML_TYPE_F16) {
        return DHSA_ROUTE_MASK;
    }
    return DHSA_ROUTE_DHSA;
}

}  // namespace

void llama_dhsa_set_cparams(llama_context * ctx, dhsa_runtime * rt) {
    // cparams has no public setter; the context object itself is not const, so writing through the
    // const reference is well defined.
    const_cast<llama_cparams &>(ctx->get_cparams()).dhsa = rt;
}

void llama_dhsa_attach(llama_context * ctx, dhsa_runtime * rt) {
    llama_dhsa_set_cparams(ctx, rt);
    llama_dhsa_forget(ctx);  // a runtime made from the model's keys, now unused
}

const dhsa_runtime * llama_dhsa_get(const llama_context * ctx) {
    return ctx == nullptr ? nullptr : ctx->get_cparams().dhsa;
}

bool llama_dhsa_pairs(const llama_context * ctx, int64_t * computed, int64_t * causal) {
    const dhsa_runtime * rt = llama_dhsa_get(ctx);
    int64_t sum_computed = 0, sum_causal = 0;
    for (int il = 0; rt != nullptr && il < DHSA_MAX_LAYERS; il++) {
        sum_computed += __atomic_load_n(&rt->pairs_computed[il], __ATOMIC_RELAXED);
        sum_causal   += __atomic_load_n(&rt->pairs_causal[il], __ATOMIC_RELAXED);
    }
    if (computed != nullptr) {
        *computed = sum_computed;
    }
    if (causal != nullptr) {
        *causal = sum_causal;
    }
    return rt != nullptr;
}

void llama_dhsa_runtime_init(dhsa_runtime * rt, const dhsa_settings * s) {
    *rt              = dhsa_runtime{};
    rt->budget       = s->v[DHSA_PARAM_BUDGET];
    rt->boundary     = (int32_t) s->v[DHSA_PARAM_BOUNDARY];
    rt->chunk_min    = (int32_t) s->v[DHSA_PARAM_CHUNK_MIN];
    rt->chunk_max    = (int32_t) s->v[DHSA_PARAM_CHUNK_MAX];
    rt->chunk_avg    = (int32_t) s->v[DHSA_PARAM_CHUNK_AVG];
    rt->window       = DHSA_KEYSIM_WINDOW;  // ALGORITHM.md: a constant, not a parameter
    rt->q_block      = (int32_t) s->v[DHSA_PARAM_Q_BLOCK];
    rt->sink_tokens  = (int32_t) s->v[DHSA_PARAM_SINK_TOKENS];
    rt->local_tokens = (int32_t) s->v[DHSA_PARAM_LOCAL_TOKENS];
    rt->dense_tail   = (int32_t) s->v[DHSA_PARAM_DENSE_TAIL];
    rt->min_context  = (int32_t) s->v[DHSA_PARAM_MIN_CONTEXT];
    rt->all_layers   = s->v[DHSA_PARAM_LAYERS] == 1 ? 1 : 0;  // "global,all"
    rt->sparse_decode = s->v[DHSA_PARAM_DECODE] == 1 ? 1 : 0;  // "dense,sparse"
    rt->dense_from   = INT32_MAX;
    rt->upstream_graphs = 0;
}

int32_t llama_dhsa_layer_route(const llama_model * model, int32_t il, bool all_layers, int32_t type_k,
                               int32_t type_v) {
    if (model == nullptr || il < 0 || il >= (int32_t) model->hparams.n_layer()) {
        return -1;
    }
    return static_route(model->hparams, model, il, all_layers, (ggml_type) type_k, (ggml_type) type_v);
}

const char * llama_dhsa_route_name(int32_t route) {
    switch ((dhsa_layer_route) route) {
        case DHSA_ROUTE_UNSEEN:         return "not reached (the architecture's attention bypasses the hook)";
        case DHSA_ROUTE_DHSA:           return "dhsa";
        case DHSA_ROUTE_SLIDING_WINDOW: return "dense: sliding-window layer (layers=global)";
        case DHSA_ROUTE_ALIBI:          return "dense: ALiBi position bias";
        case DHSA_ROUTE_SINKS:          return "dense: attention-sink logits";
        case DHSA_ROUTE_MLA:            return "dense: multi-head latent attention";
        case DHSA_ROUTE_TOP_K:          return "dense: upstream top-k sparse attention";
        case DHSA_ROUTE_HEAD_SIZE:      return "dense: head size without a DHSA kernel";
        case DHSA_ROUTE_CACHE_TYPE:     return "dense: K/V cache type the DHSA kernel cannot read";
        case DHSA_ROUTE_STREAMS:        return "dense: several KV streams in one ubatch";
        case DHSA_ROUTE_MASK:           return "dense: no f16 attention mask";
        case DHSA_ROUTE_ARCH_LAYERS:    return "dense: layer index past DHSA_MAX_LAYERS";
        case DHSA_ROUTE_COUNT:          break;
    }
    return "unknown";
}

ggml_tensor * llama_dhsa_build_attn(const llm_graph_context & g, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                    ggml_tensor * kq_mask, ggml_tensor * sinks, ggml_tensor * v_mla, int64_t n_kv_max,
                                    float kq_scale, int il) {
    dhsa_runtime * rt = g.cparams.dhsa;
    if (rt == nullptr || rt->upstream_graphs) {
        return nullptr;
    }
    const dhsa_layer_route route = graph_route(g, *rt, q, k, v, kq_mask, sinks, v_mla, n_kv_max, il);
    if (il >= 0 && il < DHSA_MAX_LAYERS) {
        rt->layer_route[il]    = route;
        rt->layer_windowed[il] = g.hparams.is_swa((uint32_t) il) ? 1 : 0;
    }
    // Enough keys for selection to pay off, and a budget that skips something (transient reasons: not
    // recorded as the layer's route). Budget 1 is dense attention, so it is upstream's own flash attention,
    // bit for bit (dense ranges through our kernel would round differently; tests that check the kernel on
    // dense ranges get them from a local window covering every key instead).
    if (route != DHSA_ROUTE_DHSA || k->ne[1] < rt->min_context || rt->budget >= 1.0) {
        return nullptr;
    }
    const float softcap = g.hparams.attn_soft_cap ? g.hparams.f_attn_logit_softcapping : 0.0f;
    ggml_tensor * sel   = ggml_dhsa_select(g.ctx0, q, k, kq_mask, rt, il);
    return ggml_dhsa_attn(g.ctx0, q, k, v, kq_mask, sel, kq_scale, softcap, rt, il);
}
