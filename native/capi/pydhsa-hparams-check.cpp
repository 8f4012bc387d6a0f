// Hyperparameter values that would make llama.cpp abort the process, found before it loads the file.
//
// llama.cpp's loader throws a catchable exception for most bad files, but a few hyperparameters are checked
// with GGML_ASSERT (llama-model.cpp, llama_model::load_hparams) or only meet an assertion later, when the
// first graph is built (a head count that does not divide the width: ggml_reshape's GGML_ASSERT). An
// assertion aborts the whole process, so a downloaded file with a bad value would kill a Python program or
// a server. The malformed-GGUF corpus (tests/reliability/) found each check below; its cases stay there as
// regression tests. Only values of integer type are checked: a key of the wrong type is refused by
// llama.cpp's loader itself, with an exception.

#include "pydhsa-hparams-check.h"

#include "gguf.h"

#include <cinttypes>
#include <cstdio>
#include <string>

namespace {

// llama-hparams.h (internal to libllama): LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS in the pinned version.
constexpr uint64_t kMaxLayers  = 512;
constexpr uint64_t kMaxExperts = 1024;

// The key's value when it is a scalar of an integer type (negative values as 0 would hide them: -1 wraps).
bool get_integer(const gguf_context * ctx, const std::string & key, int64_t & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    switch (gguf_get_kv_type(ctx, id)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8(ctx, id); return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8(ctx, id); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(ctx, id); return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(ctx, id); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(ctx, id); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ctx, id); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) gguf_get_val_u64(ctx, id); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ctx, id); return true;
        default:               return false;
    }
}

std::string format(const char * fmt, const std::string & key, int64_t value, int64_t other = 0) {
    char buf[256];
    snprintf(buf, sizeof(buf), fmt, key.c_str(), value, other);
    return buf;
}

std::string check(const gguf_context * ctx) {
    const int64_t arch_id = gguf_find_key(ctx, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(ctx, arch_id) != GGUF_TYPE_STRING) {
        return "";  // llama.cpp refuses it with its own message
    }
    const std::string arch = gguf_get_val_str(ctx, arch_id);
    const auto key = [&](const char * name) { return arch + "." + name; };
    int64_t v = 0;

    int64_t n_layer = 0;
    if (get_integer(ctx, key("block_count"), n_layer) && (n_layer < 1 || (uint64_t) n_layer > kMaxLayers)) {
        return format("%s is %" PRId64 ", must be between 1 and %" PRId64 " (llama.cpp's layer limit)",
                      key("block_count"), n_layer, (int64_t) kMaxLayers);
    }
    if (get_integer(ctx, key("nextn_predict_layers"), v) && (v < 0 || v > n_layer)) {
        return format("%s is %" PRId64 ", more than the %" PRId64 " layers", key("nextn_predict_layers"), v, n_layer);
    }

    int64_t n_expert = 0, n_used = 0, n_groups = 0;
    const bool has_expert = get_integer(ctx, key("expert_count"), n_expert);
    get_integer(ctx, key("expert_group_count"), n_groups);
    if (has_expert && (n_expert < 0 || (uint64_t) n_expert > kMaxExperts)) {
        return format("%s is %" PRId64 ", must be between 0 and %" PRId64, key("expert_count"), n_expert,
                      (int64_t) kMaxExperts);
    }
    if (get_integer(ctx, key("expert_used_count"), n_used)) {  // an array (per layer) is left to llama.cpp
        if (n_used < 0 || n_used > n_expert) {
            return format("%s is %" PRId64 ", but the model has %" PRId64 " experts", key("expert_used_count"),
                          n_used, n_expert);
        }
        if (n_expert > 0 && n_used == 0) {
            return format("%s is %" PRId64 " with %" PRId64 " experts", key("expert_used_count"), n_used, n_expert);
        }
    }
    if (n_groups != 0 && (n_groups < 0 || n_groups >= n_expert || (n_groups > 1 && n_expert % n_groups))) {
        return format("%s is %" PRId64 ", which does not divide the %" PRId64 " experts", key("expert_group_count"),
                      n_groups, n_expert);
    }

    // Attention heads, when given as scalars (some architectures give per-layer arrays).
    int64_t n_head = 0, n_head_kv = 0, n_embd = 0, head_k = 0;
    const bool has_head = get_integer(ctx, key("attention.head_count"), n_head);
    if (has_head && n_head < 0) {
        return format("%s is %" PRId64, key("attention.head_count"), n_head);
    }
    if (has_head && n_head > 0 && get_integer(ctx, key("attention.head_count_kv"), n_head_kv) &&
        (n_head_kv < 0 || (n_head_kv > 0 && n_head % n_head_kv != 0))) {
        return format("%s is %" PRId64 ", which does not divide the %" PRId64 " query heads",
                      key("attention.head_count_kv"), n_head_kv, n_head);
    }
    if (has_head && n_head > 0 && get_integer(ctx, key("embedding_length"), n_embd) &&
        !get_integer(ctx, key("attention.key_length"), head_k) && n_embd % n_head != 0) {
        return format("%s is %" PRId64 ", not a multiple of the %" PRId64 " heads (and no attention.key_length)",
                      key("embedding_length"), n_embd, n_head);
    }
    return "";
}

}  // namespace

std::string pydhsa_hparams_problem(const char * path) {
    gguf_init_params params = { /* no_alloc = */ true, /* ctx = */ nullptr };
    gguf_context * ctx = gguf_init_from_file(path, params);
    if (!ctx) {
        return "";  // not readable as GGUF: llama.cpp's loader says why
    }
    std::string problem = check(ctx);
    gguf_free(ctx);
    return problem;
}
