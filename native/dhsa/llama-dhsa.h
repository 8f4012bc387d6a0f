// Public addition to libllama (a new function; llama.h itself is unchanged): attach DHSA settings to a
// context. From then on the gemma2/gemma3 graphs use the DHSA ops instead of flash attention on the
// layers the settings select. The caller owns `rt` and keeps it alive as long as the context; it may
// change rt->dense_from between llama_decode calls (it is read at compute time). NULL detaches.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

struct dhsa_runtime;

LLAMA_API void llama_dhsa_attach(struct llama_context * ctx, struct dhsa_runtime * rt);

#ifdef __cplusplus
}
#endif
