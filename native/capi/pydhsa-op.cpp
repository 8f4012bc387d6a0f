// One attention layer run through ggml on the CPU backend, for op-level tests and benchmarks
// (pydhsa_op_attention in pydhsa.h). The tensors are laid out exactly as llama.cpp's graph hands them to
// flash attention (q/k/v permuted views, an f16 causal mask), so what is tested and timed here is what
// the model runs.

#include "pydhsa.h"

#include "ggml-cpu-dhsa.h"
#include "ggml-cpu.h"
#include "ggml-dhsa.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

int32_t op_error(pydhsa_error * err, int32_t code, const char * message) {
    if (err) {
        err->code = code;
        snprintf(err->message, sizeof(err->message), "%s", message);
    }
    return code;
}

struct ggml_ctx_guard {
    ggml_context * ctx;
    ~ggml_ctx_guard() { ggml_free(ctx); }
};

// Mask row r: 0 for keys [0, q_pos0 + r], -inf after; rows past n_q (padding) fully masked.
void fill_causal_mask(ggml_tensor * mask, int32_t n_q, int32_t q_pos0) {
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    for (int64_t r = 0; r < mask->ne[1]; r++) {
        ggml_fp16_t * row = (ggml_fp16_t *) ((char *) mask->data + r * mask->nb[1]);
        for (int64_t j = 0; j < mask->ne[0]; j++) {
            row[j] = (r < n_q && j <= q_pos0 + r) ? zero : ninf;
        }
    }
}

dhsa_runtime make_runtime(const pydhsa_dhsa_params & d, int32_t dense_from) {
    dhsa_runtime rt{};
    rt.budget       = d.budget;
    rt.boundary     = d.boundary;
    rt.chunk_min    = d.chunk_min;
    rt.chunk_max    = d.chunk_max;
    rt.chunk_avg    = d.chunk_avg;
    rt.window       = 4;
    rt.q_block      = d.q_block;
    rt.sink_tokens  = d.sink_tokens;
    rt.local_tokens = d.local_tokens;
    rt.dense_tail   = d.dense_tail;
    rt.min_context  = d.min_context;
    rt.all_layers   = d.all_layers ? 1 : 0;
    rt.dense_from   = dense_from;
    return rt;
}

