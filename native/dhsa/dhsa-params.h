// The one definition of the DHSA parameters (native/dhsa/ALGORITHM.md, "Parameters"): name, kind,
// default, allowed range or choices and one-line help of each. Everything else derives from this table:
// the GGUF keys `<arch>.dhsa.<name>` and the PYDHSA_DHSA variable that libllama reads
// (llama-dhsa-auto.cpp), the defaults and checks of our C API (pydhsa.cpp), and, through
// pydhsa_dhsa_param_info, Python's DhsaConfig, every --dhsa-* flag and the converter's flags.
//
// Compiled into libllama (which reads the keys) and exported from it.
#pragma once

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum dhsa_param_kind {
    DHSA_PARAM_FLOAT  = 0,  // lo < value <= hi
    DHSA_PARAM_INT    = 1,  // lo <= value <= hi
    DHSA_PARAM_CHOICE = 2,  // the index of one of `choices`
};

enum dhsa_param_id {
    DHSA_PARAM_BUDGET = 0,
    DHSA_PARAM_BOUNDARY,
    DHSA_PARAM_CHUNK_MIN,
    DHSA_PARAM_CHUNK_MAX,
    DHSA_PARAM_CHUNK_AVG,
    DHSA_PARAM_Q_BLOCK,
    DHSA_PARAM_SINK_TOKENS,
    DHSA_PARAM_LOCAL_TOKENS,
    DHSA_PARAM_DENSE_TAIL,
    DHSA_PARAM_MIN_CONTEXT,
    DHSA_PARAM_LAYERS,
    DHSA_PARAM_DECODE,
    DHSA_PARAM_COUNT
};

struct dhsa_param_def {
    const char * name;        // GGUF key <arch>.dhsa.<name>; CLI flag --dhsa-<name, '_' as '-'>
    int32_t      kind;        // enum dhsa_param_kind
    double       def;         // the default (a choice: its index)
    double       lo, hi;      // the range (see dhsa_param_kind); choices: 0 .. n_choices - 1
    const char * choices;     // DHSA_PARAM_CHOICE: the names, comma-separated, in index order
    int32_t      n_implemented;  // DHSA_PARAM_CHOICE: the first n choices work (the rest are planned)
    const char * cli_flag;    // a shorter CLI flag than the derived one, or NULL
    const char * help;        // one line
};

// Every parameter's value (a choice as its index), in dhsa_param_id order.
struct dhsa_settings {
    double v[DHSA_PARAM_COUNT];
};

// The table: DHSA_PARAM_COUNT entries in dhsa_param_id order.
LLAMA_API const struct dhsa_param_def * dhsa_param_table(void);
// The parameter named `name`, or -1.
LLAMA_API int32_t dhsa_param_find(const char * name);

LLAMA_API void dhsa_settings_default(struct dhsa_settings * s);
// Parse `text` (a number, or a choice's name, case-insensitive) into parameter `id` and check its
// range. 0 on success; otherwise -1 with a one-line reason in `why` (s unchanged).
LLAMA_API int32_t dhsa_settings_set(struct dhsa_settings * s, int32_t id, const char * text, char * why, size_t why_size);
// Check one value against its range (and, for a choice, that it is implemented); 0 or -1 with `why`.
LLAMA_API int32_t dhsa_param_check(int32_t id, double value, char * why, size_t why_size);
// The rules between parameters (chunk_min <= chunk_avg <= chunk_max, chunk_max >= 2 * chunk_min) and every
// single-value rule; 0 or -1 with `why`.
LLAMA_API int32_t dhsa_settings_check(const struct dhsa_settings * s, char * why, size_t why_size);
// "budget=0.3 boundary=keysim ..." (for logs).
LLAMA_API void dhsa_settings_describe(const struct dhsa_settings * s, char * buf, size_t buf_size);

#ifdef __cplusplus
}
#endif
