// libpydhsa: a small C API over libllama for the Python package (see pydhsa.h for the contract).
//
// Everything a user can get wrong is checked here, before it reaches llama.cpp, so that bad input
// becomes an error code and a message instead of an abort. llama.cpp's own log is captured: its last
// error line is appended to our message when the engine refuses something (e.g. an unknown
// architecture), and the log reaches stderr only in verbose mode.

#include "pydhsa.h"
#include "pydhsa-hparams-check.h"
#include "pydhsa-settings.h"

#include "ggml-cpu-dhsa.h"
#include "dhsa-select.h"
#include "ggml-dhsa.h"
#include "llama-dhsa.h"
#include "llama.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#if defined(_WIN32)
#else
#    include <sys/resource.h>
#endif

#define PYDHSA_VERSION_STRING "0.1.0"

namespace {

// Limits that reject absurd values with a clear message instead of a failed giant allocation.
constexpr int32_t kMaxThreads = 1024;
constexpr int32_t kMaxBatch   = 1 << 20;

std::mutex g_log_mutex;
bool g_verbose = false;
std::string g_last_log_error;  // the first engine error line since the last clear: the root cause
std::string g_log_line;        // the message being assembled: ggml sends lines in fragments (CONT)
enum ggml_log_level g_log_level = GGML_LOG_LEVEL_NONE;

void log_callback(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    if (g_verbose) {
        fputs(text, stderr);
    }
    if (level != GGML_LOG_LEVEL_CONT) {
        g_log_level = level;
        g_log_line.clear();
    }
    g_log_line += text;
    if (g_log_level == GGML_LOG_LEVEL_ERROR && g_last_log_error.empty() && !g_log_line.empty() &&
        g_log_line.back() == '\n') {
        // Later lines only repeat that loading failed; the first one says why.
        g_last_log_error = g_log_line;
        while (!g_last_log_error.empty() && isspace((unsigned char) g_last_log_error.back())) {
            g_last_log_error.pop_back();
        }
    }
}

void ensure_backend() {
    static std::once_flag once;
    std::call_once(once, [] {
        llama_log_set(log_callback, nullptr);
        llama_backend_init();
    });
}

std::string take_last_log_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string s;
    s.swap(g_last_log_error);
    // "llama_model_load: error loading model: <reason>" -> "<reason>"
    const std::string marker = "error loading model: ";
    const size_t at = s.rfind(marker);
    return at == std::string::npos ? s : s.substr(at + marker.size());
}

void clear_last_log_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_log_error.clear();
}

int32_t set_error(pydhsa_error * err, int32_t code, const char * fmt, ...) {
    if (err) {
        err->code = code;
        va_list args;
        va_start(args, fmt);
        vsnprintf(err->message, sizeof(err->message), fmt, args);
        va_end(args);
    }
    return code;
}

int32_t ok(pydhsa_error * err) {
    if (err) {
        err->code       = PYDHSA_OK;
        err->message[0] = '\0';
    }
    return PYDHSA_OK;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

uint64_t peak_rss_bytes() {
#if defined(_WIN32)
    return 0;
#else
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
#    if defined(__APPLE__)
    return (uint64_t) usage.ru_maxrss;  // bytes on macOS
#    else
    return (uint64_t) usage.ru_maxrss * 1024;  // kilobytes on Linux
#    endif
#endif
}

// Checks that catch the common mistakes with a precise message before llama.cpp sees the file.
int32_t check_gguf_file(const char * path, pydhsa_error * err) {
    struct stat st {};
    if (stat(path, &st) != 0) {
        return set_error(err, PYDHSA_ERR_FILE, "model file not found: %s", path);
    }
    if (!S_ISREG(st.st_mode)) {
        return set_error(err, PYDHSA_ERR_FILE, "model path is not a regular file: %s", path);
    }
    FILE * f = fopen(path, "rb");
    if (!f) {
        return set_error(err, PYDHSA_ERR_FILE, "cannot open model file %s: %s", path, strerror(errno));
    }
    char magic[4] = { 0 };
    const size_t n = fread(magic, 1, sizeof(magic), f);
    fclose(f);
    if (n != sizeof(magic) || memcmp(magic, "GGUF", 4) != 0) {
        return set_error(err, PYDHSA_ERR_FILE, "not a GGUF file (bad magic): %s", path);
    }
    return PYDHSA_OK;
}

}  // namespace

struct pydhsa_model {
    llama_model * model = nullptr;
    double t_load_ms    = 0.0;
    bool metadata_only  = false;  // pydhsa_model_load_metadata: no weights, no sessions
};

