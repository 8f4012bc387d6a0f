// The graph hook of DHSA (called by llama-graph.cpp's build_attn_mha through our patch series).
#pragma once

struct ggml_tensor;
struct llm_graph_context;

// DHSA attention in flash_attn_ext's output layout, or nullptr when DHSA does not apply to this layer
// (not attached, another architecture, a sliding-window layer with layers=global, a short context, ...),
// in which case the caller builds upstream flash attention unchanged.
ggml_tensor * llama_dhsa_build_attn(const llm_graph_context & g, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                    ggml_tensor * kq_mask, ggml_tensor * sinks, ggml_tensor * v_mla, float kq_scale,
                                    int il);
