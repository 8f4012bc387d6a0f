// DHSA for contexts created through plain llama.h (see llama-dhsa-auto.h): the model's `<arch>.dhsa.*`
// keys and the PYDHSA_DHSA environment variable decide, the parameter table (dhsa-params.h) parses.
#include "llama-dhsa-auto.h"

#include "dhsa-params.h"
#include "ggml-cpu-dhsa.h"
#include "ggml-dhsa.h"
#include "llama-context.h"
#include "llama-dhsa.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

constexpr const char * kEnvVar = "PYDHSA_DHSA";

// What the environment variable says: nothing (unset or empty), off, or on with these settings on top of
// the model's. A malformed value is reported and turns DHSA off, so a typo never runs settings nobody asked
// for.
struct env_choice {
    bool set = false;
    bool off = false;
    bool bad = false;  // malformed (already logged)
    std::map<int32_t, std::string> values;  // parameter id -> text
};

env_choice read_env() {
    env_choice out;
    const char * raw = std::getenv(kEnvVar);
    if (raw == nullptr || *raw == '\0') {
        return out;
    }
    const std::string text = raw;
    env_choice parsed;
    parsed.set = true;
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find(',', start);
        if (end == std::string::npos) {
            end = text.size();
        }
        std::string item = text.substr(start, end - start);
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        start = end + 1;
        if (item.empty()) {
            continue;
        }
        if (item == "off" || item == "0") {
            parsed.off = true;
            continue;
        }
        if (item == "on" || item == "1") {
            continue;
        }
        const size_t eq       = item.find('=');
        const std::string key = item.substr(0, eq);
        const int32_t id      = eq == std::string::npos ? -1 : dhsa_param_find(key.c_str());
        if (id < 0) {
            LLAMA_LOG_ERROR("pydhsa: %s='%s': '%s' is not on, off or <parameter>=<value> of a DHSA parameter "
                            "(budget, boundary, chunk_min, ...); DHSA is off for this context\n",
                            kEnvVar, raw, item.c_str());
            out.bad = true;
            return out;
        }
        parsed.values[id] = item.substr(eq + 1);
    }
    return parsed;
}

// A key's value as text (llama.cpp keeps every metadata value as a string), or false when absent.
bool model_key(const llama_model & model, const std::string & key, std::string & value) {
    char buf[128];
    const int32_t n = llama_model_meta_val_str(&model, key.c_str(), buf, sizeof(buf));
    if (n < 0) {
        return false;
    }
    value = buf;
    return true;
}

// The runtimes contexts own (those made by llama_dhsa_from_model), by context.
std::mutex g_mutex;
std::unordered_map<const llama_context *, llama_dhsa_runtime_ptr> g_owned;
thread_local bool g_use_model_keys = true;  // llama_dhsa_use_model_keys

}  // namespace

void llama_dhsa_use_model_keys(bool use) {
    g_use_model_keys = use;
}

void llama_dhsa_runtime_deleter::operator()(dhsa_runtime * rt) const {
    ggml_dhsa_runtime_release_cache(rt);
    delete rt;
}

llama_dhsa_runtime_ptr llama_dhsa_from_model(const llama_model & model, llama_context_params & params) {
    std::string arch;
    if (!g_use_model_keys || !model_key(model, "general.architecture", arch)) {
        return nullptr;
    }
    dhsa_settings s;
    dhsa_settings_default(&s);
    char why[256];
    // The model's keys: a bad one is an error in the file, so DHSA stays off rather than guess.
    bool from_keys = false;
    for (int32_t id = 0; id < DHSA_PARAM_COUNT; id++) {
        std::string value;
        const std::string key = arch + ".dhsa." + dhsa_param_table()[id].name;
        if (!model_key(model, key, value)) {
            continue;
        }
        from_keys = true;
        if (dhsa_settings_set(&s, id, value.c_str(), why, sizeof(why)) != 0) {
            LLAMA_LOG_ERROR("pydhsa: GGUF key %s: %s; DHSA is off for this context\n", key.c_str(), why);
            return nullptr;
        }
    }
    const env_choice env = read_env();
    if (env.bad) {
        return nullptr;
    }
    if (env.off) {
        if (from_keys) {
            LLAMA_LOG_INFO("pydhsa: DHSA off (%s=off), the model's %s.dhsa.* keys are not used\n", kEnvVar,
                           arch.c_str());
        }
        return nullptr;
    }
    for (const auto & [id, text] : env.values) {
        if (dhsa_settings_set(&s, id, text.c_str(), why, sizeof(why)) != 0) {
            LLAMA_LOG_ERROR("pydhsa: %s: %s; DHSA is off for this context\n", kEnvVar, why);
            return nullptr;
        }
    }
    if (!from_keys && !env.set) {
        return nullptr;  // neither asks for DHSA: upstream, bit for bit
    }
    if (dhsa_settings_check(&s, why, sizeof(why)) != 0) {
        LLAMA_LOG_ERROR("pydhsa: DHSA settings: %s; DHSA is off for this context\n", why);
        return nullptr;
    }
    if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        LLAMA_LOG_INFO("pydhsa: flash attention turned on: the DHSA op replaces it (%s=off keeps it off)\n",
                       kEnvVar);
    }
    params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    char desc[512];
    dhsa_settings_describe(&s, desc, sizeof(desc));
    LLAMA_LOG_INFO("pydhsa: DHSA on (%s%s%s): %s\n", from_keys ? "the model's GGUF keys" : "",
                   from_keys && env.set ? " and " : "", env.set ? kEnvVar : "", desc);
    llama_dhsa_runtime_ptr rt(new dhsa_runtime{});
    llama_dhsa_runtime_init(rt.get(), &s);
    return rt;
}