struct pydhsa_session {
    pydhsa_model * model   = nullptr;
    dhsa_runtime * dhsa    = nullptr;  // owned; attached to ctx when DHSA is enabled
    bool sparse_decode     = false;    // pydhsa_dhsa_params.sparse_decode
    llama_context * ctx    = nullptr;
    int32_t n_ctx          = 0;
    int32_t n_batch        = 0;
    int32_t n_past         = 0;
    double t_prefill_ms    = 0.0;
    int32_t n_prefill      = 0;
    double t_generate_ms   = 0.0;
    int32_t n_generate     = 0;
    std::vector<llama_token> tokens;  // the context's tokens, for the repetition penalty's look-back
    std::atomic<bool> cancel{ false };  // pydhsa_session_cancel; read by llama.cpp's abort callback
};

// llama.cpp's abort callback: checked between graph nodes, so a cancel request stops a long ubatch quickly.
static bool session_cancelled(void * data) {
    return static_cast<pydhsa_session *>(data)->cancel.load(std::memory_order_relaxed);
}

void pydhsa_session_cancel(pydhsa_session * session) {
    if (session) {
        session->cancel.store(true);
    }
}

// Consumes a cancel request: PYDHSA_ERR_CANCELLED when there was one.
static int32_t take_cancel(pydhsa_session * s, pydhsa_error * err) {
    if (s->cancel.exchange(false)) {
        return set_error(err, PYDHSA_ERR_CANCELLED, "cancelled");
    }
    return PYDHSA_OK;
}

// The cache types llama.cpp's tools accept for -ctk/-ctv (common/arg.cpp's kv_cache_types).
constexpr ggml_type kCacheTypes[] = { GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
                                      GGML_TYPE_Q4_1, GGML_TYPE_IQ4_NL, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1 };

bool is_cache_type(int32_t type) {
    return std::any_of(std::begin(kCacheTypes), std::end(kCacheTypes), [type](ggml_type t) { return (int32_t) t == type; });
}

// The model's K or V head size ("key_length" / "value_length"): a hyperparameter of its own in Gemma
// (256 for a 640-wide 270M), else n_embd / n_head (0 without heads).
int32_t head_size(const llama_model * model, const char * which_length) {
    char arch[64] = { 0 };
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch));
    const std::string key = std::string(arch) + ".attention." + which_length;
    char buf[32];
    return llama_model_meta_val_str(model, key.c_str(), buf, sizeof(buf)) > 0
               ? atoi(buf)
               : llama_model_n_head(model) > 0 ? llama_model_n_embd(model) / llama_model_n_head(model) : 0;
}

// A cache type the model can store: its rows hold whole quantisation blocks, and a quantised V cache is
// read by flash attention only (llama.cpp refuses it otherwise, with a less direct message).
int32_t check_cache_types(const llama_model * model, const pydhsa_session_params & p, pydhsa_error * err) {
    for (const auto & [which, type] : { std::pair<const char *, int32_t>{ "K", p.type_k }, { "V", p.type_v } }) {
        if (!is_cache_type(type)) {
            return set_error(err, PYDHSA_ERR_ARGUMENT, "%s cache type %d is not one of %s", which, type,
                             pydhsa_cache_type_names());
        }
        const int32_t head  = head_size(model, which[0] == 'K' ? "key_length" : "value_length");
        const int64_t block = ggml_blck_size((ggml_type) type);
        if (head % block != 0) {
            return set_error(err, PYDHSA_ERR_ARGUMENT,
                             "%s cache type %s stores blocks of %lld values, but this model's head size is %d", which,
                             ggml_type_name((ggml_type) type), (long long) block, head);
        }
    }
    if (ggml_is_quantized((ggml_type) p.type_v) && p.flash_attn == 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "a quantised V cache (%s) needs flash attention (-fa on or auto)",
                         ggml_type_name((ggml_type) p.type_v));
    }
    return PYDHSA_OK;
}

extern "C" {

const char * pydhsa_version(void) {
    return PYDHSA_VERSION_STRING;
}

const char * pydhsa_system_info(void) {
    ensure_backend();
    return llama_print_system_info();
}

void pydhsa_set_verbose(bool verbose) {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_verbose = verbose;
}

static int32_t load_model(const char * path, int32_t n_gpu_layers, bool metadata_only, pydhsa_model ** out,
                          pydhsa_error * err) {
    if (!path || !out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "model path and output pointer must not be NULL");
    }
    *out = nullptr;
    if (n_gpu_layers < -1 || n_gpu_layers > 100000) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "n_gpu_layers must be -1 (all) or between 0 and 100000, got %d",
                         n_gpu_layers);
    }
    if (int32_t rc = check_gguf_file(path, err)) {
        return rc;
    }
    ensure_backend();
    clear_last_log_error();
    const std::string bad_hparams = pydhsa_hparams_problem(path);
    if (!bad_hparams.empty()) {
        return set_error(err, PYDHSA_ERR_MODEL, "cannot load %s: %s", path, bad_hparams.c_str());
    }

    llama_model_params params = llama_model_default_params();
    params.n_gpu_layers       = n_gpu_layers;
    params.no_alloc           = metadata_only;
    if (metadata_only) {
        params.load_mode = LLAMA_LOAD_MODE_NONE;  // no_alloc maps nothing (llama.cpp asserts it)
        params.lazy_mode = LLAMA_LAZY_MODE_OFF;
    }

    const double t0 = now_ms();
    llama_model * model = nullptr;
    try {
        model = llama_model_load_from_file(path, params);
    } catch (const std::exception & e) {
        return set_error(err, PYDHSA_ERR_MODEL, "failed to load %s: %s", path, e.what());
    }
    if (!model) {
        const std::string why = take_last_log_error();
        return set_error(err, PYDHSA_ERR_MODEL, "failed to load %s%s%s", path, why.empty() ? "" : ": ", why.c_str());
    }
    auto * m     = new pydhsa_model;
    m->model     = model;
    m->t_load_ms = now_ms() - t0;
    m->metadata_only = metadata_only;
    *out         = m;
    return ok(err);
}

