"""Small random-weight GGUF models of the `llama` and `qwen2` architectures, for tests.

    from random_gguf import write_random_model   # in tests/ (pytest puts tests/ on sys.path)
    path = write_random_model(tmp_path / "tiny-qwen2.gguf", "qwen2")             # heads 14/2, d 64
    path = write_random_model(tmp_path / "tiny-llama.gguf", "llama", n_head=32, n_head_kv=8, head_dim=128)

The files load in the pinned llama.cpp like a converted checkpoint would:

* llama: RMS norm, normal RoPE (chosen by llama.cpp from the architecture), SwiGLU FFN, Q/K/V/O
  without biases, separate `output.weight`.
* qwen2: the same with biases on Q, K and V (`blk.N.attn_{q,k,v}.bias`); llama.cpp runs qwen2 with
  NeoX RoPE (also chosen from the architecture, no key needed).

Weights are seeded normal values scaled so that activations stay O(1) whatever the shape: a matrix
with fan-in n gets std 1/sqrt(n) (Q and K times `qk_gain`, so attention scores have std ~qk_gain**2
and attention is peaked rather than uniform), embeddings std 1, norms 1.0, biases std 0.1. Matrices
are stored in `dtype` (F16 by default), norms and biases in F32 as llama.cpp expects. So the logits
depend on the context, not only on the last token, and greedy decoding is not constant.

Tokenizer: GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`): ids 0..255 are the 256
byte tokens (GPT-2 byte-to-unicode map, id == byte value), then merges that fill the vocabulary
("Ġ a".."Ġ z", "a a".."z z", then longer), then the control tokens at the end of the vocabulary:
llama: <|begin_of_text|> (BOS, added), <|end_of_text|> (EOS), <|eot_id|>;
qwen2: <|endoftext|> (BOS/PAD, not added), <|im_start|>, <|im_end|> (EOS), plus a ChatML template.
Any text tokenizes (unknown sequences fall back to byte tokens) and detokenizes back exactly.

By default (`printable_output=True`) the `output.weight` rows of the control tokens and of the byte
tokens other than printable ASCII and "\n" are zero: their logit is 0 while the others spread
~N(0, 1) over hundreds of tokens, so greedy generation practically never emits EOS (and stops early)
or invalid UTF-8, and its text is readable ASCII. Under sampling at temperature ~1 they can still be
drawn. Token ids fed to prefill may be anything in [0, n_vocab).
"""
from __future__ import annotations

import os
import string
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

