// The DHSA parameter table and its checks (see dhsa-params.h).
#include "dhsa-params.h"

#include "ggml-dhsa.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Token counts above this are rejected as absurd (a context of 16M tokens is far past any model here).
#define DHSA_MAX_TOKENS (1 << 24)
#define DHSA_MAX_Q_BLOCK 4096

#define STR_(x) #x
#define STR(x) STR_(x)

static const struct dhsa_param_def k_params[DHSA_PARAM_COUNT] = {
    [DHSA_PARAM_BUDGET] = {"budget", DHSA_PARAM_FLOAT, 0.3, 0.0, 1.0, NULL, 0, NULL,
                           "fraction of the causal keys each query block attends to, 0 < B <= 1 (1 = dense: upstream's own "
                           "flash attention)"},
    [DHSA_PARAM_BOUNDARY] = {"boundary", DHSA_PARAM_CHOICE, 0, 0, 2, "keysim,fixed,learned", 2, NULL,
                             "key chunk boundary method: keysim (training-free key similarity), fixed "
                             "(every chunk_avg tokens), learned (not implemented yet)"},
    [DHSA_PARAM_CHUNK_MIN] = {"chunk_min", DHSA_PARAM_INT, 16, 1, DHSA_SEGMENT, NULL, 0, NULL,
                              "minimum key chunk length in tokens (>= 1)"},
    // The engine chunks keys in aligned segments of DHSA_SEGMENT cells (ggml-dhsa.h).
    [DHSA_PARAM_CHUNK_MAX] = {"chunk_max", DHSA_PARAM_INT, 128, 1, DHSA_SEGMENT, NULL, 0, NULL,
                              "maximum key chunk length in tokens (>= 2*chunk_min, <= " STR(DHSA_SEGMENT) ")"},
    [DHSA_PARAM_CHUNK_AVG] = {"chunk_avg", DHSA_PARAM_INT, 32, 1, DHSA_SEGMENT, NULL, 0, NULL,
                              "target mean key chunk length in tokens (chunk_min <= chunk_avg <= chunk_max)"},
    [DHSA_PARAM_Q_BLOCK] = {"q_block", DHSA_PARAM_INT, 64, 1, DHSA_MAX_Q_BLOCK, NULL, 0, NULL,
                            "query block size in tokens (1.." STR(DHSA_MAX_Q_BLOCK) ")"},
    [DHSA_PARAM_SINK_TOKENS] = {"sink_tokens", DHSA_PARAM_INT, 128, 0, DHSA_MAX_TOKENS, NULL, 0, "--dhsa-sink",
                                "first keys always kept (attention sink)"},
    [DHSA_PARAM_LOCAL_TOKENS] = {"local_tokens", DHSA_PARAM_INT, 128, 0, DHSA_MAX_TOKENS, NULL, 0, "--dhsa-local",
                                 "keys just before each query block always kept"},
    [DHSA_PARAM_DENSE_TAIL] = {"dense_tail", DHSA_PARAM_INT, 64, 0, DHSA_MAX_TOKENS, NULL, 0, NULL,
                               "last prompt tokens that attend densely to all keys"},
    [DHSA_PARAM_MIN_CONTEXT] = {"min_context", DHSA_PARAM_INT, 2048, 0, DHSA_MAX_TOKENS, NULL, 0, NULL,
                                "contexts with fewer keys than this run dense"},
    [DHSA_PARAM_LAYERS] = {"layers", DHSA_PARAM_CHOICE, 0, 0, 1, "global,all", 2, NULL,
                           "layers DHSA applies to: global (global-attention layers only) or all "
                           "(sliding-window layers too)"},
    // Not in the paper's list: its decode selects chunks ("sparse"). Dense is our default because sparse
    // decode lost needles that dense decode finds (bench/README.md, full NIAH grid) while decode on a CPU
    // ran no faster with it (bench/results/speed-16k-32k-v3: 0.97x).
    [DHSA_PARAM_DECODE] = {"decode", DHSA_PARAM_CHOICE, 0, 0, 1, "dense,sparse", 2, NULL,
                           "attention of generated tokens: dense (upstream flash attention) or sparse (chunk "
                           "selection within the budget, as the paper's decode)"},
};

const struct dhsa_param_def * dhsa_param_table(void) {
    return k_params;
}