int32_t pydhsa_model_load(const char * path, int32_t n_gpu_layers, pydhsa_model ** out, pydhsa_error * err) {
    return load_model(path, n_gpu_layers, false, out, err);
}

int32_t pydhsa_model_load_metadata(const char * path, pydhsa_model ** out, pydhsa_error * err) {
    return load_model(path, 0, true, out, err);
}

int32_t pydhsa_cache_type_from_name(const char * name) {
    for (ggml_type t : kCacheTypes) {
        if (name && strcmp(name, ggml_type_name(t)) == 0) {
            return (int32_t) t;
        }
    }
    return -1;
}

const char * pydhsa_cache_type_names(void) {
    static const std::string names = [] {
        std::string s;
        for (ggml_type t : kCacheTypes) {
            s += (s.empty() ? "" : ", ") + std::string(ggml_type_name(t));
        }
        return s;
    }();
    return names.c_str();
}

int32_t pydhsa_chat_apply(const pydhsa_model * model, const char * const * roles, const char * const * contents,
                          int32_t n_messages, bool add_assistant, char * buf, int32_t buf_size, int32_t * n_out,
                          pydhsa_error * err) {
    if (!model || n_messages < 0 || (n_messages > 0 && (!roles || !contents)) || buf_size < 0 || (buf_size > 0 && !buf) ||
        !n_out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_chat_apply");
    }
    const char * tmpl = llama_model_chat_template(model->model, nullptr);
    if (!tmpl) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "the model file has no chat template (tokenizer.chat_template)");
    }
    std::vector<llama_chat_message> chat((size_t) n_messages);
    for (int32_t i = 0; i < n_messages; i++) {
        if (!roles[i] || !contents[i]) {
            return set_error(err, PYDHSA_ERR_ARGUMENT, "chat message %d has no role or content", i);
        }
        chat[i] = { roles[i], contents[i] };
    }
    const int32_t n = llama_chat_apply_template(tmpl, chat.data(), chat.size(), add_assistant, buf, buf_size);
    if (n < 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT,
                         "llama.cpp does not know this model's chat template (it applies only its built-in ones)");
    }
    *n_out = n;
    if (n > buf_size) {
        return set_error(err, PYDHSA_ERR_BUFFER, "chat text needs %d bytes", n);
    }
    return ok(err);
}

int32_t pydhsa_model_dhsa_plan(const pydhsa_model * model, bool all_layers, int32_t type_k, int32_t type_v,
                               int32_t * routes, int32_t n_layer) {
    if (!model) {
        return 0;
    }
    const int32_t n_model = llama_model_n_layer(model->model);
    for (int32_t il = 0; routes && il < n_layer && il < n_model; il++) {
        routes[il] = llama_dhsa_layer_route(model->model, il, all_layers, type_k, type_v);
    }
    return n_model;
}

const char * pydhsa_dhsa_route_name(int32_t route) {
    return llama_dhsa_route_name(route);
}

void pydhsa_model_free(pydhsa_model * model) {
    if (!model) {
        return;
    }
    llama_model_free(model->model);
    delete model;
}

int32_t pydhsa_model_get_info(const pydhsa_model * model, pydhsa_model_info * out, pydhsa_error * err) {
    if (!model || !out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "model and output must not be NULL");
    }
    const llama_model * m = model->model;
    *out                  = pydhsa_model_info{};
    llama_model_meta_val_str(m, "general.architecture", out->architecture, sizeof(out->architecture));
    llama_model_desc(m, out->description, sizeof(out->description));
    out->n_layer     = llama_model_n_layer(m);
    out->n_head      = llama_model_n_head(m);
    out->n_head_kv   = llama_model_n_head_kv(m);
    out->n_embd      = llama_model_n_embd(m);
    out->head_dim    = head_size(m, "key_length");
    out->n_ctx_train = llama_model_n_ctx_train(m);
    out->n_swa       = llama_model_n_swa(m);
    const llama_vocab * vocab = llama_model_get_vocab(m);
    out->n_vocab     = llama_vocab_n_tokens(vocab);
    out->n_params    = llama_model_n_params(m);
    out->size_bytes  = llama_model_size(m);
    out->add_bos     = llama_vocab_get_add_bos(vocab);
    return ok(err);
}

