// DHSA's selection through upstream's sparse MMA flash attention (the "fattn route" of a DHSA attention
// node on CUDA). Patch 0007 hooks these into ggml-cuda's flash attention (fattn.cu, fattn-common.cuh,
// fattn-mma-f16.cuh); ggml-cuda-dhsa-fattn.cu implements them and says when the route is taken.
//
// Upstream's kernel, given op_params[4] = n_kv_max > 0, gathers for each query tile (ncols1 queries x
// ncols2 heads of one KV head) only the keys of an index list, and masks them with the node's mask. For
// DeepSeek it makes the lists by scanning a -inf mask (ggml_cuda_flash_attn_ext_compact_mask); for DHSA
// the lists come straight from the selection's ranges: no n_q x n_kv mask is written or scanned.
#pragma once

#include "ggml.h"

#include <cuda_runtime.h>
#include <stdint.h>

// The shapes for which patch 0007 instantiates upstream's sparse kernel for DHSA (on top of upstream's
// own DeepSeek shapes): the full-width prefill tiles (ncols1 queries x ncols2 heads = 64 score columns,
// ncols2 <= 8 as ggml picks on NVIDIA) of the head sizes the DHSA op supports.
static constexpr __host__ __device__ bool ggml_cuda_dhsa_fattn_sparse_shape(int DKQ, int DV, int ncols1, int ncols2) {
    return DKQ == DV && (DKQ == 64 || DKQ == 128 || DKQ == 256) && ncols2 <= 8 && ncols1 * ncols2 == 64;
}

// Whether a FLASH_ATTN_EXT node carries a DHSA selection (made only by ggml-cuda-dhsa-fattn.cu, never by
// a graph): then its index lists come from ggml_cuda_dhsa_fattn_fill_lists and op_params[4] bounds a tile's
// list, not a query's.
bool ggml_cuda_dhsa_fattn_lists_attached(const ggml_tensor * fa);

// Writes the index lists of such a node in the layout upstream's kernel reads: list (sequence s, tile jt)
// at indices + (s * n_tiles + jt) * n_kv_max, its length at counts[s * n_tiles + jt], -1 past the length (up
// to n_kv_max). Tiles are ncols1 queries.
void ggml_cuda_dhsa_fattn_fill_lists(const ggml_tensor * fa, int ncols1, int32_t n_kv_max, int32_t * indices,
                                     int32_t * counts, cudaStream_t stream);
