/*
 * libpydhsa: the small, stable C API that the Python package binds (through cffi) instead of llama.h.
 *
 * Conventions
 *  - Every function that can fail returns a pydhsa_status (0 = ok) and fills the caller's pydhsa_error
 *    with a one-line message; none aborts on bad input.
 *  - Objects are created by *_create/*_load and released by the matching *_free; a NULL is ignored.
 *  - The cffi binding reads the declarations between the "cffi:begin" and "cffi:end" markers, so that
 *    part must stay plain C: no preprocessor lines, and PYDHSA_API (which the binding strips) before
 *    each function.
 */
#ifndef PYDHSA_H
#define PYDHSA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#    define PYDHSA_API __declspec(dllexport)
#else
#    define PYDHSA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* cffi:begin */
typedef enum {
    PYDHSA_OK              = 0,
    PYDHSA_ERR_ARGUMENT    = 1, /* a parameter is out of range or NULL */
    PYDHSA_ERR_FILE        = 2, /* missing, unreadable, not GGUF, truncated */
    PYDHSA_ERR_MODEL       = 3, /* the engine could not load the model (e.g. unsupported architecture) */
    PYDHSA_ERR_CONTEXT     = 4, /* the context could not be created (e.g. out of memory) */
    PYDHSA_ERR_TOO_LONG    = 5, /* the tokens do not fit in the context */
    PYDHSA_ERR_DECODE      = 6, /* llama_decode failed */
    PYDHSA_ERR_BUFFER      = 7, /* the output buffer is too small; the needed size is reported */
    PYDHSA_ERR_ABORTED     = 8, /* the token callback asked to stop (not an error for generate) */
    PYDHSA_ERR_INTERNAL    = 9,
    PYDHSA_ERR_CANCELLED   = 10 /* pydhsa_session_cancel stopped the call; reset the session before reuse */
} pydhsa_status;

typedef struct {
    int32_t code;
    char message[512];
} pydhsa_error;

typedef struct pydhsa_model pydhsa_model;
typedef struct pydhsa_session pydhsa_session;

typedef struct {
    char architecture[64];   /* general.architecture, e.g. "gemma3" */
    char description[128];   /* llama_model_desc: type, size and quantisation */
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_embd;
    int32_t head_dim;        /* n_embd_head_k */
    int32_t n_ctx_train;
    int32_t n_swa;           /* sliding-window size, 0 if none */
    int32_t n_vocab;
    uint64_t n_params;
    uint64_t size_bytes;
    bool add_bos;
} pydhsa_model_info;

/* DHSA settings of a session (docs: native/dhsa/ALGORITHM.md; ranges and defaults: pydhsa_dhsa_param_info).
 * enabled = false runs upstream's dense attention, bit for bit, whatever the model's DHSA keys or the
 * PYDHSA_DHSA variable say (settings given here always win). */
typedef struct {
    bool enabled;
    double budget;        /* 0 < budget <= 1; 1 = dense through the DHSA kernel */
    int32_t boundary;     /* 0 keysim, 1 fixed */
    int32_t chunk_min;    /* 1 <= chunk_min <= chunk_avg <= chunk_max <= 512 */
    int32_t chunk_max;
    int32_t chunk_avg;
    int32_t q_block;      /* 1..4096 */
    int32_t sink_tokens;
    int32_t local_tokens;
    int32_t dense_tail;   /* the last dense_tail tokens of each prefill attend to everything */
    int32_t min_context;  /* fewer cached keys than this: dense */
    bool all_layers;      /* false: global-attention layers only */
    bool sparse_decode;   /* false (default): generated tokens attend densely through upstream flash attention;
                           * true: they select chunks like any query (ALGORITHM.md, "Prefill and decode") */
} pydhsa_dhsa_params;

/* The DHSA parameter table, the one definition of every parameter (native/dhsa/dhsa-params.h), from
 * which the Python package derives DhsaConfig, the --dhsa-* flags and the GGUF keys <arch>.dhsa.<name>.
 * The strings are static. */
