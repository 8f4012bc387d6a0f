"""Hugging Face Gemma 2 / Gemma 3 checkpoint -> GGUF (convert/pydhsa_convert/hf_*.py), checked against transformers.

Everything is built here: a SentencePiece tokenizer trained on a few KB of generated text (Gemma's
special tokens <pad>, <eos>, <bos>, <unk> at ids 0..3), and tiny random-weight Gemma2ForCausalLM /
Gemma3ForCausalLM models saved with save_pretrained (safetensors; the Gemma 2 one sharded). Their
GGUF conversions run in our engine and must give transformers' last-position logits (float32,
eager attention) on a 100-token input, and the same tokens for the same text.

The tiny models are built so that every conversion detail matters: random norm weights (so the
stored 1 + w shows), query_pre_attn_scalar != head_dim, a 32-token sliding window under a 100-token
input, Gemma 2 soft-caps low enough to bite, RoPE bases other than llama.cpp's default 10000, linear
RoPE scaling of Gemma 3's global layers. Breaking one detail on purpose in the converter moved the
f32 logits by (max |diff| / max |logit|, Gemma 2 / Gemma 3, measured when this test was written):
norms without + 1: 1.1 / 1.1; no query-scale fold: 0.073 / 0.16; sliding-window pattern 6 instead
of 2: 0.46 / 0.52; window 33 instead of 32: 0.090 / 0.078; attention soft-cap missing (llama.cpp's
default 50): 0.037 / -; final soft-cap missing: 0.25 / -; linear RoPE scaling missing: - / 0.41;
global RoPE base missing: 0.022 / 0.26; local base missing: - / 0.21. All are >= 10x the f32
tolerance below.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import sentencepiece as spm
import gguf

from pydhsa_convert import gguf_dhsa
from pydhsa_convert import hf_checkpoint
from pydhsa_convert import hf_gemma
from pydhsa_convert import hf_tensors
from pydhsa_convert import hf_tokenizer
from pydhsa_convert.gguf_dhsa import ConvertError, ConvertIOError
from pydhsa_convert.hf_gemma import convert_hf, read_hf_config
from pydhsa.dhsa_params import PARAM_NAMES, read_gguf_dhsa

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
N_INPUT = 100
SLIDING_WINDOW = 32
# Tolerances on max |engine logit - transformers logit|, relative to max |transformers logit|.
# Measured on these models (Gemma 2 / Gemma 3) when this test was written, and on variants with
# other seeds and weight scales (in brackets):
# f32: even with f32 weights the engine keeps K and V in f16 (llama.cpp's default KV cache type,
#      not configurable through pydhsa's session API), so every attention read carries f16
#      rounding (2^-11 = 4.9e-4 relative): 3.7e-4 / 3.4e-4 [up to 5.7e-4].
# f16: weights and, in ggml's CPU matmul, the activations are rounded to f16 as well:
#      7.6e-4 / 9.9e-4 [up to 1.7e-3].
# bf16: 8-bit mantissa, 8x coarser than f16 (2^-8 = 3.9e-3 per rounding of weights and
#      activations): 5.7e-3 / 7.0e-3 [up to 9.8e-3].
# q8_0: weights quantised to 8 bits per 32-block and, in ggml's CPU matmul, the activations too;
#      on random Gaussian weights the error compounds over 4 layers: 2.5e-2 / 4.1e-2 [up to 5.6e-2].
# Each bound is about 3-5x the largest value seen. The loose bf16/q8_0 bounds only have to catch
# gross encoding errors (those give O(1) differences): the f32 and f16 runs catch every mistake
# listed in the module docstring, and test_tensor_data checks the stored values of every outtype
# exactly (q8_0: within its quantisation step).
REL_TOL = {"f32": 2e-3, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1.5e-1}

WORDS = (
    "the a of to and in is it that was for on are with as his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about how "
    "up out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came come "
    "work three word must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might "
    "next sound below saw something thought both few those always looked show large often together "
    "asked house don't world going want school important until form food keep children feet land "
    "side without boy once animals life enough took sometimes four head above kind began almost live "
    "page got earth need far hand high year mother light country father let night picture being "
    "study second eyes soon times story boys since white days paper hard near sentence better best "
    "across during today others however sure means knew it's try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point city "
    "play toward five using himself usually café naïve").split()

SENTENCES = [
    "Hello world, the 2024 time!",
    "The boy asked his mother where the school was.",
    "  leading spaces and  double  spaces ",
    "Line one\nLine two\n\nLine 3\ttab",
    "Ünïcödé café — naïve 😀 text",
    "numbers 1234567890 and 3.14159",
    "<start_of_turn>user\nhi<end_of_turn>",
    "a",
    "Those always looked like the old children's picture.",
]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                 "{{ m['content'] }}<end_of_turn>\n{% endfor %}")


def _text_lines(n: int = 150, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        s = s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!", ","])
        if rng.random() < 0.2:
            s += f" {rng.randint(0, 2025)}"
        lines.append(s)
    return lines


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """tokenizer.model (SentencePiece BPE trained here) + tokenizer.json/tokenizer_config.json +
    chat_template.jinja as transformers saves them for a GemmaTokenizer."""
    lines = _text_lines()
    assert len("\n".join(lines)) > 5000
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2)
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    tok = transformers.GemmaTokenizer.from_pretrained(str(d), add_bos_token=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    return d


def _randomize(model, seed: int) -> None:
    """Weights N(0, 0.1), norm weights N(0, 0.3) (HF initialises them to 0, i.e. a scale of 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            std = 0.3 if p.ndim == 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, sliding_window=SLIDING_WINDOW,
                  query_pre_attn_scalar=24, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma2":
        # alternating sliding/global layers (HF's and llama.cpp's Gemma 2 pattern); low caps bite
        return transformers.Gemma2Config(attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                         rope_theta=20000.0, **common)
    # every 2nd layer global; two RoPE bases; linear RoPE scaling of the global layers
    # (bases differ from llama.cpp's defaults of 10000 so that a missing key would show)
    return transformers.Gemma3TextConfig(
        sliding_window_pattern=2, rope_theta=100000.0, rope_local_base_freq=5000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, **common)


def causal_lm_class(arch: str):
    return transformers.Gemma2ForCausalLM if arch == "gemma2" else transformers.Gemma3ForCausalLM


def save_random_checkpoint(arch: str, config, randomize, seed: int, directory: Path, tokenizer_dir: Path,
                           **save_kwargs) -> None:
    """A Hugging Face checkpoint of `arch` with random weights (randomize(model) after torch's seed) and the
    test tokenizer, saved in directory (also used by tests/test_cuda_e2e.py)."""
    torch.manual_seed(seed)
    model = causal_lm_class(arch)(config)
    randomize(model)
    model.save_pretrained(str(directory), **save_kwargs)
    for f in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / f, directory / f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """{arch: {"dir", "ids", "ref"}}: saved checkpoint, 100-token input, transformers' logits."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(" ".join(_text_lines(40, seed=99))).input_ids[:N_INPUT]
    assert len(ids) == N_INPUT and ids[0] == 2
    out = {}
    for seed, arch in enumerate(("gemma2", "gemma3")):
        d = tmp_path_factory.mktemp(arch)
        # Gemma 2 sharded (model.safetensors.index.json + several shards), Gemma 3 one file
        save_random_checkpoint(arch, _config(arch, len(tok)), lambda m: _randomize(m, seed + 1), seed, d,
                               tokenizer_dir, max_shard_size="100KB" if arch == "gemma2" else "1GB")
        cls = causal_lm_class(arch)
        ref_model = cls.from_pretrained(str(d), attn_implementation="eager",
                                        dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0, -1].float().numpy()
        out[arch] = {"dir": d, "ids": ids, "ref": ref}
    assert len([f for f in os.listdir(out["gemma2"]["dir"]) if f.endswith(".safetensors")]) > 1
    assert (out["gemma2"]["dir"] / "model.safetensors.index.json").exists()
    return out


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """converted(arch, outtype) -> path of the GGUF (converted once per module)."""
    cache = {}
    outdir = tmp_path_factory.mktemp("gguf")

    def get(arch, outtype):
        if (arch, outtype) not in cache:
            dst = outdir / f"{arch}-{outtype}.gguf"
            res = convert_hf(checkpoints[arch]["dir"], dst, outtype=outtype)
            assert res.arch == arch and res.outtype == outtype
            cache[arch, outtype] = dst
        return cache[arch, outtype]
    return get


def engine_logits(path, ids):
    from pydhsa import Model
    with Model(path) as m:
        with m.session(n_ctx=256, n_threads=2) as s:
            s.prefill(ids)
            return m.info, s.logits()


def leftovers(d):
    return [f for f in os.listdir(d) if f.endswith(".tmp")]


# --- logits and tokenization against transformers -------------------------------------------------

@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_logits_match_transformers(checkpoints, converted, arch, outtype):
    ck = checkpoints[arch]
    info, got = engine_logits(converted(arch, outtype), ck["ids"])
    assert info.architecture == arch
    assert (info.n_layer, info.n_head, info.n_head_kv, info.head_dim, info.n_embd) == (4, 4, 2, 16, 64)
    assert info.n_swa == SLIDING_WINDOW and info.n_vocab == 400 and info.n_ctx_train == 512
    ref = ck["ref"]
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    print(f"{arch} {outtype}: max|diff| {diff:.3g}, max|logit| {scale:.3g}, rel {diff / scale:.3g}")
    assert diff <= REL_TOL[outtype] * scale, (arch, outtype, diff, scale)
    # the engine's top token is (one of) transformers' best within the tolerance
    assert ref[int(np.argmax(got))] >= ref.max() - 2 * REL_TOL[outtype] * scale


@pytest.mark.parametrize("layers", ["global", "all"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_dhsa_dense_ranges_match_transformers(checkpoints, converted, arch, layers):
    """Dense ranges through the engine's DHSA kernel (soft-capping included for Gemma 2, the sliding window
    kept exact by the mask with layers=all) equal transformers' dense attention."""
    from conftest import DENSE_RANGES
    from pydhsa import Model
    from pydhsa.dhsa_params import DhsaConfig

    ck = checkpoints[arch]
    cfg = DhsaConfig(min_context=0, layers=layers, dense_tail=0, **DENSE_RANGES)
    with Model(converted(arch, "f32")) as m:
        with m.session(n_ctx=256, n_threads=2, dhsa=cfg) as s:
            s.prefill(ck["ids"])
            got = s.logits()
            density = s.dhsa_density()
    expected_layers = [0, 1, 2, 3] if layers == "all" else [1, 3]  # every 2nd layer is global
    assert sorted(density.per_layer) == expected_layers and density.overall == pytest.approx(1.0)
    ref = ck["ref"]
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - ref).max()) <= REL_TOL["f32"] * scale


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_dhsa_sparse_runs_on_tiny_models(checkpoints, converted, arch):
    from pydhsa import Model
    from pydhsa.dhsa_params import DhsaConfig

    cfg = DhsaConfig(budget=0.3, min_context=0, chunk_min=4, chunk_avg=8, chunk_max=16, q_block=16, sink_tokens=4,
                     local_tokens=8, dense_tail=0)
    with Model(converted(arch, "f32")) as m:
        with m.session(n_ctx=256, n_threads=2, dhsa=cfg) as s:
            s.prefill(checkpoints[arch]["ids"])
            assert np.isfinite(s.logits()).all()
            assert s.dhsa_density().overall < 0.8


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.json"])
def test_tokenization_matches_hf(checkpoints, tmp_path, source, capsys):
    from pydhsa import Model
    src = checkpoints["gemma3"]["dir"]
    if source == "tokenizer.json":  # a folder without tokenizer.model
        d = tmp_path / "ck"
        shutil.copytree(src, d)
        (d / "tokenizer.model").unlink()
        src = d
    dst = tmp_path / "t.gguf"
    res = convert_hf(src, dst, outtype="f32")
    assert any("tokenizer.json" in n for n in res.notes) == (source == "tokenizer.json")
    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoints["gemma3"]["dir"]))
    with Model(dst) as m:
        assert m.info.add_bos
        for s in SENTENCES:
            want = tok(s).input_ids
            assert want[0] == tok.bos_token_id
            assert m.tokenize(s, True) == want, s
            assert m.tokenize(s, False) == tok(s, add_special_tokens=False).input_ids, s
        assert m.detokenize(tok(SENTENCES[1], add_special_tokens=False).input_ids) == SENTENCES[1]


