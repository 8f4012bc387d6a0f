// One attention layer run through ggml on the CPU backend, for op-level tests and benchmarks
// (pydhsa_op_attention in pydhsa.h). The tensors are laid out exactly as llama.cpp's graph hands them to
// flash attention (q/k/v permuted views, an f16 causal mask), so what is tested and timed here is what
// the model runs.

#include "pydhsa.h"
#include "pydhsa-settings.h"
#include "llama-dhsa.h"

#include "ggml-cpu-dhsa.h"
#include "ggml-cpu.h"
#include "ggml-dhsa.h"
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"

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

dhsa_runtime make_runtime(const pydhsa_dhsa_params & d, int32_t dense_from) {
    dhsa_runtime rt;
    const dhsa_settings s = pydhsa_settings_from_params(d);
    llama_dhsa_runtime_init(&rt, &s);
    rt.dense_from = dense_from;
    return rt;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

struct backend_guard {
    ggml_backend_t backend = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    ~backend_guard() {
        ggml_backend_buffer_free(buffer);
        ggml_backend_free(backend);
    }
};

// "cpu" (or NULL): the CPU backend with n_threads; "cuda"/"gpu": the first GPU device ggml registered;
// else a device by its registry name ("CPU" is the CPU backend with n_threads).
ggml_backend_t open_backend(const char * device, int32_t n_threads) {
    if (device == nullptr || strcmp(device, "cpu") == 0 || strcmp(device, "CPU") == 0) {
        ggml_backend_t cpu = ggml_backend_cpu_init();
        if (cpu) {
            ggml_backend_cpu_set_n_threads(cpu, n_threads);
        }
        return cpu;
    }
    if (strcmp(device, "cuda") == 0 || strcmp(device, "gpu") == 0) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        return dev ? ggml_backend_dev_init(dev, nullptr) : nullptr;
    }
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(device);
    return dev ? ggml_backend_dev_init(dev, nullptr) : nullptr;
}

