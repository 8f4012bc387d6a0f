// The DHSA ops in ggml's CUDA backend: what our patch series hooks into ggml-cuda.cu (compute dispatch,
// supports_op, and the CUDA-graph check). Compiled into ggml-cuda only when our CMake adds these files,
// which also defines PYDHSA_CUDA for that target.
#pragma once

#include "ggml-cuda/common.cuh"

#include "dhsa-cuda.h"

void ggml_cuda_op_dhsa_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
void ggml_cuda_op_dhsa_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// The attention node through upstream's sparse flash attention (ggml-cuda-dhsa-fattn.cu) when the node
// qualifies and the route allows it; `own` (our kernel's arguments, scratch included) is the fallback it
// launches behind upstream's kernel. false: nothing was launched.
bool ggml_cuda_dhsa_attn_via_fattn(ggml_backend_cuda_context & ctx, ggml_tensor * dst, dhsa_cuda_attn_args own);

// Types, head sizes and architectures the kernels handle; anything else runs on the CPU backend.
bool ggml_cuda_dhsa_supports_op(int device, const ggml_tensor * op);

// The ops read their settings from the session's dhsa_runtime when they are launched, so a captured
// CUDA graph would replay stale settings: graphs holding them are not captured.
bool ggml_cuda_dhsa_is_op(const ggml_tensor * node);