# --- what the file holds --------------------------------------------------------------------------

def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_metadata(checkpoints, converted):
    _, g2 = _fields(converted("gemma2", "f16"))
    _, g3 = _fields(converted("gemma3", "q8_0"))
    for a, kv in (("gemma2", g2), ("gemma3", g3)):
        assert kv["general.architecture"] == a
        assert kv[f"{a}.context_length"] == 512 and kv[f"{a}.embedding_length"] == 64
        assert kv[f"{a}.block_count"] == 4 and kv[f"{a}.feed_forward_length"] == 128
        assert kv[f"{a}.attention.head_count"] == 4 and kv[f"{a}.attention.head_count_kv"] == 2
        assert kv[f"{a}.attention.key_length"] == 16 and kv[f"{a}.attention.value_length"] == 16
        assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
        assert kv[f"{a}.attention.sliding_window"] == SLIDING_WINDOW
        assert kv[f"{a}.attention.sliding_window_pattern"] == 2
        assert kv["tokenizer.ggml.model"] == "llama"
        assert len(kv["tokenizer.ggml.tokens"]) == 400
        assert kv["tokenizer.ggml.tokens"][:4] == ["<pad>", "<eos>", "<bos>", "<unk>"]
        assert kv["tokenizer.ggml.token_type"][:8] == [3, 3, 3, 2, 4, 4, 4, 6]  # ctrl, unk, user, byte
        assert len(kv["tokenizer.ggml.scores"]) == 400
        assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
                kv["tokenizer.ggml.unknown_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (2, 1, 3, 0)
        assert bool(kv["tokenizer.ggml.add_bos_token"]) and not bool(kv["tokenizer.ggml.add_eos_token"])
        assert not bool(kv["tokenizer.ggml.add_space_prefix"])
        assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
        assert not any(".dhsa." in k for k in kv)
    assert g2["general.file_type"] == 1 and g3["general.file_type"] == 7
    assert g2["gemma2.attn_logit_softcapping"] == 2.0 and g2["gemma2.final_logit_softcapping"] == 3.0
    assert g2["gemma2.rope.freq_base"] == 20000.0
    assert "gemma2.rope.scaling.type" not in g2
    assert g3["gemma3.rope.freq_base"] == 100000.0 and g3["gemma3.rope.freq_base_swa"] == 5000.0
    assert g3["gemma3.rope.scaling.type"] == "linear" and g3["gemma3.rope.scaling.factor"] == 2.0
    assert "gemma3.final_logit_softcapping" not in g3 and "gemma3.attn_logit_softcapping" not in g3


def _load_weights(ck_dir):
    """{HF name: tensor} of every safetensors file in ck_dir (torch: safetensors' numpy has no bfloat16)."""
    from safetensors.torch import load_file
    hf = {}
    for f in sorted(os.listdir(ck_dir)):
        if f.endswith(".safetensors"):
            hf.update(load_file(str(ck_dir / f)))
    return hf


def _expected_tensors(arch, ck_dir):
    """GGUF name -> float32 values the converter must store (before the outtype's rounding)."""
    hf = {k: v.float().numpy() for k, v in _load_weights(ck_dir).items()}
    fold = (24 ** -0.5) / (16 ** -0.5)   # HF query scale / llama.cpp's 1/sqrt(head_dim)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    out = {}
    for name, a in hf.items():
        a = a.astype(np.float32)
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = a
            continue
        if name == "model.norm.weight":
            out["output_norm.weight"] = a + 1
            continue
        _, _, i, rest = name.split(".", 3)
        key = rest[:-len(".weight")]
        if a.ndim == 1:
            a = a + 1                          # Gemma's (1 + w) RMSNorm
        if (arch == "gemma2" and key == "self_attn.q_proj") or (arch == "gemma3" and key == "self_attn.q_norm"):
            a = a * np.float32(fold)
        out[f"blk.{i}.{names[key]}.weight"] = a
    return out


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tensor_data(checkpoints, converted, arch):
    """Every stored tensor, for every outtype: norms f32 with 1 + w, the query scale folded in,
    2-D tensors encoded exactly as numpy/torch round them (q8_0 within half a quantisation step)."""
    expected = _expected_tensors(arch, checkpoints[arch]["dir"])
    assert len(expected) == (46 if arch == "gemma2" else 54)
    T = gguf.GGMLQuantizationType
    want_type = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
    for outtype in OUTTYPES:
        r = gguf.GGUFReader(str(converted(arch, outtype)))
        assert sorted(t.name for t in r.tensors) == sorted(expected)
        for t in r.tensors:
            e = expected[t.name]
            assert tuple(int(x) for x in t.shape) == tuple(reversed(e.shape)), t.name
            if e.ndim == 1:
                assert t.tensor_type == T.F32, t.name
                assert np.array_equal(np.asarray(t.data), e), t.name
                continue
            assert t.tensor_type == want_type[outtype], (t.name, outtype)
            data = np.asarray(t.data)
            if outtype == "f32":
                assert np.array_equal(data, e), t.name
            elif outtype == "f16":
                assert np.array_equal(data.view(np.uint16), e.astype(np.float16).view(np.uint16)), t.name
            elif outtype == "bf16":
                bits = torch.from_numpy(e).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                assert np.array_equal(data.view(np.uint16).reshape(bits.shape), bits), t.name
            else:
                deq = gguf.quants.dequantize(data, T.Q8_0).reshape(e.shape)
                # half a step of d = amax/127, plus d's own f16 rounding times |q| <= 127
                step = np.abs(e.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
                bound = 0.5 * step + 127 * step * 2.0 ** -11 + 1e-7
                assert np.all(np.abs(deq - e).reshape(-1, 32) <= bound), t.name


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_streamed_in_row_blocks(checkpoints, converted, tmp_path, monkeypatch, outtype):
    """Tensors are read, converted and written in blocks of rows; tiny blocks give the same file."""
    monkeypatch.setattr(hf_checkpoint, "CHUNK_BYTES", 1000)  # 3 rows of 64 floats at a time
    seen = []
    real = hf_gemma.encode
    monkeypatch.setattr(hf_gemma, "encode", lambda item, data: seen.append(len(data)) or real(item, data))
    dst = tmp_path / "o.gguf"
    convert_hf(checkpoints["gemma2"]["dir"], dst, outtype=outtype)
    assert max(seen) == 64 and seen.count(3) > 100   # 64-element norms in one block; 3-row blocks
    assert dst.read_bytes() == converted("gemma2", outtype).read_bytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_checkpoint_dtypes(checkpoints, tmp_path, monkeypatch, dtype):
    """A bf16 checkpoint (Gemma's published dtype: read by our own few lines, see hf_checkpoint) and an f16
    one (read by the safetensors library) convert to f32 with their exact values, also in 3-row blocks."""
    from safetensors.torch import save_file
    d = _copy(checkpoints, "gemma3", tmp_path)
    weights = {k: v.to(getattr(torch, dtype)) for k, v in _load_weights(d).items()}
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    expected = _expected_tensors("gemma3", d)
    dst = tmp_path / "o.gguf"
    convert_hf(d, dst, outtype="f32")
    r = gguf.GGUFReader(str(dst))
    assert sorted(t.name for t in r.tensors) == sorted(expected)
    for t in r.tensors:
        assert np.array_equal(np.asarray(t.data).reshape(expected[t.name].shape), expected[t.name]), t.name
    monkeypatch.setattr(hf_checkpoint, "CHUNK_BYTES", 1000)
    convert_hf(d, tmp_path / "blocks.gguf", outtype="f32")
    assert (tmp_path / "blocks.gguf").read_bytes() == dst.read_bytes()


def test_encoded_bytes_match_references():
    """bf16 bytes are torch's (round to nearest even, ties included); q8_0 bytes are ggml's reference
    quantize_row_q8_0 (d = amax/127 stored as f16, q = roundf(x * (1/d)), halves away from zero), written
    out here in numpy; f16 is numpy's float16."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 64)) * rng.choice([1e-3, 1.0, 30.0], (16, 1))).astype(np.float32)
    x[0] = ((np.arange(64, dtype=np.uint32) << 16) + np.uint32(0x3F808000)).view(np.float32)  # bf16 ties
    x[1, :32] = 0.0                                                    # an all-zero q8_0 block
    x[2, :32] = [127.0, -127.0] + [(k // 2 + 0.5) * (-1) ** k for k in range(30)]  # d = 1: q8_0 ties
    T = gguf.GGMLQuantizationType

    def enc(t):
        return hf_tensors.encode(hf_tensors.PlanItem("t", None, x.shape, ggml_type=t), x)
    bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(enc(T.BF16).view(np.uint16), bits)
    assert np.array_equal(enc(T.F16).view(np.uint16), x.astype(np.float16).view(np.uint16))
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
    v = (blocks * inv).astype(np.float64)                              # x * id in float32, as ggml
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)       # roundf
    want = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    assert np.array_equal(enc(T.Q8_0).reshape(-1, 34), want)
    assert list(q[4, :6]) == [127, -127, 1, -1, 2, -2]   # x[2]: blocks 4 and 5


def test_vocab_is_what_sentencepiece_reports(checkpoints):
    """tokenizer.model read through sentencepiece's model schema gives the pieces, scores and types that
    SentencePieceProcessor reports, and the normalizer flags the tokenizer was trained with."""
    path = str(checkpoints["gemma3"]["dir"] / "tokenizer.model")
    v = hf_tokenizer.read_sentencepiece(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.get_piece_size()
    assert v.tokens == [sp.id_to_piece(i) for i in range(n)]
    assert v.scores == [sp.get_score(i) for i in range(n)]
    tt = hf_tokenizer
    for i, t in enumerate(v.types):
        assert (t == tt.TT_CONTROL, t == tt.TT_UNKNOWN, t == tt.TT_BYTE, t == tt.TT_UNUSED) == \
            (sp.is_control(i), sp.is_unknown(i), sp.is_byte(i), sp.is_unused(i)), i
    assert v.types.count(tt.TT_USER_DEFINED) == 3   # <mask>, <start_of_turn>, <end_of_turn>
    assert (v.add_space_prefix, v.remove_extra_whitespaces) == (False, False)


@pytest.mark.parametrize("module, package", [("safetensors", "safetensors"),
                                             ("sentencepiece.sentencepiece_model_pb2", "sentencepiece"),
                                             ("google.protobuf.message", "protobuf")])
def test_missing_library_is_one_line(checkpoints, tmp_path, capsys, monkeypatch, module, package):
    """Without a library of the convert extra: one error line naming it and the install command, exit 2."""
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    dst = tmp_path / "o.gguf"
    with pytest.raises(hf_gemma.MissingLibraryError):
        convert_hf(checkpoints["gemma3"]["dir"], dst)
    rc, out, err = run_pydhsa(capsys, "convert", checkpoints["gemma3"]["dir"], dst)
    line = one_error(err)
    assert rc == 2 and out == "" and f"needs the '{package}' package" in line
    assert line.endswith('pip install "pydhsa[convert]"')
    assert os.listdir(tmp_path) == []


def test_library_that_does_not_import_is_one_line(tmp_path, monkeypatch):
    """A library that fails on import (protobuf's VersionError when sentencepiece's schema was generated for a
    newer protobuf) gives a MissingLibraryError naming it, not a traceback."""
    (tmp_path / "broken_schema_pb2.py").write_text("raise RuntimeError('gencode 7.36.1 needs runtime >= 7.36.1')")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(hf_gemma.MissingLibraryError, match=r"cannot import broken_schema_pb2 \(RuntimeError: "
                                                            r"gencode 7\.36\.1.*pip install --upgrade"):
        hf_checkpoint.require("broken_schema_pb2")


def test_untied_output_projection(checkpoints, tmp_path):
    """tie_word_embeddings = false: Gemma 3's lm_head becomes output.weight (llama.cpp's gemma3
    loads it when present); Gemma 2's graph has no separate output, so that is refused."""
    from safetensors.numpy import load_file, save_file
    for arch in ("gemma3", "gemma2"):
        d = _copy(checkpoints, arch, tmp_path)
        for f in os.listdir(d):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.unlink(d / f)
        weights = {}
        for f in os.listdir(checkpoints[arch]["dir"]):
            if f.endswith(".safetensors"):
                weights.update(load_file(str(checkpoints[arch]["dir"] / f)))
        rng = np.random.default_rng(5)
        weights["lm_head.weight"] = (rng.standard_normal((400, 64)) * 0.1).astype(np.float32)
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
        _edit_config(d, tie_word_embeddings=False)
        if arch == "gemma2":
            with pytest.raises(hf_gemma.UnsupportedArchitectureError, match="untied lm_head"):
                convert_hf(d, tmp_path / "o2.gguf")
            assert leftovers(tmp_path) == [] and not (tmp_path / "o2.gguf").exists()
            continue
        ids = checkpoints[arch]["ids"]
        ref_model = transformers.Gemma3ForCausalLM.from_pretrained(
            str(d), attn_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(ref - checkpoints[arch]["ref"]).max() > 0.1  # lm_head is really used
        dst = tmp_path / "o3.gguf"
        convert_hf(d, dst, outtype="f32")
        r = gguf.GGUFReader(str(dst))
        assert "output.weight" in [t.name for t in r.tensors] and len(r.tensors) == 55
        _, got = engine_logits(dst, ids)
        assert np.abs(got - ref).max() <= REL_TOL["f32"] * np.abs(ref).max()


def test_legacy_config_layout(checkpoints, tmp_path):
    """transformers < 5 config.json (rope_theta / rope_local_base_freq / rope_scaling /
    sliding_window_pattern, no layer_types / rope_parameters) gives the same hyperparameters."""
    for arch in ("gemma2", "gemma3"):
        src = checkpoints[arch]["dir"]
        cfg = json.loads((src / "config.json").read_text())
        for k in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
            cfg.pop(k, None)
        if arch == "gemma2":
            cfg.update(rope_theta=20000.0)
        else:
            cfg.update(rope_theta=100000.0, rope_local_base_freq=5000.0, sliding_window_pattern=2,
                       rope_scaling={"rope_type": "linear", "factor": 2.0})
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        assert read_hf_config(d) == read_hf_config(src)
        hp = read_hf_config(d)
        assert hp.swa_layers == [True, False, True, False] and hp.swa_pattern == 2


# --- CLI ------------------------------------------------------------------------------------------

def run_pydhsa(capsys, *argv):
    from pydhsa.cli import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err, prefix="pydhsa: error: "):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_cli_convert_folder(checkpoints, tmp_path, capsys):
    src = checkpoints["gemma3"]["dir"]
    dst = tmp_path / "o.gguf"
    rc, out, err = run_pydhsa(capsys, "convert", src, dst, "--outtype", "q8_0",
                              "--dhsa-budget", "0.25", "--dhsa-layers", "all")
    assert rc == 0 and err == "", err
    assert out.startswith(f"wrote {dst}: gemma3, 54 tensors (q8_0), 400 tokens; "
                          f"set gemma3.dhsa.budget=0.25, gemma3.dhsa.layers=all")
    assert read_gguf_dhsa(dst) == {"budget": 0.25, "layers": "all"}
    assert leftovers(tmp_path) == []
    # default outtype is f16; --write-defaults writes every DHSA key
    rc, out, err = run_pydhsa(capsys, "convert", src, tmp_path / "p.gguf", "--write-defaults", "-q")
    assert rc == 0 and out == "" and err == ""
    _, kv = _fields(tmp_path / "p.gguf")
    assert kv["general.file_type"] == 1 and set(read_gguf_dhsa(tmp_path / "p.gguf")) == set(PARAM_NAMES)
    # bad DHSA values are rejected before anything is written
    rc, _, err = run_pydhsa(capsys, "convert", src, tmp_path / "q.gguf", "--dhsa-budget", "2")
    assert rc == 2 and "--dhsa-budget" in one_error(err)
    assert not (tmp_path / "q.gguf").exists()


def test_cli_outtype_rejected_for_gguf_input(converted, tmp_path, capsys):
    src = converted("gemma3", "f32")
    rc, _, err = run_pydhsa(capsys, "convert", src, tmp_path / "o.gguf", "--outtype", "f16")
    assert rc == 2 and "--outtype" in one_error(err)
    rc, _, err = run_pydhsa(capsys, "convert", src, tmp_path / "o.gguf", "--outtype", "q4_0")
    assert rc == 2 and not (tmp_path / "o.gguf").exists()
    rc, _, err = run_pydhsa(capsys, "convert", src, tmp_path / "o.gguf", "--dhsa-budget", "0.5")
    assert rc == 0


# --- errors ---------------------------------------------------------------------------------------

def _copy(checkpoints, arch, tmp_path):
    d = tmp_path / f"ck-{arch}"
    shutil.copytree(checkpoints[arch]["dir"], d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _assert_fails(capsys, tmp_path, src, dst, match, rc_want=2, exc=ConvertError):
    with pytest.raises(exc, match=re.escape(match)):
        convert_hf(src, dst)
    rc, out, err = run_pydhsa(capsys, "convert", src, dst)
    assert rc == rc_want and match in one_error(err) and out == ""
    assert not os.path.exists(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    assert not os.path.isdir(parent) or leftovers(parent) == []


def test_error_unsupported_architecture(checkpoints, tmp_path, capsys):
    d = _copy(checkpoints, "gemma3", tmp_path)
    _edit_config(d, architectures=["LlamaForCausalLM"])
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "unsupported architecture 'LlamaForCausalLM'",
                  exc=hf_gemma.UnsupportedArchitectureError)
    _edit_config(d, architectures=["Gemma3ForConditionalGeneration"])
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "only text-only Gemma3ForCausalLM")
    _edit_config(d, architectures=["Gemma3ForCausalLM"], hidden_activation="silu")
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "activation 'silu' is not supported")
    (d / "config.json").unlink()
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "not a Hugging Face checkpoint: no config.json")