int32_t pydhsa_model_meta(const pydhsa_model * model, const char * key, char * buf, int32_t buf_size, pydhsa_error * err) {
    if (!model || !key || !buf || buf_size <= 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "model, key and a non-empty buffer are required");
    }
    const int32_t n = llama_model_meta_val_str(model->model, key, buf, (size_t) buf_size);
    if (n < 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "no metadata key %s", key);
    }
    if (n >= buf_size) {
        return set_error(err, PYDHSA_ERR_BUFFER, "metadata value of %s needs %d bytes", key, n + 1);
    }
    return ok(err);
}

int32_t pydhsa_tokenize(const pydhsa_model * model, const char * text, int32_t text_len, bool add_special,
                        int32_t * tokens, int32_t n_max, int32_t * n_out, pydhsa_error * err) {
    if (!model || !text || text_len < 0 || n_max < 0 || (n_max > 0 && !tokens) || !n_out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_tokenize");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model->model);
    // parse_special: control tokens written in the text are recognised, as llama-completion does.
    const int32_t n = llama_tokenize(vocab, text, text_len, tokens, n_max, add_special, /*parse_special=*/true);
    if (n == INT32_MIN) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "text too long to tokenize");
    }
    if (n < 0) {
        *n_out = -n;
        return set_error(err, PYDHSA_ERR_BUFFER, "token buffer too small: %d tokens needed", -n);
    }
    *n_out = n;
    return ok(err);
}

int32_t pydhsa_detokenize(const pydhsa_model * model, const int32_t * tokens, int32_t n_tokens, char * buf,
                          int32_t buf_size, int32_t * n_out, pydhsa_error * err) {
    if (!model || (n_tokens > 0 && !tokens) || n_tokens < 0 || !buf || buf_size < 0 || !n_out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_detokenize");
    }
    const llama_vocab * vocab = llama_model_get_vocab(model->model);
    const int32_t n_vocab     = llama_vocab_n_tokens(vocab);
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return set_error(err, PYDHSA_ERR_ARGUMENT, "token id %d out of range [0, %d)", tokens[i], n_vocab);
        }
    }
    const int32_t n = llama_detokenize(vocab, tokens, n_tokens, buf, buf_size, /*remove_special=*/false,
                                       /*unparse_special=*/false);
    if (n < 0) {
        *n_out = -n;
        return set_error(err, PYDHSA_ERR_BUFFER, "text buffer too small: %d bytes needed", -n);
    }
    *n_out = n;
    return ok(err);
}

void pydhsa_session_default_params(pydhsa_session_params * params) {
    if (!params) {
        return;
    }
    params->n_ctx     = 4096;  // llama.cpp's default context
    params->n_threads = 0;
    params->n_batch   = 2048;
    params->n_ubatch  = 512;
    params->verbose   = false;
    params->flash_attn = -1;
    params->type_k     = GGML_TYPE_F16;  // llama.cpp's default cache types
    params->type_v     = GGML_TYPE_F16;
    dhsa_settings defaults;
    dhsa_settings_default(&defaults);  // the parameter table's defaults (dhsa-params.c)
    params->dhsa = pydhsa_params_from_settings(defaults, false);
}

static int32_t check_dhsa_params(const pydhsa_dhsa_params & d, pydhsa_error * err) {
    if (d.boundary < 0 || d.boundary > 1) {  // the struct holds keysim/fixed only (the table lists more)
        return set_error(err, PYDHSA_ERR_ARGUMENT, "DHSA boundary must be 0 (keysim) or 1 (fixed), got %d", d.boundary);
    }
    const dhsa_settings s = pydhsa_settings_from_params(d);
    char why[256];
    if (dhsa_settings_check(&s, why, sizeof(why)) != 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "DHSA %s", why);
    }
    return PYDHSA_OK;
}

int32_t pydhsa_dhsa_param_count(void) {
    return DHSA_PARAM_COUNT;
}

int32_t pydhsa_engine_constant(const char * name) {
    if (name != nullptr && strcmp(name, "segment") == 0) {
        return DHSA_SEGMENT;
    }
    if (name != nullptr && strcmp(name, "keysim_window") == 0) {
        return DHSA_KEYSIM_WINDOW;
    }
    return -1;
}