// The work buffer is allocated here rather than inside the ggml context, whose size is data only.
bool compute(ggml_cgraph * graph, int32_t n_threads) {
    ggml_cplan plan = ggml_graph_plan(graph, n_threads, nullptr);
    std::vector<uint8_t> work(plan.work_size);
    plan.work_data = work.data();
    return ggml_graph_compute(graph, &plan) == GGML_STATUS_SUCCESS;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace

extern "C" int32_t pydhsa_op_attention(int32_t mode, const pydhsa_dhsa_params * dhsa, int32_t dense_from,
                                       const float * q, const void * k, const void * v, bool kv_f16, int32_t n_q,
                                       int32_t n_kv, int32_t n_head, int32_t n_head_kv, int32_t d, int32_t q_pos0,
                                       float scale, float softcap, int32_t n_threads, float * out, int32_t * ranges,
                                       int64_t n_ranges_ints, int64_t * n_ranges_out, double * elapsed_ms,
                                       pydhsa_error * err) {
    if (!q || !k || !v || !out || n_q < 1 || n_kv < 1 || n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0 ||
        d < 1 || q_pos0 < 0 || q_pos0 + n_q > n_kv || n_threads < 1 || mode < 0 || mode > 2 ||
        (mode != PYDHSA_OP_FLASH && !dhsa)) {
        return op_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_op_attention");
    }
    const ggml_type kv_type = kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    const int64_t n_q_pad   = GGML_PAD(n_q, 64);
    dhsa_runtime rt = make_runtime(dhsa ? *dhsa : pydhsa_dhsa_params{}, dense_from);
    const int64_t n_blocks  = mode == PYDHSA_OP_FLASH ? 0 : (n_q + rt.q_block - 1) / std::max(rt.q_block, 1);
    const int64_t sel_ints  = mode == PYDHSA_OP_FLASH ? 0 : DHSA_SEL_HEADER(n_q) +
                              n_blocks * n_head_kv * (1 + 2 * (int64_t) ggml_dhsa_max_ranges(n_kv, &rt));
    // Every tensor of the graph lives in one ggml context: inputs, f16 casts, masks, selection, output.
    const size_t data_bytes = sizeof(float) * (size_t) n_q * n_head * d * 2 +
                              (ggml_type_size(kv_type) + sizeof(ggml_fp16_t)) * (size_t) n_kv * n_head_kv * d * 2 +
                              sizeof(ggml_fp16_t) * (size_t) n_kv * n_q_pad * 2 + sizeof(int32_t) * (size_t) sel_ints;
    ggml_init_params ip = { data_bytes + 64 * ggml_tensor_overhead() + 2 * ggml_graph_overhead() + (1 << 20), nullptr,
                            false };
    ggml_ctx_guard guard{ ggml_init(ip) };
    if (!guard.ctx) {
        return op_error(err, PYDHSA_ERR_INTERNAL, "ggml_init failed (out of memory?)");
    }
    ggml_context * ctx = guard.ctx;

    // As llama.cpp stores them: q [d, H, n_q], K/V cache rows [d, H_kv, n_kv]; attention sees permuted views.
    ggml_tensor * q_t  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, n_head, n_q);
    ggml_tensor * k_t  = ggml_new_tensor_3d(ctx, kv_type, d, n_head_kv, n_kv);
    ggml_tensor * v_t  = ggml_new_tensor_3d(ctx, kv_type, d, n_head_kv, n_kv);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_q_pad);
    memcpy(q_t->data, q, ggml_nbytes(q_t));
    memcpy(k_t->data, k, ggml_nbytes(k_t));
    memcpy(v_t->data, v, ggml_nbytes(v_t));
    fill_causal_mask(mask, n_q, q_pos0);
    ggml_tensor * qp = ggml_permute(ctx, q_t, 0, 2, 1, 3);
    ggml_tensor * kp = ggml_permute(ctx, k_t, 0, 2, 1, 3);
    ggml_tensor * vp = ggml_permute(ctx, v_t, 0, 2, 1, 3);

    ggml_tensor * sel = nullptr;
    ggml_tensor * result;
    double t0 = now_ms();
    if (mode == PYDHSA_OP_DHSA) {
        sel    = ggml_dhsa_select(ctx, qp, kp, mask, &rt, 0);
        result = ggml_dhsa_attn(ctx, qp, kp, vp, mask, sel, scale, softcap, &rt, 0);
    } else {
        ggml_tensor * kf = kv_f16 ? kp : ggml_cast(ctx, kp, GGML_TYPE_F16);  // as the graph casts f32 K/V
        ggml_tensor * vf = kv_f16 ? vp : ggml_cast(ctx, vp, GGML_TYPE_F16);
        ggml_tensor * fa_mask = mask;
        if (mode == PYDHSA_OP_MASK) {
            // The mask route: run the selection, then mask every unselected key with -inf.
            sel = ggml_dhsa_select(ctx, qp, kp, mask, &rt, 0);
            ggml_cgraph * gs = ggml_new_graph(ctx);
            ggml_build_forward_expand(gs, sel);
            if (!compute(gs, n_threads)) {
                return op_error(err, PYDHSA_ERR_INTERNAL, "selection failed");
            }
            fa_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_q_pad);
            const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
            const int32_t * slots = (const int32_t *) sel->data + DHSA_SEL_HEADER(n_q);
            const int64_t slot_size = 1 + 2 * (int64_t) ggml_dhsa_max_ranges(n_kv, &rt);
            // One mask serves all heads, as in llama.cpp: the union of the KV heads' ranges (exact for H_kv = 1).
            for (int64_t r = 0; r < n_q_pad; r++) {
                ggml_fp16_t * row = (ggml_fp16_t *) ((char *) fa_mask->data + r * fa_mask->nb[1]);
                std::fill(row, row + n_kv, ninf);
                if (r >= n_q) {
                    continue;
                }
                const int64_t b = r / rt.q_block;
                for (int64_t g = 0; g < n_head_kv; g++) {
                    const int32_t * slot = slots + (b * n_head_kv + g) * slot_size;
                    for (int32_t i = 0; i < slot[0]; i++) {
                        const int64_t end = std::min<int64_t>(slot[2 + 2 * i], q_pos0 + r + 1);
                        for (int64_t j = slot[1 + 2 * i]; j < end; j++) {
                            row[j] = zero;
                        }
                    }
                }
            }
        }
        result = ggml_flash_attn_ext(ctx, qp, kf, vf, fa_mask, scale, 0.0f, softcap);
        ggml_prec_set_acc(result, GGML_PREC_F32);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, result);
    if (mode != PYDHSA_OP_MASK) {
        t0 = now_ms();
    }
    if (!compute(gf, n_threads)) {
        return op_error(err, PYDHSA_ERR_INTERNAL, "graph computation failed");
    }
    if (elapsed_ms) {
        *elapsed_ms = now_ms() - t0;
    }
    ggml_dhsa_runtime_release_cache(&rt);
    memcpy(out, result->data, sizeof(float) * (size_t) n_q * n_head * d);  // [d, H, n_q] == [n_q][H][d]
    if (sel) {
        const int64_t n = ggml_nelements(sel);
        if (n_ranges_out) {
            *n_ranges_out = n;
        }
        if (ranges) {
            if (n > n_ranges_ints) {
                return op_error(err, PYDHSA_ERR_BUFFER, "ranges buffer too small");
            }
            memcpy(ranges, sel->data, sizeof(int32_t) * (size_t) n);
        }
    } else if (n_ranges_out) {
        *n_ranges_out = 0;
    }
    if (err) {
        err->code       = PYDHSA_OK;
        err->message[0] = '\0';
    }
    return PYDHSA_OK;
}