def test_error_missing_files(checkpoints, tmp_path, capsys):
    d = _copy(checkpoints, "gemma2", tmp_path)
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    (d / shard).unlink()
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", f"missing safetensors shard {shard}",
                  exc=hf_gemma.CheckpointFileError)
    d3 = _copy(checkpoints, "gemma3", tmp_path)
    (d3 / "model.safetensors").unlink()
    _assert_fails(capsys, tmp_path, d3, tmp_path / "o.gguf", "no *.safetensors files")
    d3b = _copy(checkpoints, "gemma3", tmp_path / "b")
    (d3b / "tokenizer.model").unlink()
    (d3b / "tokenizer.json").unlink()
    _assert_fails(capsys, tmp_path, d3b, tmp_path / "o.gguf", "no tokenizer")
    d3d = _copy(checkpoints, "gemma3", tmp_path / "d")
    (d3d / "tokenizer.model").write_bytes(b"\xff\xff\xff not a model")
    _assert_fails(capsys, tmp_path, d3d, tmp_path / "o.gguf", "not a SentencePiece model")
    d3c = _copy(checkpoints, "gemma3", tmp_path / "c")
    with open(d3c / "model.safetensors", "r+b") as f:  # a download cut short
        f.truncate(os.path.getsize(d3c / "model.safetensors") - 100)
    _assert_fails(capsys, tmp_path, d3c, tmp_path / "o.gguf", "not a valid safetensors file, truncated or corrupt")
    with pytest.raises(hf_gemma.CheckpointFileError, match="input directory not found"):
        convert_hf(tmp_path / "nope", tmp_path / "o.gguf")
    rc, _, err = run_pydhsa(capsys, "convert", tmp_path / "nope", tmp_path / "o.gguf")
    assert rc == 2 and "input file not found" in one_error(err)