int32_t pydhsa_dhsa_param_info(int32_t index, pydhsa_param_info * out) {
    if (index < 0 || index >= DHSA_PARAM_COUNT || out == nullptr) {
        return PYDHSA_ERR_ARGUMENT;
    }
    const dhsa_param_def & p = dhsa_param_table()[index];
    out->name          = p.name;
    out->kind          = p.kind;
    out->default_value = p.def;
    out->lo            = p.lo;
    out->hi            = p.hi;
    out->choices       = p.choices;
    out->n_implemented = p.n_implemented;
    out->cli_flag      = p.cli_flag;
    out->help          = p.help;
    return PYDHSA_OK;
}

int32_t pydhsa_session_create(pydhsa_model * model, const pydhsa_session_params * params, pydhsa_session ** out,
                              pydhsa_error * err) {
    if (!model || !params || !out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "model, params and output must not be NULL");
    }
    *out = nullptr;
    const int32_t n_ctx_train = llama_model_n_ctx_train(model->model);
    if (params->n_ctx < 0 || params->n_ctx > n_ctx_train) {
        return set_error(err, PYDHSA_ERR_ARGUMENT,
                         "context size must be between 1 and the model's training context %d (0 = that), got %d",
                         n_ctx_train, params->n_ctx);
    }
    if (params->n_threads > kMaxThreads) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "threads must be at most %d, got %d", kMaxThreads, params->n_threads);
    }
    if (params->n_batch < 1 || params->n_batch > kMaxBatch) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "batch size must be between 1 and %d, got %d", kMaxBatch,
                         params->n_batch);
    }
    if (params->n_ubatch < 1 || params->n_ubatch > kMaxBatch) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "ubatch size must be between 1 and %d, got %d", kMaxBatch,
                         params->n_ubatch);
    }
    if (params->flash_attn < -1 || params->flash_attn > 1) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "flash_attn must be -1 (auto), 0 (off) or 1 (on), got %d",
                         params->flash_attn);
    }
    if (params->dhsa.enabled && params->flash_attn == 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "DHSA replaces flash attention and cannot run with it turned off");
    }
    if (model->metadata_only) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "the model was loaded without its weights (metadata only)");
    }
    if (int32_t rc = check_cache_types(model->model, *params, err)) {
        return rc;
    }
    if (params->dhsa.enabled) {
        if (int32_t rc = check_dhsa_params(params->dhsa, err)) {
            return rc;
        }
    }
    pydhsa_set_verbose(params->verbose);
    clear_last_log_error();

    const int32_t n_threads = params->n_threads > 0 ? params->n_threads
                                                    : (int32_t) std::max(1u, std::thread::hardware_concurrency());
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx                = params->n_ctx > 0 ? params->n_ctx : n_ctx_train;
    cparams.n_batch              = params->n_batch;
    cparams.n_ubatch             = std::min(params->n_ubatch, params->n_batch);  // as llama.cpp clamps it
    cparams.n_threads            = n_threads;
    cparams.n_threads_batch      = n_threads;
    cparams.no_perf              = false;
    cparams.type_k               = (ggml_type) params->type_k;
    cparams.type_v               = (ggml_type) params->type_v;
    cparams.flash_attn_type = params->flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                              : params->flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                                        : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (params->dhsa.enabled) {
        cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;  // the DHSA op replaces flash attention
    }

    llama_context * ctx = nullptr;
    try {
        llama_dhsa_use_model_keys(false);  // these params say all about DHSA (see below)
        ctx = llama_init_from_model(model->model, cparams);
        llama_dhsa_use_model_keys(true);
    } catch (const std::exception & e) {
        llama_dhsa_use_model_keys(true);
        return set_error(err, PYDHSA_ERR_CONTEXT, "failed to create the context: %s", e.what());
    }
    if (!ctx) {
        const std::string why = take_last_log_error();
        return set_error(err, PYDHSA_ERR_CONTEXT, "failed to create the context%s%s", why.empty() ? "" : ": ",
                         why.c_str());
    }
    auto * s    = new pydhsa_session;
    s->model    = model;
    s->ctx      = ctx;
    s->n_ctx    = (int32_t) llama_n_ctx(ctx);
    s->n_batch  = (int32_t) llama_n_batch(ctx);
    if (params->dhsa.enabled) {
        const dhsa_settings settings = pydhsa_settings_from_params(params->dhsa);
        s->dhsa = new dhsa_runtime;
        llama_dhsa_runtime_init(s->dhsa, &settings);
        s->sparse_decode = params->dhsa.sparse_decode;
    }
    // Always: explicit settings (or none, for a dense session) replace what libllama made from the model's
    // keys or PYDHSA_DHSA.
    llama_dhsa_attach(ctx, s->dhsa);
    llama_set_abort_callback(ctx, session_cancelled, s);
    *out        = s;
    return ok(err);
}