typedef struct {
    const char * name;
    int32_t kind;            /* 0 float (lo < v <= hi), 1 int (lo <= v <= hi), 2 choice (an index) */
    double default_value;    /* the default (a choice: its index) */
    double lo, hi;
    const char * choices;    /* kind 2: the names, comma-separated, in index order; else NULL */
    int32_t n_implemented;   /* kind 2: the first n choices work */
    const char * cli_flag;   /* a short CLI flag used instead of --dhsa-<name>, or NULL */
    const char * help;
} pydhsa_param_info;

PYDHSA_API int32_t pydhsa_dhsa_param_count(void);
/* The engine's fixed selection constants, for the copies Python code keeps (tests compare them):
 * "segment" (DHSA_SEGMENT, keys per frozen segment), "keysim_window" (DHSA_KEYSIM_WINDOW); -1 if unknown. */
PYDHSA_API int32_t pydhsa_engine_constant(const char * name);
PYDHSA_API int32_t pydhsa_dhsa_param_info(int32_t index, pydhsa_param_info * out);

typedef struct {
    int32_t n_ctx;      /* context length in tokens; 0 = the model's training context */
    int32_t n_threads;  /* threads for decode and batch processing; <= 0 = default */
    int32_t n_batch;    /* logical batch size */
    int32_t n_ubatch;   /* physical batch size */
    bool verbose;       /* let llama.cpp's log through to stderr */
    int32_t flash_attn; /* -1 auto (llama.cpp's default), 0 off, 1 on; DHSA needs it on or auto */
    int32_t type_k;     /* K cache type (a ggml_type id, see pydhsa_cache_type_from_name); default f16 */
    int32_t type_v;     /* V cache type; a quantised V cache needs flash attention (on or auto) */
    pydhsa_dhsa_params dhsa;
} pydhsa_session_params;

/* Sampling for pydhsa_generate_sampled, llama.cpp's samplers and defaults (pydhsa_sampling_default_params):
 * repetition penalty over the last repeat_last_n tokens of the context (prompt included), then greedy
 * (temperature <= 0) or top-k, top-p, min-p, temperature and a seeded draw. */
typedef struct {
    float temperature;     /* <= 0: greedy; default 0.8 */
    uint32_t seed;
    int32_t top_k;         /* <= 0: off; default 40 */
    float top_p;           /* 1: off; default 0.95 */
    float min_p;           /* 0: off; default 0.05 */
    float repeat_penalty;  /* 1: off (default) */
    int32_t repeat_last_n; /* tokens the penalty looks back over; 0 off, -1 the whole context; default 64 */
} pydhsa_sampling_params;

typedef struct {
    double t_load_ms;       /* model load */
    double t_prefill_ms;    /* prompt processing, summed over prefill calls */
    int32_t n_prefill;      /* prompt tokens processed */
    double t_generate_ms;   /* token generation (decode + sampling) */
    int32_t n_generate;     /* tokens generated */
    int32_t n_past;         /* tokens now in the context */
    uint64_t peak_rss_bytes; /* peak resident memory of the process so far */
} pydhsa_timings;

/* Called for each generated token with its text piece (raw bytes, possibly part of a UTF-8
 * character). Return non-zero to stop generation. */
typedef int32_t (*pydhsa_token_callback)(void * user_data, int32_t token, const char * piece, int32_t piece_len);

PYDHSA_API const char * pydhsa_version(void);
PYDHSA_API const char * pydhsa_system_info(void);
PYDHSA_API void pydhsa_set_verbose(bool verbose);

PYDHSA_API int32_t pydhsa_model_load(const char * path, int32_t n_gpu_layers, pydhsa_model ** out, pydhsa_error * err);
PYDHSA_API void pydhsa_model_free(pydhsa_model * model);
PYDHSA_API int32_t pydhsa_model_get_info(const pydhsa_model * model, pydhsa_model_info * out, pydhsa_error * err);
/* Metadata value of `key` as a string; PYDHSA_ERR_ARGUMENT if the key is absent. */
PYDHSA_API int32_t pydhsa_model_meta(const pydhsa_model * model, const char * key, char * buf, int32_t buf_size, pydhsa_error * err);

