// The fattn route of a DHSA attention node: upstream's sparse MMA flash attention kernel (the one
// DeepSeek's top-k attention uses) computes attention over exactly the keys DHSA selected. Opt-in
// (PYDHSA_CUDA_ATTN=fattn, or the runtime's cuda_attn_route): measured slower than our kernel (see
// ggml_cuda_dhsa_attn_via_fattn).
//
// How: the node becomes a FLASH_ATTN_EXT node on the stack whose "sequences" are the KV heads (Q viewed as
// [d, n_q, G, H_kv], K/V as [d, n_kv, 1, H_kv], the causal mask broadcast), so that upstream's one index
// list per (sequence, query tile) is one list per (KV head, query tile), as DHSA selects per (query block,
// KV head). Its src[5] is the selection; patch 0007 makes launch_fattn call ggml_cuda_dhsa_fattn_fill_lists
// for it instead of scanning a mask. A tile of ncols1 queries lies inside one query block (q_block is a
// multiple of ncols1 and both start at the ubatch's first row), so its list is that block's ranges, cut at
// the tile's last position, and the causal mask does the rest: the result is the DHSA op's, within f16
// rounding (native/dhsa/ALGORITHM.md, step 6).
//
// Bound: upstream sizes the lists (and splits the work across CTAs) by op_params[4] = n_kv_max, known on the
// host before the selection runs. A sparse block keeps at most max(forced keys, budget_tokens - 1 +
// chunk_max) keys (ALGORITHM.md, step 5). Lists that do not fit (dense blocks, whose rows are not
// consecutive cells, or a bound that a future selection rule breaks) are cut and flagged in device memory,
// and our own kernel, launched behind upstream's with that flag as its run_if, recomputes the node: never
// a wrong result, and no host synchronisation.

#include "ggml-cuda-dhsa-fattn.cuh"

#include "ggml-cuda-dhsa.cuh"
#include "ggml-cuda/fattn-common.cuh"
#include "ggml-cuda/fattn.cuh"

#include "dhsa-runtime-params.h"
#include "ggml-dhsa.h"

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int32_t kMagic        = 0x44485341;  // "DHSA" in op_params[5] of a node made here
constexpr int     kListThreads  = 256;
constexpr int     kCopyThreads  = 256;

// op_params of the FLASH_ATTN_EXT node made here: upstream's [0] scale, [1] max_bias, [2] softcap, [3] prec,
// [4] n_kv_max; ours [5] kMagic, [6] q_block, [7] max_ranges, [8..9] the overflow flag's device address.
enum { kParamMagic = 5, kParamQBlock = 6, kParamMaxRanges = 7, kParamOverflow = 8 };

// One CTA per (query tile jt, KV head g): the keys of slot (block of the tile, g), cut at the tile's last
// position + 1, in increasing order (the ranges are sorted and disjoint).
__global__ void __launch_bounds__(kListThreads) dhsa_fattn_lists_kernel(
        const int32_t * sel, int32_t n_q, int32_t n_head_kv, int32_t q_block, int64_t slot_size, int32_t ncols1,
        int32_t n_kv_max, int32_t * indices, int32_t * counts, int32_t * overflow) {
    using block_scan = cub::BlockScan<int32_t, kListThreads>;
    __shared__ typename block_scan::TempStorage scan_tmp;
    __shared__ int32_t range_start[kListThreads], range_len[kListThreads], range_off[kListThreads];
    __shared__ int32_t keys_end;

    const int32_t jt = blockIdx.x, g = blockIdx.y, n_tiles = gridDim.x;
    const int32_t r0 = jt * ncols1, r1 = min(n_q, r0 + ncols1);
    if (threadIdx.x == 0) {
        int32_t end = 0;  // row positions head the selection tensor; -1: a row that sees nothing
        for (int32_t r = r0; r < r1; r++) {
            end = max(end, sel[r] + 1);
        }
        keys_end = end;
    }
    __syncthreads();
    const int32_t   end_pos  = keys_end;
    const int32_t * slot     = sel + (n_q + 1) + ((int64_t) (r0 / q_block) * n_head_kv + g) * slot_size;
    const int32_t   n_ranges = slot[0];
    int32_t *       list     = indices + ((int64_t) g * n_tiles + jt) * n_kv_max;

    int32_t total = 0;  // keys listed so far (the same in every thread)
    for (int32_t base = 0; base < n_ranges; base += kListThreads) {
        const int32_t i = base + threadIdx.x;
        int32_t start = 0, len = 0;
        if (i < n_ranges) {
            start = slot[1 + 2 * i];
            len   = max(0, min(slot[2 + 2 * i], end_pos) - start);
        }
        int32_t off = 0, chunk_total = 0;
        block_scan(scan_tmp).ExclusiveSum(len, off, chunk_total);
        range_start[threadIdx.x] = start;
        range_len[threadIdx.x]   = len;
        range_off[threadIdx.x]   = total + off;
        __syncthreads();
        const int32_t n_here = min(kListThreads, n_ranges - base);
        for (int32_t k = 0; k < n_here; k++) {  // the CTA writes one range at a time, coalesced
            const int32_t s = range_start[k], o = range_off[k];
            for (int32_t t = threadIdx.x; t < range_len[k] && o + t < n_kv_max; t += kListThreads) {
                list[o + t] = s + t;
            }
        }
        total += chunk_total;
        __syncthreads();  // range_* and scan_tmp are reused
    }

    // -1 up to n_kv_max, as upstream's mask scan leaves its lists: the work of a list is split across CTAs
    // by n_kv_max, and a CTA whose share starts past the list's end still runs one (fully masked) batch.
    const int32_t count = min(total, n_kv_max);
    for (int32_t t = count + threadIdx.x; t < n_kv_max; t += kListThreads) {
        list[t] = -1;
    }
    if (threadIdx.x == 0) {
        counts[(int64_t) g * n_tiles + jt] = count;
        if (total > n_kv_max) {
            *overflow = 1;
        }
    }
}

