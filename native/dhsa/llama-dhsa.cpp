// DHSA in libllama: the context attachment and the graph hook (see llama-dhsa.h, llama-dhsa-graph.h).
#include "llama-dhsa.h"

#include "ggml-dhsa.h"
#include "llama-context.h"
#include "llama-dhsa-graph.h"
#include "llama-graph.h"
#include "llama-model.h"

void llama_dhsa_attach(llama_context * ctx, dhsa_runtime * rt) {
    // cparams has no public setter; the context object itself is not const, so writing through the
    // const reference is well defined.
    const_cast<llama_cparams &>(ctx->get_cparams()).dhsa = rt;
}

ggml_tensor * llama_dhsa_build_attn(const llm_graph_context & g, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                    ggml_tensor * kq_mask, ggml_tensor * sinks, ggml_tensor * v_mla, float kq_scale,
                                    int il) {
    dhsa_runtime * rt = g.cparams.dhsa;
    if (rt == nullptr || rt->upstream_graphs || sinks != nullptr || v_mla != nullptr || il < 0 || il >= DHSA_MAX_LAYERS) {
        return nullptr;
    }
    if (g.arch != LLM_ARCH_GEMMA2 && g.arch != LLM_ARCH_GEMMA3) {
        return nullptr;
    }
    if (g.hparams.is_swa(il) && !rt->all_layers) {
        return nullptr;
    }
    // One stream (one sequence's cells), an f16 mask, and enough keys for selection to pay off.
    if (q->ne[3] != 1 || k->ne[3] != 1 || kq_mask == nullptr || kq_mask->type != GGML_TYPE_F16 ||
        k->ne[1] < rt->min_context) {
        return nullptr;
    }
    const float softcap = g.hparams.attn_soft_cap ? g.hparams.f_attn_logit_softcapping : 0.0f;
    ggml_tensor * sel   = ggml_dhsa_select(g.ctx0, q, k, kq_mask, rt, il);
    return ggml_dhsa_attn(g.ctx0, q, k, v, kq_mask, sel, kq_scale, softcap, rt, il);
}