/* Tokenize `text` (text_len bytes). Writes at most n_max tokens; *n_out is the token count, and
 * PYDHSA_ERR_BUFFER is returned when it exceeds n_max. */
PYDHSA_API int32_t pydhsa_tokenize(const pydhsa_model * model, const char * text, int32_t text_len, bool add_special,
                                   int32_t * tokens, int32_t n_max, int32_t * n_out, pydhsa_error * err);
/* Text of `tokens`; *n_out is the byte length (PYDHSA_ERR_BUFFER when it exceeds buf_size). */
PYDHSA_API int32_t pydhsa_detokenize(const pydhsa_model * model, const int32_t * tokens, int32_t n_tokens,
                                     char * buf, int32_t buf_size, int32_t * n_out, pydhsa_error * err);

/* The K/V cache types a session accepts, by llama.cpp's names (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl,
 * q5_0, q5_1): the ggml_type id, or -1 for any other name. pydhsa_cache_type_names lists them,
 * comma-separated. The DHSA kernels read f32, f16, bf16 and q8_0; layers on other types run dense. */
PYDHSA_API int32_t pydhsa_cache_type_from_name(const char * name);
PYDHSA_API const char * pydhsa_cache_type_names(void);

/* Chat template: the model's own (tokenizer.chat_template) applied to n messages by
 * llama_chat_apply_template (llama.cpp's built-in template list, not a Jinja engine). add_assistant ends
 * the text with the start of an assistant turn. *n_out is the byte length; PYDHSA_ERR_BUFFER when it
 * exceeds buf_size; PYDHSA_ERR_ARGUMENT when the model has no template or llama.cpp does not know it. */
PYDHSA_API int32_t pydhsa_chat_apply(const pydhsa_model * model, const char * const * roles,
                                     const char * const * contents, int32_t n_messages, bool add_assistant,
                                     char * buf, int32_t buf_size, int32_t * n_out, pydhsa_error * err);

/* Per layer, the route DHSA would take with these settings and cache types (an enum dhsa_layer_route
 * value, named by pydhsa_dhsa_route_name: "dhsa" or "dense: <why>"), from the model's hyperparameters and
 * weights. Fills n_layer entries; returns the model's layer count. */
PYDHSA_API int32_t pydhsa_model_dhsa_plan(const pydhsa_model * model, bool all_layers, int32_t type_k, int32_t type_v,
                                          int32_t * routes, int32_t n_layer);
PYDHSA_API const char * pydhsa_dhsa_route_name(int32_t route);

/* Load only the model's metadata and tensor shapes, no weights (llama.cpp's no_alloc): enough for
 * pydhsa_model_get_info, pydhsa_model_meta and pydhsa_model_dhsa_plan, not for a session. */
PYDHSA_API int32_t pydhsa_model_load_metadata(const char * path, pydhsa_model ** out, pydhsa_error * err);

PYDHSA_API void pydhsa_session_default_params(pydhsa_session_params * params);
PYDHSA_API int32_t pydhsa_session_create(pydhsa_model * model, const pydhsa_session_params * params,
                                         pydhsa_session ** out, pydhsa_error * err);
PYDHSA_API void pydhsa_session_free(pydhsa_session * session);
/* Forget every token in the context (the KV cache is cleared); timings are kept. */
PYDHSA_API int32_t pydhsa_session_reset(pydhsa_session * session, pydhsa_error * err);
PYDHSA_API int32_t pydhsa_session_n_ctx(const pydhsa_session * session);

/* Append tokens to the context and run them through the model (in n_batch pieces). Fails with
 * PYDHSA_ERR_TOO_LONG, before computing anything, when they do not fit. */
PYDHSA_API int32_t pydhsa_prefill(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens, pydhsa_error * err);
/* pydhsa_prefill, calling `progress` (if not NULL) after each batch with the tokens done so far and the total;
 * a non-zero return stops the prefill (PYDHSA_ERR_CANCELLED). */
typedef int32_t (*pydhsa_progress_callback)(void * user_data, int32_t done, int32_t total);
PYDHSA_API int32_t pydhsa_prefill_progress(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens,
                                           pydhsa_progress_callback progress, void * user_data, pydhsa_error * err);
