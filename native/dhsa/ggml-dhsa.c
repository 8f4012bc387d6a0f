// Constructors of the DHSA ops (compiled into ggml-base): shape checks and parameters only, as every
// ggml op constructor. See ggml-dhsa.h.
#include "ggml-dhsa.h"

#include "dhsa-runtime-params.h"
#include "ggml-impl.h"

#include <string.h>

// op_params: struct dhsa_op_params (dhsa-runtime-params.h), the settings as values
static void dhsa_set_params(struct ggml_tensor * t, struct dhsa_runtime * rt, int32_t il, float scale, float softcap) {
    const struct dhsa_op_params p = dhsa_op_params_from_runtime(rt, il, scale, softcap);
    dhsa_write_op_params(t, &p);
}

bool ggml_dhsa_supports_kv_type(enum ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 || type == GGML_TYPE_Q8_0;
}

bool ggml_dhsa_supports_head_size(int64_t d) {
    // The per-thread scratch of the CPU kernel grows with d (ggml-cpu-dhsa.cpp), and every head size the
    // supported architectures use (64, 80, 96, 128, 256) is a multiple of 16.
    return d >= 16 && d <= 512 && d % 16 == 0;
}

int32_t ggml_dhsa_max_ranges(int64_t n_kv, int32_t chunk_min, int32_t chunk_avg) {
    // Each range holds the sink, the local window or at least one chunk, and ranges are separated by at
    // least one key: bounded by the chunk count + 2 and by half the keys.
    const int64_t shortest = chunk_min < chunk_avg ? chunk_min : chunk_avg;
    const int64_t chunks   = n_kv / (shortest > 0 ? shortest : 1) + n_kv / DHSA_SEGMENT + 2;
    const int64_t half     = (n_kv + 1) / 2;
    const int64_t m        = chunks + 2 < half ? chunks + 2 : half;
    return (int32_t) (m > 1 ? m : 1);
}

struct ggml_tensor * ggml_dhsa_select(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                      struct ggml_tensor * kq_mask, struct dhsa_runtime * rt, int32_t il) {
    GGML_ASSERT(rt != NULL && il >= 0 && il < DHSA_MAX_LAYERS);
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float));
    GGML_ASSERT(ggml_dhsa_supports_kv_type(k->type) && ggml_dhsa_supports_head_size(k->ne[0]));
    GGML_ASSERT(q->ne[0] == k->ne[0] && q->ne[3] == 1 && k->ne[3] == 1);
    GGML_ASSERT(q->ne[2] % k->ne[2] == 0);
    GGML_ASSERT(kq_mask && kq_mask->type == GGML_TYPE_F16 && kq_mask->ne[0] == k->ne[1] && kq_mask->ne[1] >= q->ne[1]);

    const int64_t n_q       = q->ne[1];
    const int64_t n_blocks  = (n_q + rt->q_block - 1) / rt->q_block;
    const int64_t slot_size = 1 + 2 * (int64_t) ggml_dhsa_max_ranges(k->ne[1], rt->chunk_min, rt->chunk_avg);
    struct ggml_tensor * result =
        ggml_new_tensor_1d(ctx, GGML_TYPE_I32, DHSA_SEL_HEADER(n_q) + n_blocks * k->ne[2] * slot_size);
    dhsa_set_params(result, rt, il, 0.0f, 0.0f);
    result->op     = GGML_OP_DHSA_SELECT;
    result->src[0] = q;
    result->src[1] = k;
    result->src[2] = kq_mask;
    return result;
}

struct ggml_tensor * ggml_dhsa_attn(struct ggml_context * ctx, struct ggml_tensor * q, struct ggml_tensor * k,
                                    struct ggml_tensor * v, struct ggml_tensor * kq_mask, struct ggml_tensor * sel,
                                    float scale, float softcap, struct dhsa_runtime * rt, int32_t il) {
    GGML_ASSERT(sel && sel->op == GGML_OP_DHSA_SELECT && sel->src[0] == q && sel->src[1] == k);
    GGML_ASSERT(ggml_dhsa_supports_kv_type(v->type) && ggml_dhsa_supports_head_size(v->ne[0]));
    GGML_ASSERT(v->ne[1] == k->ne[1] && v->ne[2] == k->ne[2] && v->ne[3] == 1);
    GGML_ASSERT(v->nb[0] == ggml_type_size(v->type));  // not transposed (flash-attention layout)
    GGML_ASSERT(softcap >= 0.0f);

    // [d_v, H, n_q, 1], as ggml_flash_attn_ext
    struct ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, v->ne[0], q->ne[2], q->ne[1], 1);
    dhsa_set_params(result, rt, il, scale, softcap);
    result->op     = GGML_OP_DHSA_ATTN;
    result->src[0] = q;
    result->src[1] = k;
    result->src[2] = v;
    result->src[3] = kq_mask;
    result->src[4] = sel;
    return result;
}