int32_t dhsa_param_find(const char * name) {
    for (int32_t i = 0; name != NULL && i < DHSA_PARAM_COUNT; i++) {
        if (strcmp(k_params[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

void dhsa_settings_default(struct dhsa_settings * s) {
    for (int32_t i = 0; i < DHSA_PARAM_COUNT; i++) {
        s->v[i] = k_params[i].def;
    }
}

// Writes a reason into `why` and returns -1.
static int32_t fail(char * why, size_t why_size, const char * fmt, ...) __attribute__((format(printf, 3, 4)));
static int32_t fail(char * why, size_t why_size, const char * fmt, ...) {
    if (why != NULL && why_size > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, why_size, fmt, ap);
        va_end(ap);
    }
    return -1;
}

// The index of `text` among a choice's comma-separated names (case-insensitive), or -1.
static int32_t choice_index(const char * choices, const char * text) {
    const size_t n = strlen(text);
    int32_t index  = 0;
    for (const char * p = choices; *p != '\0'; index++) {
        const char * end = strchr(p, ',');
        const size_t len = end ? (size_t) (end - p) : strlen(p);
        if (len == n && strncasecmp(p, text, n) == 0) {
            return index;
        }
        p += len + (end ? 1 : 0);
    }
    return -1;
}

// The name of choice `index` into buf.
static void choice_name(const char * choices, int32_t index, char * buf, size_t buf_size) {
    const char * p = choices;
    for (int32_t i = 0; i < index && p != NULL; i++) {
        p = strchr(p, ',');
        p = p ? p + 1 : NULL;
    }
    if (p == NULL) {
        snprintf(buf, buf_size, "?");
        return;
    }
    const char * end = strchr(p, ',');
    snprintf(buf, buf_size, "%.*s", (int) (end ? (size_t) (end - p) : strlen(p)), p);
}

int32_t dhsa_param_check(int32_t id, double value, char * why, size_t why_size) {
    if (id < 0 || id >= DHSA_PARAM_COUNT) {
        return fail(why, why_size, "unknown DHSA parameter #%d", id);
    }
    const struct dhsa_param_def * p = &k_params[id];
    switch (p->kind) {
        case DHSA_PARAM_FLOAT:
            if (!(value > p->lo && value <= p->hi)) {
                return fail(why, why_size, "%s must be > %g and <= %g, got %g", p->name, p->lo, p->hi, value);
            }
            return 0;
        case DHSA_PARAM_INT:
            if (value != floor(value) || value < p->lo || value > p->hi) {
                return fail(why, why_size, "%s must be an integer between %.0f and %.0f, got %g", p->name, p->lo,
                            p->hi, value);
            }
            return 0;
        default: {
            if (value != floor(value) || value < 0 || value > p->hi) {
                return fail(why, why_size, "%s: no choice #%g (choices: %s)", p->name, value, p->choices);
            }
            if (value >= p->n_implemented) {
                char name[32];
                choice_name(p->choices, (int32_t) value, name, sizeof(name));
                return fail(why, why_size, "%s %s is not implemented yet", p->name, name);
            }
            return 0;
        }
    }
}

int32_t dhsa_settings_set(struct dhsa_settings * s, int32_t id, const char * text, char * why, size_t why_size) {
    if (id < 0 || id >= DHSA_PARAM_COUNT) {
        return fail(why, why_size, "unknown DHSA parameter #%d", id);
    }
    const struct dhsa_param_def * p = &k_params[id];
    while (text != NULL && isspace((unsigned char) *text)) {
        text++;
    }
    if (text == NULL || *text == '\0') {
        return fail(why, why_size, "%s: empty value", p->name);
    }
    double value = 0.0;
    if (p->kind == DHSA_PARAM_CHOICE) {
        const int32_t index = choice_index(p->choices, text);
        if (index < 0) {
            return fail(why, why_size, "%s: invalid value '%s', expected one of %s", p->name, text, p->choices);
        }
        value = index;
    } else {
        char * end = NULL;
        errno      = 0;
        value      = strtod(text, &end);
        while (end != NULL && isspace((unsigned char) *end)) {
            end++;
        }
        if (end == text || *end != '\0' || errno == ERANGE || !isfinite(value)) {
            return fail(why, why_size, "%s: expected a number, got '%s'", p->name, text);
        }
    }
    if (dhsa_param_check(id, value, why, why_size) != 0) {
        return -1;
    }
    s->v[id] = value;
    return 0;
}

int32_t dhsa_settings_check(const struct dhsa_settings * s, char * why, size_t why_size) {
    for (int32_t i = 0; i < DHSA_PARAM_COUNT; i++) {
        if (dhsa_param_check(i, s->v[i], why, why_size) != 0) {
            return -1;
        }
    }
    const double mn = s->v[DHSA_PARAM_CHUNK_MIN], avg = s->v[DHSA_PARAM_CHUNK_AVG], mx = s->v[DHSA_PARAM_CHUNK_MAX];
    if (!(mn <= avg && avg <= mx && mx >= 2 * mn)) {
        return fail(why, why_size,
                    "chunk sizes need chunk_min <= chunk_avg <= chunk_max and chunk_max >= 2*chunk_min, got "
                    "chunk_min=%.0f chunk_avg=%.0f chunk_max=%.0f",
                    mn, avg, mx);
    }
    return 0;
}

void dhsa_settings_describe(const struct dhsa_settings * s, char * buf, size_t buf_size) {
    size_t used = 0;
    if (buf_size > 0) {
        buf[0] = '\0';
    }
    for (int32_t i = 0; i < DHSA_PARAM_COUNT && used < buf_size; i++) {
        const struct dhsa_param_def * p = &k_params[i];
        char value[32];
        if (p->kind == DHSA_PARAM_CHOICE) {
            choice_name(p->choices, (int32_t) s->v[i], value, sizeof(value));
        } else {
            snprintf(value, sizeof(value), "%g", s->v[i]);
        }
        const int n = snprintf(buf + used, buf_size - used, "%s%s=%s", i ? " " : "", p->name, value);
        used += n > 0 ? (size_t) n : 0;
    }
}