/* Asks the prefill or generation running on `session` (in another thread) to stop: it returns
 * PYDHSA_ERR_CANCELLED within one graph node's compute (llama.cpp's abort callback). Thread-safe. A call
 * made after the request returns PYDHSA_ERR_CANCELLED at once; the request is consumed by the call it stops
 * (or by pydhsa_session_reset). The context then holds part of the batch: reset before using the session. */
PYDHSA_API void pydhsa_session_cancel(pydhsa_session * session);
/* Sample up to max_tokens tokens after the current context, feeding each back in. temperature <= 0
 * is greedy; otherwise top-k 40, top-p 0.95, min-p 0.05, temperature, then a seeded draw (llama.cpp's
 * defaults). Stops at an end-of-generation token, when the context is full, or when the callback
 * returns non-zero. *n_generated receives the number of tokens produced. */
PYDHSA_API int32_t pydhsa_generate(pydhsa_session * session, int32_t max_tokens, float temperature, uint32_t seed,
                                   pydhsa_token_callback callback, void * user_data, int32_t * n_generated,
                                   pydhsa_error * err);
PYDHSA_API void pydhsa_sampling_default_params(pydhsa_sampling_params * params);
/* pydhsa_generate with every sampler setting (invalid values: PYDHSA_ERR_ARGUMENT). */
PYDHSA_API int32_t pydhsa_generate_sampled(pydhsa_session * session, int32_t max_tokens,
                                           const pydhsa_sampling_params * sampling, pydhsa_token_callback callback,
                                           void * user_data, int32_t * n_generated, pydhsa_error * err);
/* Logits of the last evaluated position (n_vocab floats). */
/* Evaluate tokens after what the context holds (at most the batch size) and write the logits of every one of
 * them to `logits` (n_tokens rows of n_vocab floats; logits_size = n_tokens * n_vocab). For scoring text
 * (pydhsa perplexity): every position runs the session's attention, with no dense tail. */
PYDHSA_API int32_t pydhsa_eval_logits(pydhsa_session * session, const int32_t * tokens, int32_t n_tokens,
                                      float * logits, int64_t logits_size, pydhsa_error * err);
PYDHSA_API int32_t pydhsa_last_logits(pydhsa_session * session, float * out, int32_t n_vocab, pydhsa_error * err);
PYDHSA_API void pydhsa_session_timings(const pydhsa_session * session, pydhsa_timings * out);
/* Query-key pairs the DHSA kernel computed and the causal pairs of the same rows, per layer, summed over
 * every decode call so far (zeros for layers that ran dense attention). Fills n_layer entries of each
 * array; returns the number of layers of the model. */
PYDHSA_API int32_t pydhsa_session_dhsa_stats(const pydhsa_session * session, int64_t * computed, int64_t * causal,
                                             int32_t n_layer);
/* Per layer, the route the graphs built so far gave its attention (see pydhsa_model_dhsa_plan; 0 = no
 * graph has built it yet, or DHSA is off). Returns the model's layer count. */
PYDHSA_API int32_t pydhsa_session_dhsa_routes(const pydhsa_session * session, int32_t * routes, int32_t n_layer);