// Upstream's output with KV heads as sequences, [d][G][n_q][H_kv], into the node's [d][H_kv * G][n_q]:
// rows of G * d floats move from (g, r) to (r, g).
__global__ void __launch_bounds__(kCopyThreads) dhsa_fattn_heads_kernel(const float4 * src, float4 * dst, int64_t n_q,
                                                                        int64_t n_head_kv, int64_t row4) {
    const int64_t i = (int64_t) blockIdx.x * kCopyThreads + threadIdx.x;
    if (i >= n_q * n_head_kv * row4) {
        return;
    }
    const int64_t c = i % row4, t = i / row4, r = t % n_q, g = t / n_q;
    dst[(r * n_head_kv + g) * row4 + c] = src[i];
}

// The route asked for: the node's, else (AUTO) the environment's PYDHSA_CUDA_ATTN = auto | own | fattn,
// read at every node (a getenv is nothing next to the node's launches, and tests switch it per model).
int32_t requested_route(const dhsa_op_params & op) {
    if (op.cuda_attn_route != DHSA_CUDA_ATTN_AUTO) {
        return op.cuda_attn_route;
    }
    const char * e = getenv("PYDHSA_CUDA_ATTN");
    if (e == nullptr || *e == '\0' || strcmp(e, "auto") == 0) {
        return DHSA_CUDA_ATTN_AUTO;
    }
    if (strcmp(e, "own") == 0) {
        return DHSA_CUDA_ATTN_OWN;
    }
    if (strcmp(e, "fattn") == 0) {
        return DHSA_CUDA_ATTN_FATTN;
    }
    static bool warned = false;
    if (!warned) {
        warned = true;
        GGML_LOG_WARN("pydhsa: PYDHSA_CUDA_ATTN=%s is not auto, own or fattn; using auto\n", e);
    }
    return DHSA_CUDA_ATTN_AUTO;
}

bool strides_16(const ggml_tensor & t) {
    for (int i = 1; i < GGML_MAX_DIMS; i++) {
        if (t.nb[i] % 16 != 0) {
            return false;
        }
    }
    return true;
}

// The node as upstream's flash attention over KV heads as sequences (file comment); data/op_params of
// `fa` are set by the caller.
struct fattn_node {
    ggml_tensor q, k, v, mask, fa;
};

