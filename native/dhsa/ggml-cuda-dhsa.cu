// ggml-cuda glue of the DHSA ops: unpack the ggml tensors (views with byte strides) into the plain
// launcher arguments of dhsa-cuda.h and take scratch memory from the backend's pool.

#include "ggml-cuda-dhsa.cuh"

#include "dhsa-cuda.h"
#include "dhsa-runtime-params.h"
#include "ggml-dhsa.h"

namespace {

// Element strides of dimension `dim` of a tensor whose elements are `elem` bytes.
int64_t stride(const ggml_tensor * t, int dim, size_t elem) {
    GGML_ASSERT(t->nb[dim] % elem == 0);
    return (int64_t) (t->nb[dim] / elem);
}

// q, k and the mask of a DHSA node, as the launchers take them.
dhsa_cuda_views views_of(const ggml_tensor * q, const ggml_tensor * k, const ggml_tensor * mask) {
    dhsa_cuda_views in = {};
    in.q         = (const float *) q->data;
    in.q_row     = stride(q, 1, sizeof(float));
    in.q_head    = stride(q, 2, sizeof(float));
    in.k         = (const half *) k->data;
    in.k_row     = stride(k, 1, sizeof(half));
    in.k_head    = stride(k, 2, sizeof(half));
    in.mask      = (const half *) mask->data;
    in.mask_row  = stride(mask, 1, sizeof(half));
    in.n_q       = (int32_t) q->ne[1];
    in.n_kv      = (int32_t) k->ne[1];
    in.n_head    = (int32_t) q->ne[2];
    in.n_head_kv = (int32_t) k->ne[2];
    in.d         = (int32_t) k->ne[0];
    return in;
}

// The per-layer CUDA segment caches of a runtime, created on first use and freed by
// ggml_dhsa_runtime_release_cache (which calls release_device_caches through the runtime's hook).
struct device_caches {
    dhsa_cuda_cache * layers[DHSA_MAX_LAYERS] = {};
};

void release_device_caches(dhsa_runtime * rt) {
    auto * caches = (device_caches *) rt->device_cache;
    if (caches) {
        CUDA_CHECK(cudaDeviceSynchronize());  // no kernel may still use the memory
        for (dhsa_cuda_cache * c : caches->layers) {
            dhsa_cuda_cache_free(c);
        }
        delete caches;
    }
    rt->device_cache         = nullptr;
    rt->release_device_cache = nullptr;
}

dhsa_cuda_cache * layer_cache(dhsa_runtime * rt, int32_t il) {
    if (!rt->device_cache) {
        rt->device_cache         = new device_caches;
        rt->release_device_cache = release_device_caches;
    }
    dhsa_cuda_cache *& c = ((device_caches *) rt->device_cache)->layers[il];
    if (!c) {
        c = dhsa_cuda_cache_create();
    }
    return c;
}

}  // namespace

void ggml_cuda_op_dhsa_select(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const dhsa_op_params op = dhsa_read_op_params(dst);
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * mask = dst->src[2];

    dhsa_cuda_select_args a = {};
    a.in          = views_of(q, k, mask);
    a.params      = dhsa_select_params(&op);
    a.min_context = op.min_context;
    a.max_ranges  = ggml_dhsa_max_ranges(k->ne[1], op.chunk_min, op.chunk_avg);
    a.sel         = (int32_t *) dst->data;
    a.cache       = layer_cache(op.state, op.il);

    ggml_cuda_pool_alloc<char> scratch(ctx.pool(), std::max<size_t>(dhsa_cuda_select_scratch_size(&a), 1));
    a.scratch = scratch.get();
    CUDA_CHECK(dhsa_cuda_select(&a, ctx.stream()));
}

void ggml_cuda_op_dhsa_attn(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const dhsa_op_params op = dhsa_read_op_params(dst);
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const ggml_tensor * sel = dst->src[4];

    dhsa_cuda_attn_args a = {};
    a.in         = views_of(q, k, mask);
    a.v          = (const half *) v->data;
    a.v_row      = stride(v, 1, sizeof(half));
    a.v_head     = stride(v, 2, sizeof(half));
    a.sel        = (const int32_t *) sel->data;
    a.max_ranges = ggml_dhsa_max_ranges(k->ne[1], op.chunk_min, op.chunk_avg);
    a.q_block    = op.q_block;
    a.dst        = (float *) dst->data;
    a.scale      = op.scale;
    a.softcap    = op.softcap;
    // The density statistics (dhsa_runtime.pairs_*) are counted by the CPU kernel only: reading them
    // back here would synchronise the stream once per layer.
    ggml_cuda_pool_alloc<char> scratch(ctx.pool(), std::max<size_t>(dhsa_cuda_attn_scratch_size(&a), 1));
    a.scratch = scratch.get();
    if (ggml_cuda_dhsa_attn_via_fattn(ctx, dst, a)) {
        return;
    }
    CUDA_CHECK(dhsa_cuda_attn(&a, ctx.stream()));
}

bool ggml_cuda_dhsa_supports_op(int device, const ggml_tensor * op) {
    const int cc = ggml_cuda_info().devices[device].cc;
    if (!GGML_CUDA_CC_IS_NVIDIA(cc)) {
        return false;
    }
    const ggml_tensor * q = op->src[0], * k = op->src[1];
    const bool common = q->type == GGML_TYPE_F32 && k->type == GGML_TYPE_F16 && q->ne[3] == 1 && k->ne[3] == 1;
    if (op->op == GGML_OP_DHSA_SELECT) {
        return common && op->src[2]->type == GGML_TYPE_F16;
    }
    const ggml_tensor * v = op->src[2];
    return common && v->type == GGML_TYPE_F16 && v->ne[0] == k->ne[0] && op->src[3]->type == GGML_TYPE_F16 &&
           dhsa_cuda_attn_supported((int32_t) k->ne[0], ggml_cuda_highest_compiled_arch(cc));
}

bool ggml_cuda_dhsa_is_op(const ggml_tensor * node) {
    return node->op == GGML_OP_DHSA_SELECT || node->op == GGML_OP_DHSA_ATTN;
}