/* ---- op-level access for tests and benchmarks (one attention layer on one ggml backend) --------------
 * Q: [n_q][n_head][d] float32; K, V: [n_kv][n_head_kv] rows of d values in the ggml type kv_type (0 f32,
 * 1 f16, 8 q8_0, 30 bf16, ...: ggml's own row layout, as a KV cache of that type stores them), contiguous. The queries sit at key positions q_pos0 .. q_pos0+n_q-1 (causal mask built here).
 * mode: PYDHSA_OP_DHSA (our select + attn ops, settings from `dhsa`, dense_from as given),
 *       PYDHSA_OP_FLASH (upstream ggml_flash_attn_ext, dense), or
 *       PYDHSA_OP_MASK (our selection turned into a -inf mask for upstream flash_attn_ext: the mask route),
 *       PYDHSA_OP_SELECT (the selection alone, to time it; out may be NULL).
 * device: NULL or "cpu" (n_threads threads), "cuda" or "gpu" (the first GPU of the build), or a device
 * name as pydhsa_op_device_name lists it (ggml's registry: "CPU", "CUDA0", ...); an op the backend lacks
 * for these shapes gives PYDHSA_ERR_ARGUMENT.
 * out: [n_q][n_head][d] float32. ranges (DHSA and MASK modes, may be NULL): the selection tensor as the op
 * wrote it, n_ranges_ints int32 (PYDHSA_ERR_BUFFER if too small; *n_ranges_out tells the size).
 * elapsed_ms: wall time of the graph computation (synchronous), the median of n_repeat runs after one
 * untimed warm-up when n_repeat > 1. warm_cache = false: each run starts with cold selection caches (as
 * one call that sees these keys for the first time); true: the caches of complete 512-key segments
 * persist between runs (the steady state of a long prefill or of decode, where earlier segments were
 * seen before; the last, incomplete segment is always recomputed). For the mask route, the
 * selection graph plus the flash-attention graph (the host's range-to-mask conversion is not counted).
 * The output and ranges are those of the last run. */
typedef enum {
    PYDHSA_OP_DHSA = 0, PYDHSA_OP_FLASH = 1, PYDHSA_OP_MASK = 2, PYDHSA_OP_SELECT = 3,
    /* DHSA with the CUDA attention route forced: our kernel (OWN), or upstream's sparse MMA flash attention
     * fed with the selection (FATTN; PYDHSA_ERR_ARGUMENT when the configuration does not qualify, e.g. on
     * the CPU or with soft-capping). PYDHSA_OP_DHSA takes the engine's default: our kernel, unless the
     * environment's PYDHSA_CUDA_ATTN says fattn (native/dhsa/ggml-cuda-dhsa-fattn.cu). */
    PYDHSA_OP_DHSA_OWN = 4, PYDHSA_OP_DHSA_FATTN = 5
} pydhsa_op_mode;

PYDHSA_API int32_t pydhsa_op_attention(int32_t mode, const pydhsa_dhsa_params * dhsa, int32_t dense_from,
                                       const float * q, const void * k, const void * v, int32_t kv_type,
                                       int32_t n_q, int32_t n_kv, int32_t n_head, int32_t n_head_kv, int32_t d,
                                       int32_t q_pos0, float scale, float softcap, const char * device,
                                       int32_t n_threads, int32_t n_repeat, bool warm_cache,
                                       float * out, int32_t * ranges, int64_t n_ranges_ints, int64_t * n_ranges_out,
                                       double * elapsed_ms, pydhsa_error * err);

/* pydhsa_op_attention under a mask given by the caller instead of the causal one: visible[r * n_kv + j]
 * non-zero when query row r may see key j (several sequences in one ubatch, as a unified KV cache's mask
 * shows them); q_pos0 is then unused. Not for PYDHSA_OP_MASK. visible == NULL: pydhsa_op_attention. */
PYDHSA_API int32_t pydhsa_op_attention_masked(int32_t mode, const pydhsa_dhsa_params * dhsa, int32_t dense_from,
                                              const float * q, const void * k, const void * v, int32_t kv_type,
                                              int32_t n_q, int32_t n_kv, int32_t n_head, int32_t n_head_kv,
                                              int32_t d, int32_t q_pos0, const uint8_t * visible, float scale,
                                              float softcap, const char * device, int32_t n_threads,
                                              int32_t n_repeat, bool warm_cache, float * out, int32_t * ranges,
                                              int64_t n_ranges_ints, int64_t * n_ranges_out, double * elapsed_ms,
                                              pydhsa_error * err);

/* Number of GPU devices the engine was built with and can see (0 for a CPU-only build). */
PYDHSA_API int32_t pydhsa_gpu_count(void);
/* The devices of every backend the engine was built with (ggml's registry, the CPU included): their
 * number, and the name of device i (NULL when i is out of range), as the op's `device` takes it. */
PYDHSA_API int32_t pydhsa_op_device_count(void);
PYDHSA_API const char * pydhsa_op_device_name(int32_t i);
/* cffi:end */

#ifdef __cplusplus
}
#endif

#endif /* PYDHSA_H */