void make_fattn_node(const ggml_tensor * dst, fattn_node & n) {
    const ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2], * mask = dst->src[3];
    const int64_t H_kv = k->ne[2], G = q->ne[2] / H_kv;
    n.q = *q;
    n.q.ne[2] = G;
    n.q.ne[3] = H_kv;
    n.q.nb[3] = q->nb[2] * G;
    for (auto [src, out] : {std::pair{k, &n.k}, std::pair{v, &n.v}}) {
        *out       = *src;
        out->ne[2] = 1;
        out->ne[3] = H_kv;
        out->nb[3] = src->nb[2];
    }
    n.mask       = *mask;
    n.mask.ne[2] = 1;
    n.mask.ne[3] = H_kv;
    n.mask.nb[2] = mask->nb[1] * mask->ne[1];
    n.mask.nb[3] = 0;  // one causal mask for every KV head
    n.fa        = ggml_tensor{};
    n.fa.type   = GGML_TYPE_F32;
    n.fa.op     = GGML_OP_FLASH_ATTN_EXT;
    n.fa.buffer = dst->buffer;
    const int64_t ne[4] = {v->ne[0], G, q->ne[1], H_kv};
    for (int i = 0; i < 4; i++) {
        n.fa.ne[i] = ne[i];
        n.fa.nb[i] = i == 0 ? sizeof(float) : n.fa.nb[i - 1] * ne[i - 1];
    }
    n.fa.src[0] = &n.q;
    n.fa.src[1] = &n.k;
    n.fa.src[2] = &n.v;
    n.fa.src[3] = &n.mask;
    n.fa.src[5] = dst->src[4];  // the selection
}

struct fattn_plan {
    int32_t ncols1;
    int32_t n_kv_max;  // upper bound of a tile's list (file comment)
};

// Whether upstream's sparse kernel computes this node exactly (file comment), and with which tile.
bool plan_fattn(int device, const ggml_tensor * dst, const dhsa_op_params & op, const fattn_node & n,
                fattn_plan * plan) {
    const ggml_tensor * k = dst->src[1], * v = dst->src[2];
    const int cc = ggml_cuda_info().devices[device].cc;
    const int64_t n_q = n.q.ne[1], n_kv = k->ne[1], d = k->ne[0], G = n.q.ne[2];
    if (op.softcap != 0.0f ||                                  // no soft-capping instance upstream
        !GGML_CUDA_CC_IS_NVIDIA(cc) || cc < GGML_CUDA_CC_AMPERE ||
        ggml_cuda_highest_compiled_arch(cc) < GGML_CUDA_CC_AMPERE ||
        !(d == 64 || d == 128 || d == 256) || v->ne[0] != d ||
        k->type != GGML_TYPE_F16 || v->type != GGML_TYPE_F16 ||
        op.budget >= 1.0 || n_kv < op.min_context ||          // dense selections: nothing to skip
        op.state->dense_from < n_kv) {                         // dense rows would overflow every list
        return false;
    }
    // The tile ggml picks for this node (fattn.cu: ..._switch_ncols2 and _switch_ncols1 on Ampere and later).
    const bool gqa_opt = n_kv % FATTN_KQ_STRIDE == 0 && strides_16(n.q) && strides_16(n.k) && strides_16(n.v) &&
                         strides_16(n.mask);
    const int ncols2 = !gqa_opt ? 1 : G > 4 ? 8 : G > 2 ? 4 : G > 1 ? 2 : 1;
    const int ncols1 = 64 / ncols2;
    if (!ggml_cuda_dhsa_fattn_sparse_shape((int) d, (int) d, ncols1, ncols2) || n_q <= 32 / ncols2 ||
        op.q_block % ncols1 != 0) {
        return false;
    }
    const int64_t budget_tokens = (int64_t) std::ceil(op.budget * (double) n_kv);
    const int64_t forced        = std::min<int64_t>(op.sink_tokens, n_kv) + op.local_tokens + op.q_block;
    const int64_t bound = std::min<int64_t>(n_kv, std::max<int64_t>(forced, budget_tokens - 1 + op.chunk_max));
    plan->ncols1   = ncols1;
    plan->n_kv_max = (int32_t) bound;
    // Test hook: a smaller bound makes lists overflow, so that tests can check the fallback behind it.
    if (const char * e = getenv("PYDHSA_CUDA_FATTN_MAX_KEYS")) {
        plan->n_kv_max = std::max(1, std::min(plan->n_kv_max, atoi(e)));
    }
    return true;
}

}  // namespace

bool ggml_cuda_dhsa_fattn_lists_attached(const ggml_tensor * fa) {
    return fa->op == GGML_OP_FLASH_ATTN_EXT && fa->src[5] != nullptr && fa->op_params[kParamMagic] == kMagic;
}