void pydhsa_session_free(pydhsa_session * session) {
    if (!session) {
        return;
    }
    llama_free(session->ctx);
    if (session->dhsa) {
        ggml_dhsa_runtime_release_cache(session->dhsa);
    }
    delete session->dhsa;
    delete session;
}

int32_t pydhsa_session_reset(pydhsa_session * session, pydhsa_error * err) {
    if (!session) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "session must not be NULL");
    }
    llama_memory_clear(llama_get_memory(session->ctx), /*data=*/true);
    session->n_past = 0;
    session->tokens.clear();
    session->cancel.store(false);  // a request that came after the call it meant to stop had ended
    if (session->dhsa) {
        ggml_dhsa_runtime_release_cache(session->dhsa);  // memory only: stale entries would not match anyway
    }
    return ok(err);
}

int32_t pydhsa_session_n_ctx(const pydhsa_session * session) {
    return session ? session->n_ctx : 0;
}

// Decodes `batch` (which holds tokens[0..n)) and appends the tokens to the session's context. The one place
// llama_decode's failures (a cancel request included) become our errors.
static int32_t decode_batch(pydhsa_session * s, const llama_batch & batch, const int32_t * tokens, int32_t n,
                            pydhsa_error * err) {
    int32_t rc = 0;
    try {
        rc = llama_decode(s->ctx, batch);
    } catch (const std::exception & e) {
        return set_error(err, PYDHSA_ERR_DECODE, "decode failed: %s", e.what());
    }
    if (rc == 2 && s->cancel.load()) {  // 2: the abort callback stopped the compute
        return take_cancel(s, err);
    }
    if (rc != 0) {
        const std::string why = take_last_log_error();
        return set_error(err, PYDHSA_ERR_DECODE, "decode failed (llama_decode returned %d)%s%s", rc,
                         why.empty() ? "" : ": ", why.c_str());
    }
    s->n_past += n;
    s->tokens.insert(s->tokens.end(), tokens, tokens + n);
    return PYDHSA_OK;
}

// Tokens after the context, logits of the last one only.
static int32_t decode_tokens(pydhsa_session * s, const int32_t * tokens, int32_t n, pydhsa_error * err) {
    return decode_batch(s, llama_batch_get_one(const_cast<llama_token *>(tokens), n), tokens, n, err);
}

static int32_t check_tokens(const pydhsa_session * session, const int32_t * tokens, int32_t n_tokens,
                            pydhsa_error * err) {
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(session->model->model));
    for (int32_t i = 0; i < n_tokens; i++) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            return set_error(err, PYDHSA_ERR_ARGUMENT, "token id %d at position %d out of range [0, %d)", tokens[i],
                             i, n_vocab);
        }
    }
    return PYDHSA_OK;
}

int32_t pydhsa_eval_logits(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens, float * logits,
                           int64_t logits_size, pydhsa_error * err) {
    if (!session || !tokens || !logits || n_tokens <= 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_eval_logits");
    }
    if (n_tokens > session->n_batch) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "%d tokens in one call, more than the batch size %d", n_tokens,
                         session->n_batch);
    }
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(session->model->model));
    if (logits_size != (int64_t) n_tokens * n_vocab) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "logits buffer has %lld floats, %d tokens need %lld",
                         (long long) logits_size, n_tokens, (long long) n_tokens * n_vocab);
    }
    if ((int64_t) session->n_past + n_tokens > session->n_ctx) {
        return set_error(err, PYDHSA_ERR_TOO_LONG, "%d more tokens do not fit: the context holds %d (%d used)",
                         n_tokens, session->n_ctx, session->n_past);
    }
    if (int32_t rc = check_tokens(session, tokens, n_tokens, err)) {
        return rc;
    }
    if (int32_t rc = take_cancel(session, err)) {
        return rc;
    }
    if (session->dhsa) {  // every position is scored: no dense tail, DHSA graphs
        session->dhsa->dense_from      = INT32_MAX;
        session->dhsa->upstream_graphs = 0;
    }
    llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int32_t i = 0; i < n_tokens; i++) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = session->n_past + i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = 1;
    }
    batch.n_tokens   = n_tokens;
    const double t0  = now_ms();
    const int32_t rc = decode_batch(session, batch, tokens, n_tokens, err);
    llama_batch_free(batch);
    if (rc != PYDHSA_OK) {
        return rc;
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        const float * row = llama_get_logits_ith(session->ctx, i);
        if (!row) {
            return set_error(err, PYDHSA_ERR_INTERNAL, "position %d has no logits", i);
        }
        memcpy(logits + (size_t) i * n_vocab, row, sizeof(float) * (size_t) n_vocab);
    }
    session->t_prefill_ms += now_ms() - t0;
    session->n_prefill += n_tokens;
    return ok(err);
}