def test_error_shapes_inconsistent_with_config(checkpoints, tmp_path, capsys):
    d = _copy(checkpoints, "gemma3", tmp_path)
    _edit_config(d, intermediate_size=96)
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "has shape [128, 64], config.json implies [96, 64]",
                  exc=hf_gemma.TensorShapeError)
    _edit_config(d, intermediate_size=128, num_key_value_heads=4)
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "'model.layers.0.self_attn.k_proj.weight' has shape")
    _edit_config(d, num_key_value_heads=2, num_hidden_layers=5,
                 layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"])
    _assert_fails(capsys, tmp_path, d, tmp_path / "o.gguf", "'model.layers.4.")


def test_error_output_equals_input(checkpoints, tmp_path, capsys):
    d = _copy(checkpoints, "gemma3", tmp_path)
    before = (d / "model.safetensors").read_bytes()
    with pytest.raises(ConvertError, match="same path as the input"):
        convert_hf(d, d)
    rc, _, err = run_pydhsa(capsys, "convert", d, d)
    assert rc == 2 and "same path as the input" in one_error(err)
    with pytest.raises(ConvertError, match="same file as the input"):
        convert_hf(d, d / "model.safetensors")
    rc, _, err = run_pydhsa(capsys, "convert", d, d / "model.safetensors")
    assert rc == 2 and "same file as the input" in one_error(err)
    assert (d / "model.safetensors").read_bytes() == before and leftovers(d) == []


def test_error_unwritable_directory(checkpoints, tmp_path, capsys, monkeypatch):
    """The output directory cannot take the temporary file: one error line, exit status 1 (the
    converter's status for output I/O failures, as for GGUF input), nothing left behind."""
    src = checkpoints["gemma3"]["dir"]
    out_dir = tmp_path / "ro"
    out_dir.mkdir()

    def deny(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(gguf_dhsa, "make_temp", deny)  # the converters' output_temp lives there
    _assert_fails(capsys, tmp_path, src, out_dir / "o.gguf", "cannot create output", rc_want=1,
                  exc=ConvertIOError)
    monkeypatch.undo()
    _assert_fails(capsys, tmp_path, src, tmp_path / "no" / "dir" / "o.gguf",
                  "output directory does not exist", rc_want=1, exc=ConvertIOError)
    assert os.listdir(out_dir) == []


def test_failure_while_writing_leaves_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    src = checkpoints["gemma2"]["dir"]
    dst = tmp_path / "o.gguf"
    dst.write_bytes(b"previous output")  # must survive a failed conversion untouched
    real = hf_gemma.encode
    calls = []

    def full(item, data):
        calls.append(item.gguf_name)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(item, data)
    monkeypatch.setattr(hf_gemma, "encode", full)
    with pytest.raises(ConvertIOError, match="disk full"):
        convert_hf(src, dst)
    calls.clear()
    rc, _, err = run_pydhsa(capsys, "convert", src, dst)
    assert rc == 1 and "disk full" in one_error(err)
    assert dst.read_bytes() == b"previous output"
    assert sorted(os.listdir(tmp_path)) == ["o.gguf"]


def test_gguf_converter_unchanged_for_files(tmp_path, capsys):
    """A directory goes to the HF converter; `python -m pydhsa_convert gguf DIR OUT` names the problem."""
    rc = gguf_dhsa.main(["gguf", str(tmp_path), str(tmp_path / "o.gguf")])
    _, err = capsys.readouterr()
    assert rc == 2 and "directory" in one_error(err, prefix="error: ")  # python -m pydhsa_convert's own prefix