ARCHS = ("llama", "qwen2")

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# control tokens, appended at the end of the vocabulary, and which of them are BOS / EOS / PAD
_SPECIALS = {
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
              {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos": "<|endoftext|>", "eos": "<|im_end|>", "pad": "<|endoftext|>"}),
}
_DEFAULTS = {  # arch -> (rope freq base, rms eps, add BOS, tokenizer.ggml.pre)
    "llama": (500000.0, 1e-5, True, "default"),
    "qwen2": (1000000.0, 1e-6, False, "qwen2"),
}
_DTYPES = ("f32", "f16", "bf16", "q8_0")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_pairs() -> Iterator[tuple[str, str]]:
    """An endless list of BPE merges, each of an existing token and a byte token: "Ġ a".."Ġ z",
    "a a".."z z", then those results extended by one more letter, and so on."""
    letters = string.ascii_lowercase
    frontier = ["Ġ", *letters]
    while True:
        nxt = []
        for left in frontier:
            for c in letters:
                yield left, c
                nxt.append(left + c)
        frontier = nxt


def build_vocab(arch: str, n_vocab: int):
    """(tokens, token_types, merges, {"bos"/"eos"/"pad": id}) of a byte-level BPE vocabulary of n_vocab tokens."""
    import gguf
    specials, roles = _SPECIALS[arch]
    n_merges = n_vocab - 256 - len(specials)
    if n_merges < 0:
        raise ValueError(f"n_vocab must be at least {256 + len(specials)} for {arch} (256 bytes + control tokens)")
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = [f"{a} {b}" for a, b in islice(_merge_pairs(), n_merges)]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += specials
    types = [int(gguf.TokenType.NORMAL)] * (n_vocab - len(specials)) + [int(gguf.TokenType.CONTROL)] * len(specials)
    ids = {role: tokens.index(tok) for role, tok in roles.items()}
    assert len(tokens) == n_vocab == len(set(tokens))
    return tokens, types, merges, ids


def write_random_model(path: str | os.PathLike, arch: str = "llama", n_layer: int = 2, n_head: int = 14,
                       n_head_kv: int = 2, head_dim: int = 64, n_ff: int = 256, n_vocab: int = 512,
                       n_ctx_train: int = 8192, seed: int = 0, dtype: str = "f16", *,
                       n_embd: Optional[int] = None, rope_freq_base: Optional[float] = None,
                       rms_eps: Optional[float] = None, qk_gain: float = 1.5, tie_embeddings: bool = False,
                       printable_output: bool = True, name: Optional[str] = None) -> Path:
    """Write a random-weight `arch` ("llama" or "qwen2") GGUF to `path` and return the path.

    n_embd defaults to n_head * head_dim; llama also accepts another width (the file then carries
    attention.key_length/value_length = head_dim), qwen2 does not (llama.cpp sizes its Q/O by n_embd).
    dtype: "f16" (default), "f32", "bf16" or "q8_0" for the matrices (q8_0 needs widths that are
    multiples of 32). rope_freq_base / rms_eps default to Llama 3's (5e5, 1e-5) and Qwen2.5's (1e6, 1e-6).
    qk_gain scales the Q and K projections (attention logits have std ~qk_gain**2).
    tie_embeddings: no `output.weight` (llama.cpp reuses token_embd); printable_output then has no effect.
    printable_output: zero output rows for control tokens and non-printable byte tokens (see the module doc).
    """
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be a positive multiple of n_head_kv ({n_head_kv})")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be even and positive, got {head_dim}")
    n_q = n_head * head_dim
    n_kv = n_head_kv * head_dim
    if n_embd is None:
        n_embd = n_q
    elif arch == "qwen2" and n_embd != n_q:
        raise ValueError("qwen2 needs n_embd == n_head * head_dim (llama.cpp sizes its Q and O by n_embd)")
    freq_base, eps, add_bos, pre = _DEFAULTS[arch]
    freq_base = freq_base if rope_freq_base is None else float(rope_freq_base)
    eps = eps if rms_eps is None else float(rms_eps)

    tokens, types, merges, special_ids = build_vocab(arch, n_vocab)
    rng = np.random.default_rng(seed)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"random {arch} L{n_layer} H{n_head}/{n_head_kv} d{head_dim}")
    w.add_file_type(int(ftype))
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(freq_base)
    w.add_layer_norm_rms_eps(eps)
    if arch == "llama":
        w.add_vocab_size(n_vocab)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special_ids["bos"])
    w.add_eos_token_id(special_ids["eos"])
    if "pad" in special_ids:
        w.add_pad_token_id(special_ids["pad"])
    w.add_add_bos_token(add_bos)
    if arch == "qwen2":
        w.add_chat_template(CHATML_TEMPLATE)

    def tname(t, bid=None, suffix="weight"):
        return gguf.TENSOR_NAMES[t].format(bid=bid) + "." + suffix

    def matrix(n_out, n_in, gain=1.0):
        # numpy shape (rows, cols) = ggml ne {n_in, n_out}
        return rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(gain / np.sqrt(n_in))

    def add_matrix(name_, data):
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name_, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name_, data.astype(np.float16))
        else:
            from gguf import quants
            w.add_tensor(name_, quants.quantize(data, qtype), raw_dtype=qtype)

    def add_vector(name_, data):
        w.add_tensor(name_, np.ascontiguousarray(data, dtype=np.float32))

    T = gguf.MODEL_TENSOR
    # token embeddings: std 1 per element (rms ~1, like the normed activations the blocks add to)
    add_matrix(tname(T.TOKEN_EMBD), rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    add_vector(tname(T.OUTPUT_NORM), np.ones(n_embd))
    if not tie_embeddings:
        out = matrix(n_vocab, n_embd)
        if printable_output:
            out[[i for i, t in enumerate(types) if t != int(gguf.TokenType.NORMAL)]] = 0.0
            out[[b for b in range(256) if not (32 <= b < 127 or b == 10)]] = 0.0
        add_matrix(tname(T.OUTPUT), out)
    for i in range(n_layer):
        add_vector(tname(T.ATTN_NORM, i), np.ones(n_embd))
        add_matrix(tname(T.ATTN_Q, i), matrix(n_q, n_embd, qk_gain))
        add_matrix(tname(T.ATTN_K, i), matrix(n_kv, n_embd, qk_gain))
        add_matrix(tname(T.ATTN_V, i), matrix(n_kv, n_embd))
        if arch == "qwen2":
            add_vector(tname(T.ATTN_Q, i, "bias"), 0.1 * rng.standard_normal(n_q))
            add_vector(tname(T.ATTN_K, i, "bias"), 0.1 * rng.standard_normal(n_kv))
            add_vector(tname(T.ATTN_V, i, "bias"), 0.1 * rng.standard_normal(n_kv))
        add_matrix(tname(T.ATTN_OUT, i), matrix(n_embd, n_q))
        add_vector(tname(T.FFN_NORM, i), np.ones(n_embd))
        add_matrix(tname(T.FFN_GATE, i), matrix(n_ff, n_embd))
        add_matrix(tname(T.FFN_UP, i), matrix(n_ff, n_embd))
        add_matrix(tname(T.FFN_DOWN, i), matrix(n_embd, n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":  # python tests/random_gguf.py OUT.gguf ARCH [n_head n_head_kv head_dim]
    import sys
    a = sys.argv[1:]
    kw = dict(zip(("n_head", "n_head_kv", "head_dim"), map(int, a[2:5])))
    print(write_random_model(a[0], a[1] if len(a) > 1 else "llama", **kw))
