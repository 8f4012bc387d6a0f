// DHSA in any program linked against libllama (called by llama-context.cpp through patch 0006): a context
// created from a model with `<arch>.dhsa.*` keys, or with the PYDHSA_DHSA environment variable set, gets a
// DHSA runtime of its own, with no call of ours. Settings attached through llama_dhsa_attach (our C API)
// replace it. See native/dhsa/ENGINE.md, "DHSA without our API".
#pragma once

#include "llama.h"

#include <memory>

struct dhsa_runtime;

struct llama_dhsa_runtime_deleter {
    void operator()(dhsa_runtime * rt) const;
};
using llama_dhsa_runtime_ptr = std::unique_ptr<dhsa_runtime, llama_dhsa_runtime_deleter>;

// Before the context exists: the runtime the model's keys and PYDHSA_DHSA ask for (null: DHSA off), with
// a log line saying which and why. DHSA replaces flash attention, so a disabled flash attention is turned
// on (logged).
llama_dhsa_runtime_ptr llama_dhsa_from_model(const llama_model & model, llama_context_params & params);

// The context now owns `rt` (nothing when null); it is released by llama_dhsa_forget.
void llama_dhsa_adopt(llama_context * ctx, llama_dhsa_runtime_ptr rt);

// After llama_free: releases the runtime the context owned, if any.
void llama_dhsa_forget(const llama_context * ctx);

// Points the context's graphs at `rt` (no ownership change).
void llama_dhsa_set_cparams(llama_context * ctx, dhsa_runtime * rt);

// At the start of llama_decode, for contexts that own their runtime: the settings a plain llama_decode
// cannot pass. A call with at most one token per sequence is a decode step (decode=dense: upstream flash
// attention); otherwise, when the call's last token asks for logits (the end of a prompt, as far as
// llama.h tells), its last dense_tail tokens attend to everything.
void llama_dhsa_before_decode(llama_context * ctx, const llama_batch & batch);
