#!/usr/bin/env python3
"""Whole-prompt prefill on a GPU (every layer offloaded) of a random-weight model of a real model's shape: dense
(upstream flash attention) versus DHSA budgets, same model, same prompt, same run.

--shape gemma3-1b (default): Gemma 3 1B's shape (26 layers, hidden 1152, FFN 6912, 4 query heads and 1 KV head of size 256,
a 512-token sliding window on 5 of every 6 layers, 32K context) with random weights and a small vocabulary
(a SentencePiece tokenizer trained here on generated words: the real 262K-token vocabulary only adds an
embedding lookup and the last position's output projection to a prefill). It is made with transformers and
converted with our converter (f16), once per --workdir.

--shape qwen2-7b: Qwen2 7B's shape (28 layers, hidden 3584, FFN 18944, 28 query heads over 4 KV heads of size
128, q/k/v biases, every layer global, 32K context), written as a qwen2 GGUF (f16) by the tests' random-model
writer (tests/random_gguf.py: seeded weights scaled by fan-in, a 1000-token byte-level BPE vocabulary).

--cuda-attn own,fattn times DHSA once per CUDA attention route (PYDHSA_CUDA_ATTN); default: the engine's choice.

For each prompt length (random token ids) and mode, a fresh session prefills the whole prompt --repeats
times; the table shows median prefill time, tokens/s and the speedup over dense of the same length.

    python bench/cuda_prefill.py --lengths 8192,16384,32768 --budgets 0.3 --out bench/results/prefill-cuda.json
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for p in (str(REPO), str(BENCH_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)
import attention as A  # noqa: E402  (bench/attention.py: machine info, JSON writing, list parsing)

GEMMA3_1B = dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
                 sliding_window_pattern=6, query_pre_attn_scalar=256, rope_theta=1000000.0,
                 rope_local_base_freq=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def make_tokenizer(dest: Path) -> None:
    """A 1000-piece SentencePiece BPE tokenizer with Gemma's special ids, saved as transformers saves one."""
    import sentencepiece as spm
    import transformers
    rng = random.Random(0)
    words = [("".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 8)))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=1000, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", add_dummy_prefix=False, num_threads=4, minloglevel=2)
    (dest / "tokenizer.model").write_bytes(buf.getvalue())
    transformers.GemmaTokenizer.from_pretrained(str(dest)).save_pretrained(str(dest))


# Qwen2 7B's shape, as tests/random_gguf.write_random_model takes it (its vocabulary: 1000 byte-level BPE tokens).
QWEN2_7B = dict(n_layer=28, n_head=28, n_head_kv=4, head_dim=128, n_ff=18944, n_vocab=1000, n_ctx_train=32768,
                rope_freq_base=1000000.0, rms_eps=1e-6)
SHAPES = {"gemma3-1b": GEMMA3_1B, "qwen2-7b": QWEN2_7B}


def make_qwen2_gguf(workdir: Path) -> Path:
    """A random-weight qwen2 GGUF of Qwen2 7B's shape (tests/random_gguf.py), reused when already in workdir."""
    path = workdir / "qwen2-7b-shaped-random-f16.gguf"
    if not path.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from random_gguf import write_random_model
        A.log(f"cuda_prefill: writing {path}")
        write_random_model(path, "qwen2", **QWEN2_7B, name="qwen2-7b-shaped-random")
    return path


def make_model(workdir: Path, shape: str = "gemma3-1b") -> Path:
    """The random-weight model of `shape` as an f16 GGUF (reused when already in workdir)."""
    if shape == "qwen2-7b":
        return make_qwen2_gguf(workdir)
    gguf_path = workdir / "gemma3-1b-shaped-random-f16.gguf"
    if gguf_path.exists():
        return gguf_path
    import torch
    import transformers
    from pydhsa_convert.hf_gemma import convert_hf
    ck = workdir / "checkpoint"
    ck.mkdir(parents=True, exist_ok=True)
    make_tokenizer(ck)
    config = transformers.Gemma3TextConfig(vocab_size=1000, **GEMMA3_1B)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.02 if p.ndim > 1 else 0.3)
    model.save_pretrained(str(ck))
    del model
    A.log(f"cuda_prefill: converting {ck} -> {gguf_path}")
    convert_hf(ck, gguf_path, outtype="f16")
    return gguf_path