int32_t pydhsa_prefill(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens, pydhsa_error * err) {
    return pydhsa_prefill_progress(session, tokens, n_tokens, nullptr, nullptr, err);
}

int32_t pydhsa_prefill_progress(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens,
                                pydhsa_progress_callback progress, void * user_data, pydhsa_error * err) {
    if (!session || n_tokens < 0 || (n_tokens > 0 && !tokens)) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_prefill");
    }
    if (n_tokens == 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "nothing to prefill: the prompt has no tokens");
    }
    if ((int64_t) session->n_past + n_tokens > session->n_ctx) {
        return set_error(err, PYDHSA_ERR_TOO_LONG,
                         "the prompt is %d tokens but the context holds %d (%d already used); raise the context "
                         "size (-c)",
                         n_tokens, session->n_ctx, session->n_past);
    }
    if (int32_t rc = check_tokens(session, tokens, n_tokens, err)) {
        return rc;
    }
    if (session->dhsa) {
        // The prompt's last dense_tail tokens attend to everything (where the question usually is).
        session->dhsa->dense_from = session->n_past + n_tokens - session->dhsa->dense_tail;
        session->dhsa->upstream_graphs = 0;
    }
    if (int32_t rc = take_cancel(session, err)) {
        return rc;
    }
    const double t0 = now_ms();
    for (int32_t i = 0; i < n_tokens; i += session->n_batch) {
        const int32_t n = std::min(session->n_batch, n_tokens - i);
        if (int32_t rc = decode_tokens(session, tokens + i, n, err)) {
            return rc;
        }
        if (progress != nullptr && progress(user_data, i + n, n_tokens) != 0) {
            return set_error(err, PYDHSA_ERR_CANCELLED, "prefill stopped by the progress callback");
        }
    }
    session->t_prefill_ms += now_ms() - t0;
    session->n_prefill += n_tokens;
    return ok(err);
}

void pydhsa_sampling_default_params(pydhsa_sampling_params * params) {
    if (!params) {
        return;
    }
    // llama.cpp's defaults (common/common.h: common_params_sampling)
    params->temperature    = 0.8f;
    params->seed           = 0;
    params->top_k          = 40;
    params->top_p          = 0.95f;
    params->min_p          = 0.05f;
    params->repeat_penalty = 1.0f;
    params->repeat_last_n  = 64;
}

static int32_t check_sampling(const pydhsa_sampling_params & p, pydhsa_error * err) {
    if (!(p.temperature == p.temperature) || p.temperature > 100.0f) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "temperature must be a number between 0 and 100");
    }
    if (!(p.top_p >= 0.0f && p.top_p <= 1.0f) || !(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "top-p and min-p must be between 0 and 1, got %g and %g", p.top_p,
                         p.min_p);
    }
    if (!(p.repeat_penalty > 0.0f && p.repeat_penalty <= 100.0f)) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "repeat penalty must be in (0, 100], got %g", p.repeat_penalty);
    }
    if (p.repeat_last_n < -1 || p.top_k > (1 << 24)) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "repeat-last-n must be -1 (context) or >= 0, got %d", p.repeat_last_n);
    }
    return PYDHSA_OK;
}

// llama.cpp's sampler order (penalties first, then the truncations, temperature and the draw), primed
// with the context's last tokens so that the penalty sees the prompt as llama.cpp's tools do.
static llama_sampler * make_sampler(const pydhsa_session & s, const pydhsa_sampling_params & p) {
    llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    const int32_t last_n  = p.repeat_last_n < 0 ? s.n_ctx : p.repeat_last_n;
    if (p.repeat_penalty != 1.0f && last_n > 0) {
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(s.model->model));
        llama_sampler * penalties = llama_sampler_init_penalties(n_vocab, last_n, p.repeat_penalty, 0.0f, 0.0f);
        const size_t n = std::min(s.tokens.size(), (size_t) last_n);
        for (size_t i = s.tokens.size() - n; i < s.tokens.size(); i++) {
            llama_sampler_accept(penalties, s.tokens[i]);
        }
        llama_sampler_chain_add(chain, penalties);
    }
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
        return chain;
    }
    if (p.top_k > 0) {
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(p.top_k));
    }
    llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
    llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
    llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    return chain;
}

int32_t pydhsa_generate(pydhsa_session * session, int32_t max_tokens, float temperature, uint32_t seed,
                        pydhsa_token_callback callback, void * user_data, int32_t * n_generated, pydhsa_error * err) {
    pydhsa_sampling_params p;
    pydhsa_sampling_default_params(&p);
    p.temperature = temperature;
    p.seed        = seed;
    return pydhsa_generate_sampled(session, max_tokens, &p, callback, user_data, n_generated, err);
}