// Wall time of one synchronous graph computation, from cold selection caches unless warm.
bool timed_compute(ggml_backend_t backend, ggml_cgraph * graph, dhsa_runtime * rt, bool warm, double * ms) {
    if (!warm) {
        ggml_dhsa_runtime_release_cache(rt);
    }
    const double t0 = now_ms();
    const bool ok   = ggml_backend_graph_compute(backend, graph) == GGML_STATUS_SUCCESS;
    *ms             = now_ms() - t0;
    return ok;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The mask route's second mask: the causal mask restricted to the selected ranges. One mask serves all
// heads, as in llama.cpp: the union of the KV heads' ranges (exact for H_kv = 1).
std::vector<ggml_fp16_t> selection_mask(const std::vector<int32_t> & sel, int64_t n_q, int64_t n_q_pad, int64_t n_kv,
                                        int64_t n_head_kv, int32_t q_pos0, const dhsa_runtime & rt) {
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask((size_t) (n_kv * n_q_pad), ninf);
    const int32_t * slots = sel.data() + DHSA_SEL_HEADER(n_q);
    const int64_t slot_size = 1 + 2 * (int64_t) ggml_dhsa_max_ranges(n_kv, rt.chunk_min, rt.chunk_avg);
    for (int64_t r = 0; r < n_q; r++) {
        ggml_fp16_t * row = mask.data() + r * n_kv;
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
    return mask;
}

}  // namespace

extern "C" int32_t pydhsa_op_attention(int32_t mode, const pydhsa_dhsa_params * dhsa, int32_t dense_from,
                                       const float * q, const void * k, const void * v, int32_t kv_type, int32_t n_q,
                                       int32_t n_kv, int32_t n_head, int32_t n_head_kv, int32_t d, int32_t q_pos0,
                                       float scale, float softcap, const char * device, int32_t n_threads,
                                       int32_t n_repeat, bool warm_cache, float * out, int32_t * ranges,
                                       int64_t n_ranges_ints, int64_t * n_ranges_out, double * elapsed_ms,
                                       pydhsa_error * err) {
    return pydhsa_op_attention_masked(mode, dhsa, dense_from, q, k, v, kv_type, n_q, n_kv, n_head, n_head_kv, d, q_pos0,
                                      nullptr, scale, softcap, device, n_threads, n_repeat, warm_cache, out, ranges,
                                      n_ranges_ints, n_ranges_out, elapsed_ms, err);
}

extern "C" int32_t pydhsa_op_attention_masked(int32_t mode, const pydhsa_dhsa_params * dhsa, int32_t dense_from,
                                              const float * q, const void * k, const void * v, int32_t kv_type,
                                              int32_t n_q, int32_t n_kv, int32_t n_head, int32_t n_head_kv,
                                              int32_t d, int32_t q_pos0, const uint8_t * visible, float scale,
                                              float softcap, const char * device, int32_t n_threads,
                                              int32_t n_repeat, bool warm_cache, float * out, int32_t * ranges,
                                              int64_t n_ranges_ints, int64_t * n_ranges_out, double * elapsed_ms,
                                              pydhsa_error * err) {
    if (visible) {
        if (mode == PYDHSA_OP_MASK) {
            return op_error(err, PYDHSA_ERR_ARGUMENT, "a caller's mask is not for the mask route");
        }
        q_pos0 = 0;
    }
    if (!q || !k || !v || (!out && mode != PYDHSA_OP_SELECT) || n_q < 1 || n_kv < 1 || n_head < 1 || n_head_kv < 1 || n_head % n_head_kv != 0 ||
        d < 1 || q_pos0 < 0 || q_pos0 + n_q > n_kv || n_threads < 1 || n_repeat < 1 || mode < 0 || mode > 5 ||
        (mode != PYDHSA_OP_FLASH && !dhsa)) {
        return op_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_op_attention");
    }
    if (kv_type < 0 || kv_type >= GGML_TYPE_COUNT || ggml_get_type_traits((ggml_type) kv_type)->blck_size == 0 ||
        d % ggml_blck_size((ggml_type) kv_type) != 0) {
        return op_error(err, PYDHSA_ERR_ARGUMENT, "kv_type is not a ggml type whose rows hold d values");
    }
    backend_guard bk;
    bk.backend = open_backend(device, n_threads);
    if (!bk.backend) {
        return op_error(err, PYDHSA_ERR_ARGUMENT,
                        "no such device (use \"cpu\", or \"cuda\" with a CUDA build and a visible GPU)");
    }
    const ggml_type type = (ggml_type) kv_type;
    const int64_t n_q_pad   = GGML_PAD(n_q, 64);
    pydhsa_dhsa_params defaults;
    if (dhsa == nullptr) {
        dhsa_settings s;
        dhsa_settings_default(&s);
        defaults = pydhsa_params_from_settings(s, true);
    }
    dhsa_runtime rt = make_runtime(dhsa ? *dhsa : defaults, dense_from);
    // The forced CUDA routes are DHSA runs with the route recorded in the runtime.
    const int32_t forced_route = mode == PYDHSA_OP_DHSA_OWN ? DHSA_CUDA_ATTN_OWN :
                                 mode == PYDHSA_OP_DHSA_FATTN ? DHSA_CUDA_ATTN_FATTN : DHSA_CUDA_ATTN_AUTO;
    if (forced_route != DHSA_CUDA_ATTN_AUTO) {
        rt.cuda_attn_route = forced_route;
        mode = PYDHSA_OP_DHSA;
    }

    // Tensors are created without data and allocated in one buffer of the chosen backend.
    ggml_init_params ip = { 64 * ggml_tensor_overhead() + 2 * ggml_graph_overhead(), nullptr, true };
    ggml_ctx_guard guard{ ggml_init(ip) };
    if (!guard.ctx) {
        return op_error(err, PYDHSA_ERR_INTERNAL, "ggml_init failed (out of memory?)");
    }
    ggml_context * ctx = guard.ctx;

    // As llama.cpp stores them: q [d, H, n_q], K/V cache rows [d, H_kv, n_kv]; attention sees permuted views.
    ggml_tensor * q_t  = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, n_head, n_q);
    ggml_tensor * k_t  = ggml_new_tensor_3d(ctx, type, d, n_head_kv, n_kv);
    ggml_tensor * v_t  = ggml_new_tensor_3d(ctx, type, d, n_head_kv, n_kv);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_q_pad);
    ggml_tensor * qp = ggml_permute(ctx, q_t, 0, 2, 1, 3);
    ggml_tensor * kp = ggml_permute(ctx, k_t, 0, 2, 1, 3);
    ggml_tensor * vp = ggml_permute(ctx, v_t, 0, 2, 1, 3);

    ggml_tensor * sel = nullptr, * fa_mask = nullptr, * result;
    if (mode == PYDHSA_OP_DHSA || mode == PYDHSA_OP_SELECT) {
        sel    = ggml_dhsa_select(ctx, qp, kp, mask, &rt, 0);
        result = mode == PYDHSA_OP_DHSA ? ggml_dhsa_attn(ctx, qp, kp, vp, mask, sel, scale, softcap, &rt, 0) : sel;
    } else {
        // The mask route runs the selection, then flash attention under a mask with every unselected key
        // at -inf; flash mode runs flash attention under the causal mask.
        if (mode == PYDHSA_OP_MASK) {
            sel     = ggml_dhsa_select(ctx, qp, kp, mask, &rt, 0);
            fa_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_q_pad);
        }
        // as the graph casts f32 K/V (other cache types go to flash attention as they are)
        ggml_tensor * kf = type == GGML_TYPE_F32 ? ggml_cast(ctx, kp, GGML_TYPE_F16) : kp;
        ggml_tensor * vf = type == GGML_TYPE_F32 ? ggml_cast(ctx, vp, GGML_TYPE_F16) : vp;
        result = ggml_flash_attn_ext(ctx, qp, kf, vf, fa_mask ? fa_mask : mask, scale, 0.0f, softcap);
        ggml_prec_set_acc(result, GGML_PREC_F32);
    }
    bk.buffer = ggml_backend_alloc_ctx_tensors(ctx, bk.backend);
    if (!bk.buffer) {
        return op_error(err, PYDHSA_ERR_INTERNAL, "could not allocate the op's tensors on the device");
    }
    ggml_backend_tensor_set(q_t, q, 0, ggml_nbytes(q_t));
    ggml_backend_tensor_set(k_t, k, 0, ggml_nbytes(k_t));
    ggml_backend_tensor_set(v_t, v, 0, ggml_nbytes(v_t));
    {
        std::vector<ggml_fp16_t> causal((size_t) (n_kv * n_q_pad));
        const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
        // Row r: keys [0, q_pos0 + r] visible (or as the caller's mask says); padding rows past n_q masked.
        for (int64_t r = 0; r < n_q_pad; r++) {
            for (int64_t j = 0; j < n_kv; j++) {
                const bool seen = r < n_q && (visible ? visible[r * n_kv + j] != 0 : j <= q_pos0 + r);
                causal[r * n_kv + j] = seen ? zero : ninf;
            }
        }
        ggml_backend_tensor_set(mask, causal.data(), 0, ggml_nbytes(mask));
    }

    ggml_cgraph * g_sel = nullptr;
    if (mode == PYDHSA_OP_MASK) {
        g_sel = ggml_new_graph(ctx);
        ggml_build_forward_expand(g_sel, sel);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, result);
    // A backend aborts on an op it lacks, so refuse up front (e.g. f32 K/V for the CUDA DHSA kernels).
    for (ggml_cgraph * graph : { g_sel, gf }) {
        for (int i = 0; graph && i < ggml_graph_n_nodes(graph); i++) {
            ggml_tensor * node = ggml_graph_node(graph, i);
            if (!ggml_backend_supports_op(bk.backend, node)) {
                char message[256];
                snprintf(message, sizeof(message), "the %s backend does not support %s for these shapes/types",
                         ggml_backend_name(bk.backend), ggml_op_desc(node));
                return op_error(err, PYDHSA_ERR_ARGUMENT, message);
            }
        }
    }

    // One untimed warm-up when timing several runs (module loads, allocations); the reported time is
    // the median, and for the mask route the sum of the selection and the flash-attention graphs (the
    // host work of turning ranges into a mask is not counted).
    std::vector<double> times;
    std::vector<int32_t> sel_host;
    for (int32_t run = n_repeat > 1 ? -1 : 0; run < n_repeat; run++) {
        double ms_sel = 0.0, ms = 0.0;
        // Poison the outputs (NaN floats, -1 ints) so that an element a kernel fails to write shows.
        ggml_backend_tensor_memset(result, 0xFF, 0, ggml_nbytes(result));
        if (sel) {
            ggml_backend_tensor_memset(sel, 0xFF, 0, ggml_nbytes(sel));
        }
        if (g_sel) {
            if (!timed_compute(bk.backend, g_sel, &rt, warm_cache, &ms_sel)) {
                return op_error(err, PYDHSA_ERR_INTERNAL, "selection failed");
            }
            sel_host.resize((size_t) ggml_nelements(sel));
            ggml_backend_tensor_get(sel, sel_host.data(), 0, ggml_nbytes(sel));
            const std::vector<ggml_fp16_t> m =
                selection_mask(sel_host, n_q, n_q_pad, n_kv, n_head_kv, q_pos0, rt);
            ggml_backend_tensor_set(fa_mask, m.data(), 0, ggml_nbytes(fa_mask));
        }
        if (!timed_compute(bk.backend, gf, &rt, warm_cache, &ms)) {
            return op_error(err, PYDHSA_ERR_INTERNAL, "graph computation failed");
        }
        if (run >= 0) {
            times.push_back(ms_sel + ms);
        }
    }
    ggml_dhsa_runtime_release_cache(&rt);
    if (forced_route == DHSA_CUDA_ATTN_FATTN && rt.cuda_fattn_runs == 0) {
        return op_error(err, PYDHSA_ERR_ARGUMENT,
                        "upstream's sparse flash attention does not apply to this configuration "
                        "(CUDA, no soft-capping, head size 64/128/256, q_block a multiple of the tile width, "
                        "no dense rows; native/dhsa/ggml-cuda-dhsa-fattn.cu)");
    }
    if (elapsed_ms) {
        *elapsed_ms = median(times);
    }
    if (mode != PYDHSA_OP_SELECT) {
        ggml_backend_tensor_get(result, out, 0, sizeof(float) * (size_t) n_q * n_head * d);  // [d, H, n_q] == [n_q][H][d]
    }
    if (sel) {
        const int64_t n = ggml_nelements(sel);
        if (n_ranges_out) {
            *n_ranges_out = n;
        }
        if (ranges) {
            if (n > n_ranges_ints) {
                return op_error(err, PYDHSA_ERR_BUFFER, "ranges buffer too small");
            }
            ggml_backend_tensor_get(sel, ranges, 0, sizeof(int32_t) * (size_t) n);
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

extern "C" int32_t pydhsa_op_device_count(void) {
    return (int32_t) ggml_backend_dev_count();
}

extern "C" const char * pydhsa_op_device_name(int32_t i) {
    return i >= 0 && (size_t) i < ggml_backend_dev_count() ? ggml_backend_dev_name(ggml_backend_dev_get((size_t) i))
                                                            : nullptr;
}

extern "C" int32_t pydhsa_gpu_count(void) {
    int32_t n = 0;
    for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
        n += ggml_backend_dev_type(ggml_backend_dev_get(i)) == GGML_BACKEND_DEVICE_TYPE_GPU;
    }
    return n;
}
