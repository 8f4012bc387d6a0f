// The graph hook of DHSA (called by llama-graph.cpp's build_attn_mha through our patch series).
#pragma once

struct ggml_tensor;
struct llm_graph_context;

// DHSA attention in flash_attn_ext's output layout, or nullptr when DHSA does not apply to this layer
// (not attached, a sliding-window layer with layers=global, ALiBi, sinks, MLA, upstream's top-k sparse
// attention (n_kv_max != 0), an unsupported head size or cache type, a short context, ...), in which
// case the caller builds upstream flash attention unchanged. Records the layer's route in the runtime.
ggml_tensor * llama_dhsa_build_attn(const llm_graph_context & g, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                    ggml_tensor * kq_mask, ggml_tensor * sinks, ggml_tensor * v_mla, int64_t n_kv_max,
                                    float kq_scale, int il);