int32_t pydhsa_generate_sampled(pydhsa_session * session, int32_t max_tokens, const pydhsa_sampling_params * sampling,
                                pydhsa_token_callback callback, void * user_data, int32_t * n_generated,
                                pydhsa_error * err) {
    if (!session || max_tokens < 0 || !n_generated || !sampling) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "invalid arguments to pydhsa_generate");
    }
    *n_generated = 0;
    if (session->n_past == 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "generate needs a prompt: prefill at least one token first");
    }
    if (int32_t rc = check_sampling(*sampling, err)) {
        return rc;
    }
    if (int32_t rc = take_cancel(session, err)) {
        return rc;
    }
    const llama_vocab * vocab = llama_model_get_vocab(session->model->model);
    llama_sampler * sampler   = make_sampler(*session, *sampling);
    if (session->dhsa) {
        // Dense decode: new graphs keep upstream flash attention; a DHSA graph that llama.cpp reuses from a
        // one-token prefill still attends to everything through dense_from.
        const bool dense             = !session->sparse_decode;
        session->dhsa->dense_from      = dense ? 0 : INT32_MAX;  // 0: every position
        session->dhsa->upstream_graphs = dense ? 1 : 0;
    }
    std::vector<char> piece(256);
    int32_t status  = PYDHSA_OK;
    const double t0 = now_ms();
    for (int32_t i = 0; i < max_tokens && session->n_past < session->n_ctx; i++) {
        llama_token token = llama_sampler_sample(sampler, session->ctx, -1);
        if (llama_vocab_is_eog(vocab, token)) {
            break;
        }
        int32_t n = llama_token_to_piece(vocab, token, piece.data(), (int32_t) piece.size(), 0, /*special=*/false);
        if (n < 0) {
            piece.resize((size_t) -n);
            n = llama_token_to_piece(vocab, token, piece.data(), (int32_t) piece.size(), 0, false);
        }
        ++*n_generated;
        session->n_generate++;
        const bool stop = callback && callback(user_data, token, piece.data(), std::max(n, 0)) != 0;
        if (stop) {
            break;
        }
        if ((status = decode_tokens(session, &token, 1, err)) != PYDHSA_OK) {
            break;
        }
    }
    session->t_generate_ms += now_ms() - t0;
    llama_sampler_free(sampler);
    return status == PYDHSA_OK ? ok(err) : status;
}

int32_t pydhsa_last_logits(pydhsa_session * session, float * out, int32_t n_vocab, pydhsa_error * err) {
    if (!session || !out) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "session and output must not be NULL");
    }
    const int32_t expected = llama_vocab_n_tokens(llama_model_get_vocab(session->model->model));
    if (n_vocab != expected) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "logits buffer has %d entries, the vocabulary %d", n_vocab, expected);
    }
    if (session->n_past == 0) {
        return set_error(err, PYDHSA_ERR_ARGUMENT, "no logits yet: nothing has been evaluated");
    }
    const float * logits = llama_get_logits_ith(session->ctx, -1);
    if (!logits) {
        return set_error(err, PYDHSA_ERR_INTERNAL, "the last position has no logits");
    }
    memcpy(out, logits, sizeof(float) * (size_t) n_vocab);
    return ok(err);
}

void pydhsa_session_timings(const pydhsa_session * session, pydhsa_timings * out) {
    if (!session || !out) {
        return;
    }
    out->t_load_ms      = session->model->t_load_ms;
    out->t_prefill_ms   = session->t_prefill_ms;
    out->n_prefill      = session->n_prefill;
    out->t_generate_ms  = session->t_generate_ms;
    out->n_generate     = session->n_generate;
    out->n_past         = session->n_past;
    out->peak_rss_bytes = peak_rss_bytes();
}

int32_t pydhsa_session_dhsa_stats(const pydhsa_session * session, int64_t * computed, int64_t * causal,
                                  int32_t n_layer) {
    if (!session) {
        return 0;
    }
    const int32_t n_model = llama_model_n_layer(session->model->model);
    for (int32_t il = 0; il < n_layer && il < DHSA_MAX_LAYERS; il++) {
        const bool have = session->dhsa != nullptr && il < n_model;
        computed[il]    = have ? __atomic_load_n(&session->dhsa->pairs_computed[il], __ATOMIC_RELAXED) : 0;
        causal[il]      = have ? __atomic_load_n(&session->dhsa->pairs_causal[il], __ATOMIC_RELAXED) : 0;
    }
    return n_model;
}

int32_t pydhsa_session_dhsa_routes(const pydhsa_session * session, int32_t * routes, int32_t n_layer) {
    if (!session) {
        return 0;
    }
    const int32_t n_model = llama_model_n_layer(session->model->model);
    for (int32_t il = 0; routes && il < n_layer && il < DHSA_MAX_LAYERS; il++) {
        routes[il] = session->dhsa != nullptr && il < n_model ? session->dhsa->layer_route[il] : 0;
    }
    return n_model;
}

}  // extern "C"