def prefill_ms(model, tokens: Sequence[int], budget: Optional[float], args, route: Optional[str] = None) -> float:
    import os
    from pydhsa.dhsa_params import DhsaConfig
    cfg = None if budget is None else DhsaConfig(budget=budget)
    if route is None:
        os.environ.pop("PYDHSA_CUDA_ATTN", None)
    else:
        os.environ["PYDHSA_CUDA_ATTN"] = route  # read by the engine at every DHSA node
    n_ctx = min(len(tokens) + 16, model.info.n_ctx_train)  # the model's maximum context is a valid length
    with model.session(n_ctx=n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch, dhsa=cfg) as s:
        s.prefill(tokens)
        return s.timings().t_prefill_ms


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=A.parse_int_list, default=[8192, 16384, 32768], metavar="LIST",
                    help="prompt lengths (default 8k,16k,32k; 32K is Gemma 3 1B's maximum context)")
    ap.add_argument("--budgets", type=A.parse_float_list, default=[0.3], metavar="LIST", help="DHSA budgets (0.3)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-1b",
                    help="the real model whose shape the random model has (default gemma3-1b)")
    ap.add_argument("--cuda-attn", default=None, metavar="LIST",
                    help="CUDA attention routes to time DHSA with, comma-separated from own,fattn "
                         "(default: the engine's choice)")
    ap.add_argument("--repeats", type=int, default=3, help="prefills per length and mode (default 3)")
    ap.add_argument("--n-batch", type=int, default=2048, help="logical batch (llama.cpp's default 2048)")
    ap.add_argument("--n-ubatch", type=int, default=512, help="physical batch (llama.cpp's default 512)")
    ap.add_argument("--n-gpu-layers", "-ngl", type=int, default=99, help="layers offloaded (default 99: all)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pydhsa-cuda-prefill"),
                    help="where the random model is made and kept (default /tmp/pydhsa-cuda-prefill)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    routes: List[Optional[str]] = [None]
    if args.cuda_attn:
        routes = [r.strip() for r in args.cuda_attn.split(",") if r.strip()]
        if not routes or any(r not in ("own", "fattn") for r in routes):
            ap.error("--cuda-attn: a comma-separated list of own, fattn")

    from pydhsa import Model
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = make_model(args.workdir, args.shape)
    A.log(f"cuda_prefill: model ready in {time.time() - t0:.0f} s")
    info = A.machine_info(threads=0)
    info["gpu"] = A.gpu_info()
    rows: List[Dict[str, Any]] = []
    # (label, budget, route): dense, then each budget through each route
    modes = [("dense", None, None)] + [(f"dhsa-{b:g}" + (f"-{r}" if r else ""), b, r)
                                       for b in args.budgets for r in routes]
    with Model(path, n_gpu_layers=args.n_gpu_layers) as model:
        prefill_ms(model, [2] + [10] * 1023, None, args)  # warm-up: CUDA modules, allocations
        for n in args.lengths:
            n = min(n, model.info.n_ctx_train)
            tokens = [2] + [int(t) for t in np.random.default_rng(n).integers(10, 1000, n - 1)]
            times: Dict[str, List[float]] = {label: [] for label, _, _ in modes}
            for _ in range(args.repeats):  # interleaved, so drifts hit every mode alike
                for label, b, route in modes:
                    times[label].append(prefill_ms(model, tokens, b, args, route))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"n_tokens": n, "median_ms": med, "times_ms": times,
                   "tok_s": {k: n / (v / 1000.0) for k, v in med.items()},
                   "speedup": {k: med["dense"] / v for k, v in med.items() if k != "dense"}}
            rows.append(row)
            A.log(f"cuda_prefill: {n} tokens: " + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items()))
    print("| tokens | mode | median prefill ms | tok/s | speedup vs dense |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        for k, v in r["median_ms"].items():
            sp = r["speedup"].get(k)
            print(f"| {r['n_tokens']} | {k} | {v:.0f} | {r['tok_s'][k]:.0f} | {'-' if sp is None else f'{sp:.2f}x'} |")
    out = args.out or A.default_out("prefill-cuda")
    A.write_json_atomic(out, {"benchmark": "cuda_prefill", "machine": info, "model": {"name": args.shape,
                                                                                     "shape": SHAPES[args.shape],
                              "vocab_size": 1000, "weights": "random, f16 GGUF"},
                              "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "results": rows})
    A.log(f"cuda_prefill: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