void ggml_cuda_dhsa_fattn_fill_lists(const ggml_tensor * fa, int ncols1, int32_t n_kv_max, int32_t * indices,
                                     int32_t * counts, cudaStream_t stream) {
    const ggml_tensor * q = fa->src[0], * sel = fa->src[5];
    const int32_t q_block = fa->op_params[kParamQBlock], max_ranges = fa->op_params[kParamMaxRanges];
    int32_t * overflow;
    memcpy(&overflow, &fa->op_params[kParamOverflow], sizeof(overflow));
    GGML_ASSERT(q_block % ncols1 == 0 && n_kv_max > 0);  // plan_fattn checked the tile ggml picked
    const int32_t n_q = (int32_t) q->ne[1], n_head_kv = (int32_t) q->ne[3];
    const dim3 grid((unsigned) ((n_q + ncols1 - 1) / ncols1), (unsigned) n_head_kv);
    dhsa_fattn_lists_kernel<<<grid, kListThreads, 0, stream>>>((const int32_t *) sel->data, n_q, n_head_kv, q_block,
                                                               1 + 2 * (int64_t) max_ranges, ncols1, n_kv_max,
                                                               indices, counts, overflow);
    CUDA_CHECK(cudaGetLastError());
}

bool ggml_cuda_dhsa_attn_via_fattn(ggml_backend_cuda_context & ctx, ggml_tensor * dst, dhsa_cuda_attn_args own) {
    const dhsa_op_params op = dhsa_read_op_params(dst);
    // AUTO keeps our kernel: on an H200 it was faster than this route in every configuration measured (512
    // queries, 32K-128K keys, d 128/256, 8/4, 16/8 and 28/4 heads, budgets 0.1/0.3: this route took 1.0x to
    // 1.3x our kernel's time; whole prefills of Gemma3-1B- and Qwen2-7B-shaped models equal within noise;
    // bench/results/cuda-h200-fattn/). Upstream's sparse kernel loads K/V in one stage (no cp.async
    // pipeline) and gathers the mask element by element; ours pipelines both.
    if (requested_route(op) != DHSA_CUDA_ATTN_FATTN) {
        return false;
    }
    fattn_node n;
    make_fattn_node(dst, n);
    fattn_plan plan;
    if (!plan_fattn(ctx.device, dst, op, n, &plan)) {
        return false;
    }
    cudaStream_t stream = ctx.stream();
    ggml_cuda_pool_alloc<int32_t> overflow(ctx.pool(), 1);
    CUDA_CHECK(cudaMemsetAsync(overflow.get(), 0, sizeof(int32_t), stream));

    const int64_t H_kv = n.fa.ne[3];
    ggml_cuda_pool_alloc<float> heads_out(ctx.pool());
    n.fa.data = H_kv == 1 ? dst->data : heads_out.alloc(ggml_nelements(dst));
    const float zero = 0.0f;
    memcpy(&n.fa.op_params[0], &op.scale, sizeof(float));
    memcpy(&n.fa.op_params[1], &zero, sizeof(float));  // max_bias
    memcpy(&n.fa.op_params[2], &zero, sizeof(float));  // softcap
    n.fa.op_params[3]               = GGML_PREC_F32;   // as llama.cpp sets it
    n.fa.op_params[4]               = plan.n_kv_max;
    n.fa.op_params[kParamMagic]     = kMagic;
    n.fa.op_params[kParamQBlock]    = op.q_block;
    n.fa.op_params[kParamMaxRanges] = own.max_ranges;
    int32_t * flag = overflow.get();
    memcpy(&n.fa.op_params[kParamOverflow], &flag, sizeof(flag));

    ggml_cuda_flash_attn_ext(ctx, &n.fa);
    if (H_kv > 1) {
        const int64_t row4 = n.fa.ne[0] * n.fa.ne[1] / 4, total = ggml_nelements(dst) / 4;
        dhsa_fattn_heads_kernel<<<(unsigned) ((total + kCopyThreads - 1) / kCopyThreads), kCopyThreads, 0, stream>>>(
            (const float4 *) n.fa.data, (float4 *) dst->data, n.fa.ne[2], H_kv, row4);
        CUDA_CHECK(cudaGetLastError());
    }
    own.run_if = flag;  // recomputes the node only if a list overflowed its bound
    CUDA_CHECK(dhsa_cuda_attn(&own, stream));
    op.state->cuda_fattn_runs++;
    return true;
}
