"""Several sequences in one ubatch through plain llama.h (llama-cpp-python's low-level bindings on our
libllama; LLAMA_CPP_LIB_PATH must be set before llama_cpp is imported, so the tests run this in a fresh
process):

    python llama_cpp_seqs_probe.py MODEL N_NEW PROMPT_FILE [PROMPT_FILE ...]

prefills the prompts as sequences 0, 1, ... of one llama_decode call (one ubatch, a unified KV cache, as
llama-server's parallel slots), then decodes N_NEW greedy tokens for all of them together; then does the
same for each prompt alone in a fresh context. Prints one JSON line: per run, the tokens of each sequence
and what llama_dhsa_pairs says after the prefill (computed and causal query-key pairs).
"""
import ctypes
import json
import sys

import numpy as np


def main() -> int:
    model_path, n_new, prompt_files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import llama_cpp as L

    lib = L.llama_cpp._lib
    lib.llama_dhsa_pairs.restype = ctypes.c_bool
    lib.llama_dhsa_pairs.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]

    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    def tokenize(text: str):
        data = text.encode()
        buf = (L.llama_token * (len(data) + 16))()
        n = L.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
        assert n > 0, n
        return list(buf[:n])

    prompts = [tokenize(open(f, encoding="utf-8").read()) for f in prompt_files]

    def run(seqs):
        """Prefill the prompts `seqs` (indices) in one call, then n_new greedy steps for all of them."""
        total = sum(len(prompts[s]) for s in seqs)
        params = L.llama_context_default_params()
        params.n_ctx = total + len(seqs) * (n_new + 16)
        params.n_batch = params.n_ubatch = total
        params.n_seq_max = len(seqs)
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = 2
        ctx = L.llama_init_from_model(model, params)
        batch = L.llama_batch_init(total, 0, len(seqs))
        out_index, i = {}, 0
        for seq_id, s in enumerate(seqs):
            for p, tok in enumerate(prompts[s]):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, p, 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = p == len(prompts[s]) - 1
                i += 1
            out_index[seq_id] = i - 1
        batch.n_tokens = total
        assert L.llama_decode(ctx, batch) == 0
        computed, causal = ctypes.c_int64(), ctypes.c_int64()
        on = lib.llama_dhsa_pairs(ctx, ctypes.byref(computed), ctypes.byref(causal))
        tokens = {seq_id: [] for seq_id in range(len(seqs))}
        for step in range(n_new):
            for seq_id in range(len(seqs)):
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, out_index[seq_id]), shape=(n_vocab,))
                tokens[seq_id].append(int(np.argmax(logits)))
            if step == n_new - 1:
                break
            for seq_id, s in enumerate(seqs):
                batch.token[seq_id], batch.pos[seq_id], batch.n_seq_id[seq_id] = tokens[seq_id][-1], len(prompts[s]) + step, 1
                batch.seq_id[seq_id][0], batch.logits[seq_id] = seq_id, True
                out_index[seq_id] = seq_id
            batch.n_tokens = len(seqs)
            assert L.llama_decode(ctx, batch) == 0
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        return {"tokens": [tokens[j] for j in range(len(seqs))], "dhsa": bool(on), "computed": computed.value,
                "causal": causal.value}

    together = run(list(range(len(prompts))))
    alone = [run([s]) for s in range(len(prompts))]
    print(json.dumps({"together": together, "alone": alone, "n_prompt": [len(p) for p in prompts]}))
    L.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
