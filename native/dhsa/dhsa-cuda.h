// CUDA kernels of the DHSA ops: launchers with plain arguments, so that the kernels do not depend on
// ggml's internals (ggml-cuda-dhsa.cu, compiled into ggml-cuda, unpacks the ggml tensors and calls them).
//
//   dhsa_cuda_select: row positions, chunk boundaries, chunk / query-block representations and range
//                     lists, bit-identical to dhsa-select.c (native/dhsa/ALGORITHM.md). Compiled on its
//                     own, without -use_fast_math (IEEE float32 adds, multiplies, divisions, square roots).
//   dhsa_cuda_attn:   block-sparse flash attention over those ranges on tensor cores (mma.sync m16n8k16,
//                     f16 operands, f32 accumulation), GQA-aware, Gemma soft-capping. Needs sm_80+.
//
// The selection tensor has the layout of ggml-dhsa.h: [n_q row positions][1 sparse flag][slots], slot
// (b, g) at DHSA_SEL_HEADER(n_q) + (b * n_head_kv + g) * (1 + 2 * max_ranges): count, then start/end pairs.
#pragma once

#include "dhsa-select.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

// The tensors both ops read, as llama.cpp's graph hands them to flash attention (strides in elements).
struct dhsa_cuda_views {
    // q [n_q rows][n_head][d] f32; element (i, h, r) at q[r * q_row + h * q_head + i]
    const float * q;
    int64_t q_row, q_head;
    // k [n_kv cells][n_head_kv][d] f16; element (i, h, j) at k[j * k_row + h * k_head + i]
    const half * k;
    int64_t k_row, k_head;
    // kq_mask [>= n_q rows][n_kv] f16, 0 or -inf; element (j, r) at mask[r * mask_row + j]
    const half * mask;
    int64_t mask_row;
    int32_t n_q, n_kv, n_head, n_head_kv, d;
};

struct dhsa_cuda_select_args {
    struct dhsa_cuda_views in;
    dhsa_params params;   // budget, boundary, chunk sizes, window, q_block, sink/local, dense_from
    int32_t min_context;  // fewer keys (q_pos0 + n_q) than this: dense ranges, as the CPU op
    int32_t max_ranges;   // ggml_dhsa_max_ranges(n_kv, chunk_min, chunk_avg)
    int32_t * sel;        // output: the selection tensor (device memory)
    void * scratch;       // device scratch of dhsa_cuda_select_scratch_size() bytes
    // Per-layer cache of complete segments' cuts and chunk representations, kept between calls and
    // checked against a fingerprint of the segment's keys (as the CPU op's cache, ENGINE.md); NULL:
    // everything is recomputed.
    struct dhsa_cuda_cache * cache;
};

// A cache for one layer (host object owning device memory, grown on demand); free with the stream idle.
struct dhsa_cuda_cache * dhsa_cuda_cache_create(void);
void dhsa_cuda_cache_free(struct dhsa_cuda_cache * cache);

size_t dhsa_cuda_select_scratch_size(const struct dhsa_cuda_select_args * a);
cudaError_t dhsa_cuda_select(const struct dhsa_cuda_select_args * a, cudaStream_t stream);

struct dhsa_cuda_attn_args {
    struct dhsa_cuda_views in;
    const half * v;   // v [n_kv][n_head_kv][d] f16, element (i, h, j) at v[j * v_row + h * v_head + i]
    int64_t v_row, v_head;
    const int32_t * sel;  // the selection tensor written by dhsa_cuda_select (or the CPU op)
    int32_t max_ranges, q_block;
    float * dst;          // [n_q][n_head][d] f32, contiguous (flash_attn_ext's output layout)
    float scale, softcap; // s = scale * q.k; softcap > 0: s = softcap * tanh(s / softcap); then + mask
    void * scratch;       // device scratch of dhsa_cuda_attn_scratch_size() bytes (partial results when the
                          // key walk of few-row blocks, e.g. decode, is split across CTAs)
    // NULL, or device memory read by the kernels: they do nothing unless *run_if != 0. The upstream
    // flash-attention route (ggml-cuda-dhsa-fattn.cu) launches this kernel behind it that way, as the
    // fallback for index lists that overflowed their bound, without reading the flag on the host.
    const int32_t * run_if;
};

// Head sizes and architectures the attention kernel is built for (d in {64, 128, 256}, cc >= 800).
bool dhsa_cuda_attn_supported(int32_t d, int compute_capability);
size_t dhsa_cuda_attn_scratch_size(const struct dhsa_cuda_attn_args * a);
cudaError_t dhsa_cuda_attn(const struct dhsa_cuda_attn_args * a, cudaStream_t stream);
