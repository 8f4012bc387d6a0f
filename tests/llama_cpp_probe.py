"""Run stock llama-cpp-python on our libllama in a fresh process (LLAMA_CPP_LIB_PATH must be set before
llama_cpp is imported, so the tests never import it themselves).

    python llama_cpp_probe.py MODEL PROMPT_FILE N_CTX MAX_TOKENS [N_BATCH]

prints one JSON line: the greedy completion, and what libllama's llama_dhsa_pairs says about the context
(whether DHSA is on, computed and causal query-key pairs). llama.cpp's log goes to stderr (verbose=True).
"""
import ctypes
import json
import sys


def main() -> int:
    model, prompt_file, n_ctx, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    n_batch = int(sys.argv[5]) if len(sys.argv) > 5 else 512  # llama-cpp-python's default
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, verbose=True, n_threads=2, seed=0)
    with open(prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    out = llm(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)
    lib = llama_cpp.llama_cpp._lib
    lib.llama_dhsa_pairs.restype = ctypes.c_bool
    lib.llama_dhsa_pairs.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
    computed, causal = ctypes.c_int64(), ctypes.c_int64()
    on = lib.llama_dhsa_pairs(llm._ctx.ctx, ctypes.byref(computed), ctypes.byref(causal))
    print(json.dumps({"text": out["choices"][0]["text"], "dhsa": bool(on), "computed": computed.value,
                      "causal": causal.value, "n_prompt": out["usage"]["prompt_tokens"],
                      "t_prompt_ms": llama_cpp.llama_perf_context(llm._ctx.ctx).t_p_eval_ms,
                      "version": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