void llama_dhsa_adopt(llama_context * ctx, llama_dhsa_runtime_ptr rt) {
    if (ctx == nullptr || !rt) {
        return;
    }
    dhsa_runtime * raw = rt.get();
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        g_owned[ctx] = std::move(rt);
    }
    llama_dhsa_set_cparams(ctx, raw);
}

void llama_dhsa_forget(const llama_context * ctx) {
    llama_dhsa_runtime_ptr gone;  // released after the lock
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_owned.find(ctx);
    if (it != g_owned.end()) {
        gone = std::move(it->second);
        g_owned.erase(it);
    }
}

void llama_dhsa_before_decode(llama_context * ctx, const llama_batch & batch) {
    dhsa_runtime * rt = nullptr;
    {
        std::lock_guard<std::mutex> lock(g_mutex);
        auto it = g_owned.find(ctx);
        if (it == g_owned.end()) {
            return;
        }
        rt = it->second.get();
    }
    const bool sparse_decode = rt->sparse_decode != 0;
    rt->n_tail_ends          = 0;
    if (batch.n_tokens <= 0) {
        return;
    }
    // Per sequence: its tokens in the call, and its last one.
    struct seq_tokens {
        int32_t count = 0, last = -1;
    };
    std::unordered_map<llama_seq_id, seq_tokens> per_seq;
    for (int32_t i = 0; i < batch.n_tokens; i++) {
        const int32_t n_ids = batch.n_seq_id ? batch.n_seq_id[i] : 1;
        for (int32_t j = 0; j < n_ids; j++) {
            seq_tokens & t = per_seq[batch.seq_id ? batch.seq_id[i][j] : 0];
            t.count++;
            t.last = i;
        }
    }
    // A decode step: no sequence has more than one token in the call.
    bool decode_step = true;
    for (const auto & [seq, t] : per_seq) {
        decode_step = decode_step && t.count <= 1;
    }
    if (decode_step) {
        rt->upstream_graphs = sparse_decode ? 0 : 1;
        rt->dense_from      = sparse_decode ? INT32_MAX : 0;  // 0: a reused DHSA graph attends to everything
        return;
    }
    rt->upstream_graphs = 0;
    // The dense tail: the last dense_tail tokens of a prompt attend to everything, where the sequence's
    // last token in the call asks for logits (the end of a prompt, as far as llama.h tells; no logits
    // array: the call's last token). With one sequence, as the positions from dense_from, which every
    // backend's selection reads; with several, each prompt's end goes to tail_ends, where the op finds
    // the sequence whose last row it is (one dense_from would make the longer prompts' tails too long).
    rt->dense_from = INT32_MAX;
    for (const auto & [seq, t] : per_seq) {
        if (batch.logits ? batch.logits[t.last] == 0 : t.last != batch.n_tokens - 1) {
            continue;
        }
        // Without positions in the batch they continue the sequence in the memory.
        const llama_pos end = batch.pos ? batch.pos[t.last] : llama_memory_seq_pos_max(llama_get_memory(ctx), seq) + t.count;
        if (per_seq.size() == 1) {
            rt->dense_from = (int32_t) std::max<int64_t>(0, (int64_t) end + 1 - rt->dense_tail);
        } else if (rt->n_tail_ends < DHSA_MAX_TAIL_ENDS) {
            rt->tail_ends[rt->n_tail_ends++] = end;
        }
    }
}
