"""Hugging Face Gemma 2 / Gemma 3 (text-only) checkpoint folder -> GGUF (``gemma2`` / ``gemma3``).

Input: a folder as ``save_pretrained`` writes it: ``config.json`` (``Gemma2ForCausalLM`` or
``Gemma3ForCausalLM``), ``*.safetensors`` (one file, or shards listed in
``model.safetensors.index.json``), ``tokenizer.model`` (SentencePiece; else ``tokenizer.json``),
``tokenizer_config.json``, optionally ``generation_config.json`` and ``chat_template.jinja``.

Output: a GGUF file that upstream llama.cpp loads as ``gemma2`` / ``gemma3``:

- hyperparameters (context, embedding, FFN, layers, heads, KV heads, key/value length, RMS eps,
  RoPE bases and linear RoPE scaling, sliding window and its per-layer pattern, logit soft-capping);
- the SentencePiece vocabulary (tokens, scores, token types, special token ids, add-BOS/EOS,
  space prefix, chat template);
- the weights as f32, f16, bf16 or q8_0 (1-D tensors, i.e. norms, always f32, as llama.cpp does;
  a q8_0 tensor whose rows are not a multiple of 32 falls back to f16);
- optional ``<arch>.dhsa.*`` keys (validated like every other DHSA value).

How the weights are rewritten for llama.cpp's graphs (``src/models/gemma2.cpp``, ``gemma3.cpp``):

- Gemma's RMSNorm multiplies by ``(1 + weight)``, llama.cpp by ``weight``: every norm weight is
  stored as ``1 + weight`` (q/k norms of Gemma 3 included).
- llama.cpp ignores ``query_pre_attn_scalar``: it scales queries by ``1/sqrt(head_dim)``, or by
  ``1/sqrt(hidden_size/num_heads)`` for the 27B sizes it recognises by layer count (46 layers for
  Gemma 2, 62 for Gemma 3). When the checkpoint's ``query_pre_attn_scalar**-0.5`` differs, the
  ratio is folded into the query path (Gemma 2: ``q_proj``; Gemma 3: the q-norm weight, applied
  after the norm and before the linear RoPE), so the attention logits are exactly Hugging Face's.
- The embedding stays unscaled (llama.cpp multiplies by ``sqrt(hidden_size)`` itself); the output
  projection is the tied embedding (an untied ``lm_head`` becomes ``output.weight`` for Gemma 3).

Tensors are read one at a time from the safetensors files (``seek`` + ``read`` of blocks of
whole rows, at most ``CHUNK_BYTES`` of float32 each; bf16 is decoded without torch), converted and
written straight to the output, so memory holds one block of rows, not a tensor or the model. The output goes to a temporary file in the output's directory and is renamed
only when complete; on any error the temporary file is removed.

Library API: ``convert_hf(src_dir, dst, outtype="f16", set_values=None, ...) -> HfConvertResult``,
``read_hf_config(src_dir) -> GemmaHParams``, ``is_hf_checkpoint(path)``.
Errors: ``ConvertError`` subclasses (bad input; exit status 2 through the CLI) and
``ConvertIOError`` (the output could not be written; exit status 1, as for GGUF input).
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, TextIO

import numpy as np

from .gguf_dhsa import (
    AUTO_PROGRESS_MIN_BYTES,
    ConvertError,
    ConvertIOError,
    _isatty,
    _Progress,
    fsync_directory,
    output_temp,
    write_error,
)
from pydhsa.dhsa_params import (
    PARAMS,
    PARAMS_BY_NAME,
    DhsaParamError,
    config_from_values,
    gguf_key,
)

__all__ = [
    "OUTTYPES", "DEFAULT_OUTTYPE", "SUPPORTED_ARCHITECTURES", "HfConvertError",
    "UnsupportedArchitectureError", "CheckpointFileError", "TensorShapeError", "GemmaHParams",
    "HfConvertResult", "is_hf_checkpoint", "read_hf_config", "convert_hf",
]

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"
SUPPORTED_ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}

# llama.cpp's 27B special case (src/models/gemma2.cpp / gemma3.cpp): layer count -> that size.
_LLAMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's default sliding-window layer pattern when the file has no pattern key.
_DEFAULT_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# Stand-in for "no soft-capping" where llama.cpp's gemma2 graph always caps:
# tanh(x / C) * C == x * (1 - x^2 / (3 C^2) + ...), i.e. a relative change below 1e-9 for |x| < 50.
_NO_SOFTCAP = 1.0e6

# GGUF value types / ggml types / llama file types (numbering fixed by the format)
_GGML_F32, _GGML_F16, _GGML_Q8_0, _GGML_BF16 = 0, 1, 8, 30
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
_QK8_0 = 32
CHUNK_BYTES = 64 << 20   # float32 bytes of one block of rows read, converted and written at once

# llama token types (== SentencePiece piece types)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


class HfConvertError(ConvertError):
    """The Hugging Face checkpoint cannot be converted (bad or inconsistent input)."""


class UnsupportedArchitectureError(HfConvertError):
    """config.json names an architecture (or a feature) this converter does not handle."""


class CheckpointFileError(HfConvertError):
    """A checkpoint file is missing, unreadable or corrupt."""


class TensorShapeError(HfConvertError):
    """A tensor is missing, unexpected, or its shape does not match config.json."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a directory (the converter then treats it as a Hugging Face checkpoint)."""
    return os.path.isdir(os.fspath(path))


def _read_json(path: str, what: str, required: bool = True) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise CheckpointFileError(f"{what} not found: {path}") from None
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointFileError(f"{what} {path} is not valid JSON: {e}") from None


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _first_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], int) and not isinstance(v[0], bool):
        return v[0]
    return None


# --------------------------------------------------------------------------------------------
# config.json -> hyperparameters
# --------------------------------------------------------------------------------------------

@dataclass
class GemmaHParams:
    arch: str                       # "gemma2" | "gemma3"
    hf_architecture: str
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    vocab_size: int
    rope_theta: float               # global (full-attention) layers
    rope_theta_local: float         # sliding-window layers
    rope_scaling_factor: float | None   # linear scaling of the global layers (None: none)
    sliding_window: int             # 0: no sliding-window layers
    swa_layers: list[bool]          # per layer: True = sliding window
    swa_pattern: int | None         # llama.cpp's integer pattern when it matches swa_layers
    attn_softcap: float | None
    final_softcap: float | None
    query_pre_attn_scalar: float
    tie_word_embeddings: bool
    q_scale_fold: float             # factor folded into the query path (1.0: none)
    notes: list[str] = field(default_factory=list)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


def _cfg_int(cfg: Mapping[str, Any], key: str, default: int | None = None, lo: int = 1) -> int:
    v = cfg.get(key, default)
    if v is None:
        raise HfConvertError(f"config.json: missing {key!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise HfConvertError(f"config.json: {key} must be an integer, got {v!r}")
    if v < lo:
        raise HfConvertError(f"config.json: {key} must be >= {lo}, got {v}")
    return v


def _cfg_float(cfg: Mapping[str, Any], key: str, default: float | None = None,
               positive: bool = True) -> float | None:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HfConvertError(f"config.json: {key} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0):
        raise HfConvertError(f"config.json: {key} must be a positive number, got {v!r}")
    return v


def _rope_entry(d: Any, where: str) -> tuple[float | None, float | None]:
    """(theta, linear factor or None) from a rope parameter dict."""
    if d is None:
        return None, None
    if not isinstance(d, dict):
        raise HfConvertError(f"config.json: {where} must be an object, got {d!r}")
    theta = d.get("rope_theta")
    if theta is not None:
        theta = _cfg_float(d, "rope_theta")
    rtype = d.get("rope_type", d.get("type", "default"))
    if rtype in (None, "default"):
        return theta, None
    if rtype == "linear":
        factor = _cfg_float(d, "factor")
        if factor is None:
            raise HfConvertError(f"config.json: {where}: linear RoPE scaling without a factor")
        return theta, (None if factor == 1.0 else factor)
    raise UnsupportedArchitectureError(
        f"config.json: {where}: RoPE scaling type {rtype!r} is not supported "
        f"(supported: default, linear)")


def _rope_params(cfg: Mapping[str, Any], arch: str
                 ) -> tuple[float, float, float | None]:
    """(global theta, local theta, global linear factor) from either config layout:
    transformers >= 5 (``rope_parameters``, possibly per layer type) or the older
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
    rp = cfg.get("rope_parameters")
    g_theta = l_theta = g_factor = l_factor = None
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        g_theta, g_factor = _rope_entry(rp.get("full_attention"), "rope_parameters.full_attention")
        l_theta, l_factor = _rope_entry(rp.get("sliding_attention"),
                                        "rope_parameters.sliding_attention")
    elif isinstance(rp, dict):
        g_theta, g_factor = _rope_entry(rp, "rope_parameters")
        l_theta, l_factor = g_theta, g_factor
    elif rp is not None:
        raise HfConvertError(f"config.json: rope_parameters must be an object, got {rp!r}")
    # older layout (also fills what rope_parameters left out)
    if g_theta is None:
        g_theta = _cfg_float(cfg, "rope_theta", 10000.0)
    if g_factor is None and rp is None:
        _, g_factor = _rope_entry(cfg.get("rope_scaling"), "rope_scaling")
    if arch == "gemma3":
        if l_theta is None:
            l_theta = _cfg_float(cfg, "rope_local_base_freq", 10000.0)
        # HF Gemma 3 never scales the local RoPE; llama.cpp neither (freq_scale_swa = 1)
        if l_factor is not None:
            raise UnsupportedArchitectureError(
                "config.json: RoPE scaling of the sliding-window layers is not supported")
    else:
        if l_theta is None:
            l_theta = g_theta
        if rp is None:
            l_factor = g_factor
        # llama.cpp's gemma2 uses the global scale for the sliding-window layers too
        if l_factor != g_factor:
            raise UnsupportedArchitectureError(
                "config.json: different RoPE scaling for sliding-window and global layers is "
                "not supported for Gemma 2")
    return float(g_theta), float(l_theta), g_factor


def _layer_pattern(cfg: Mapping[str, Any], arch: str, n_layer: int, window: int
                   ) -> tuple[list[bool], int | None]:
    """Per-layer sliding-window flags, and llama.cpp's integer pattern when it reproduces them."""
    lt = cfg.get("layer_types")
    pat_cfg = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern"))
    if lt is not None:
        if not isinstance(lt, list) or len(lt) != n_layer:
            raise HfConvertError(f"config.json: layer_types must list {n_layer} layer types, "
                                 f"got {lt!r}")
        bad = [t for t in lt if t not in ("sliding_attention", "full_attention")]
        if bad:
            raise UnsupportedArchitectureError(f"config.json: unsupported layer type {bad[0]!r}")
        swa = [t == "sliding_attention" for t in lt]
    elif arch == "gemma2":
        swa = [il % 2 == 0 for il in range(n_layer)]      # HF Gemma 2: even layers slide
    else:
        n = pat_cfg if pat_cfg is not None else 6
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise HfConvertError(f"config.json: sliding_window_pattern must be a positive "
                                 f"integer, got {n!r}")
        swa = [bool((il + 1) % n) for il in range(n_layer)]  # HF Gemma 3: every n-th is global
    if window <= 0:
        if any(swa):
            raise HfConvertError("config.json: sliding-window layers but no sliding_window")
        return swa, None

    def fits(n: int) -> bool:
        return all(swa[il] == (il % n < n - 1) for il in range(n_layer))

    candidates = []
    if isinstance(pat_cfg, int) and not isinstance(pat_cfg, bool) and pat_cfg >= 1:
        candidates.append(pat_cfg)
    candidates.append(_DEFAULT_SWA_PATTERN[arch])
    candidates += range(1, n_layer + 2)
    for n in candidates:
        if fits(n):
            return swa, n
    return swa, None


def _hparams_from_config(cfg: Mapping[str, Any], where: str) -> GemmaHParams:
    if not isinstance(cfg, dict):
        raise HfConvertError(f"{where}: expected a JSON object")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise UnsupportedArchitectureError(
            f"{where}: no 'architectures' list; expected one of "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    hf_arch = archs[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        extra = ""
        if hf_arch == "Gemma3ForConditionalGeneration":
            extra = " (multimodal Gemma 3 checkpoints are not supported; only text-only " \
                    "Gemma3ForCausalLM)"
        raise UnsupportedArchitectureError(
            f"{where}: unsupported architecture {hf_arch!r}{extra}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    arch = SUPPORTED_ARCHITECTURES[hf_arch]
    notes: list[str] = []

    n_embd = _cfg_int(cfg, "hidden_size")
    n_ff = _cfg_int(cfg, "intermediate_size")
    n_layer = _cfg_int(cfg, "num_hidden_layers")
    if n_layer > 512:
        raise HfConvertError(f"config.json: num_hidden_layers {n_layer} exceeds llama.cpp's "
                             f"limit of 512")
    n_head = _cfg_int(cfg, "num_attention_heads")
    n_head_kv = _cfg_int(cfg, "num_key_value_heads", n_head)
    if n_head % n_head_kv:
        raise HfConvertError(f"config.json: num_attention_heads {n_head} is not a multiple of "
                             f"num_key_value_heads {n_head_kv}")
    head_dim = cfg.get("head_dim")
    head_dim = _cfg_int(cfg, "head_dim") if head_dim is not None else n_embd // n_head
    if head_dim % 2:
        raise HfConvertError(f"config.json: head_dim {head_dim} must be even (RoPE)")
    vocab = _cfg_int(cfg, "vocab_size")
    n_ctx = _cfg_int(cfg, "max_position_embeddings", 8192 if arch == "gemma2" else 131072)
    eps = _cfg_float(cfg, "rms_norm_eps", 1e-6)

    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise UnsupportedArchitectureError(
            f"config.json: activation {act!r} is not supported (llama.cpp's Gemma graphs use "
            f"the tanh-approximated GELU, 'gelu_pytorch_tanh')")
    if cfg.get("attention_bias"):
        raise UnsupportedArchitectureError("config.json: attention_bias = true is not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedArchitectureError(
            "config.json: use_bidirectional_attention = true (an embedding model) is not supported")

    window = cfg.get("sliding_window")
    if window is None:
        window = 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise HfConvertError(f"config.json: sliding_window must be a non-negative integer, "
                             f"got {window!r}")
    swa, pattern = _layer_pattern(cfg, arch, n_layer, window)
    if arch == "gemma2" and window == 0 and not any(swa):
        swa, pattern = [False] * n_layer, 1

    g_theta, l_theta, factor = _rope_params(cfg, arch)

    attn_cap = _cfg_float(cfg, "attn_logit_softcapping")
    final_cap = _cfg_float(cfg, "final_logit_softcapping")
    if arch == "gemma3" and attn_cap is not None:
        raise UnsupportedArchitectureError(
            "config.json: attn_logit_softcapping is not supported for Gemma 3 (llama.cpp's "
            "gemma3 graph has no attention soft-capping)")
    if arch == "gemma2":
        if attn_cap is None:
            notes.append(f"attn_logit_softcapping is null: wrote {_NO_SOFTCAP:g} (llama.cpp's "
                         f"gemma2 graph always caps; this cap changes nothing measurable)")
        if final_cap is None:
            notes.append(f"final_logit_softcapping is null: wrote {_NO_SOFTCAP:g}")

    qpas = _cfg_float(cfg, "query_pre_attn_scalar", float(head_dim))
    if n_layer == _LLAMA_27B_LAYERS[arch]:
        llama_scale = 1.0 / math.sqrt(float(n_embd // n_head))
    else:
        llama_scale = 1.0 / math.sqrt(float(head_dim))
    hf_scale = qpas ** -0.5
    fold = hf_scale / llama_scale
    if abs(fold - 1.0) < 1e-7:
        fold = 1.0
    else:
        notes.append(f"query_pre_attn_scalar {qpas:g}: folded the factor {fold:.6g} into the "
                     f"query {'projection' if arch == 'gemma2' else 'norm'} (llama.cpp scales "
                     f"queries by {llama_scale:.6g})")

    tie = cfg.get("tie_word_embeddings", True)
    return GemmaHParams(
        arch=arch, hf_architecture=hf_arch, n_ctx_train=n_ctx, n_embd=n_embd, n_ff=n_ff,
        n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, rms_eps=eps,
        vocab_size=vocab, rope_theta=g_theta, rope_theta_local=l_theta,
        rope_scaling_factor=factor, sliding_window=window, swa_layers=swa, swa_pattern=pattern,
        attn_softcap=attn_cap, final_softcap=final_cap, query_pre_attn_scalar=qpas,
        tie_word_embeddings=bool(tie), q_scale_fold=fold, notes=notes)


def read_hf_config(src_dir: str | os.PathLike[str]) -> GemmaHParams:
    """Hyperparameters of the checkpoint in ``src_dir`` (reads config.json only)."""
    src_dir = os.fspath(src_dir)
    path = os.path.join(src_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointFileError(f"input directory {src_dir} is not a Hugging Face checkpoint: "
                                  f"no config.json")
    return _hparams_from_config(_read_json(path, "config.json"), path)


# --------------------------------------------------------------------------------------------
# safetensors (read one tensor at a time, no torch)
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2),
              "BF16": (np.uint16, 2)}


@dataclass
class _StTensor:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int      # absolute file offset
    nbytes: int


def _read_safetensors_header(path: str) -> dict[str, _StTensor]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFileError(f"{path}: not a safetensors file (too short)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                raise CheckpointFileError(f"{path}: not a safetensors file (header length {n})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointFileError(f"safetensors file not found: {path}") from None
    except OSError as e:
        raise CheckpointFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointFileError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: corrupt safetensors header")
    base = 8 + n
    out: dict[str, _StTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: corrupt safetensors entry for {name!r}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype in _ST_DTYPES:
            if e - b != count * _ST_DTYPES[dtype][1]:
                raise CheckpointFileError(
                    f"{path}: tensor {name!r} has {e - b} bytes, its shape {list(shape)} "
                    f"needs {count * _ST_DTYPES[dtype][1]}")
        if b < 0 or e < b or base + e > size:
            raise CheckpointFileError(f"{path}: tensor {name!r} lies outside the file "
                                      f"(truncated download?)")
        out[name] = _StTensor(name, path, dtype, shape, base + b, e - b)
    return out


def _read_chunks(t: _StTensor, max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The tensor (1-D or more) as float32, in blocks of whole rows (first dimension) of at most
    about ``max_bytes`` (default ``CHUNK_BYTES``) each, so that even a large embedding is never
    in memory whole."""
    if t.dtype not in _ST_DTYPES:
        raise CheckpointFileError(f"{t.file}: tensor {t.name!r} has unsupported dtype {t.dtype} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
    np_dtype, size = _ST_DTYPES[t.dtype]
    np_dtype = np.dtype(np_dtype).newbyteorder("<")
    rows, row_shape = t.shape[0], t.shape[1:]
    row_elems = 1
    for d in row_shape:
        row_elems *= d
    limit = CHUNK_BYTES if max_bytes is None else max_bytes
    per_chunk = max(1, limit // max(1, 4 * row_elems))
    try:
        with open(t.file, "rb") as f:
            f.seek(t.start)
            for r in range(0, rows, per_chunk):
                n = min(per_chunk, rows - r)
                want = n * row_elems * size
                raw = f.read(want)
                if len(raw) != want:
                    raise CheckpointFileError(f"{t.file}: tensor {t.name!r} is truncated")
                a = np.frombuffer(raw, dtype=np_dtype)
                if t.dtype == "BF16":
                    a = (a.astype(np.uint32) << 16).view(np.float32)
                else:
                    a = a.astype(np.float32)
                yield a.reshape((n,) + row_shape)
    except OSError as e:
        raise CheckpointFileError(f"cannot read {t.file}: {e.strerror or e}") from None


def _index_checkpoint(src_dir: str) -> dict[str, _StTensor]:
    """{tensor name: location} over every safetensors file of the checkpoint."""
    index_path = os.path.join(src_dir, "model.safetensors.index.json")
    files: list[str]
    weight_map: dict[str, str] | None = None
    if os.path.exists(index_path):
        idx = _read_json(index_path, "safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointFileError(f"{index_path}: no valid 'weight_map'")
        weight_map = wm
        files = sorted(set(wm.values()))
        for fn in files:
            if os.path.basename(fn) != fn:
                raise CheckpointFileError(f"{index_path}: shard name {fn!r} is not a plain file name")
            if not os.path.isfile(os.path.join(src_dir, fn)):
                raise CheckpointFileError(f"missing safetensors shard {fn} (listed in "
                                          f"model.safetensors.index.json) in {src_dir}")
    else:
        files = sorted(f for f in os.listdir(src_dir) if f.endswith(".safetensors"))
        if not files:
            bins = [f for f in os.listdir(src_dir) if f.endswith(".bin") or f.endswith(".pth")]
            hint = (" (PyTorch .bin checkpoints are not supported: re-save with "
                    "save_pretrained(..., safe_serialization=True))") if bins else ""
            raise CheckpointFileError(f"no *.safetensors files in {src_dir}{hint}")
    tensors: dict[str, _StTensor] = {}
    for fn in files:
        for name, t in _read_safetensors_header(os.path.join(src_dir, fn)).items():
            if name in tensors:
                raise CheckpointFileError(f"tensor {name!r} appears in both "
                                          f"{os.path.basename(tensors[name].file)} and {fn}")
            if weight_map is not None and weight_map.get(name) != fn:
                if name not in weight_map:
                    continue  # not part of the model according to the index
                raise CheckpointFileError(f"tensor {name!r} is in {fn}, but the index lists "
                                          f"{weight_map[name]}")
            tensors[name] = t
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointFileError(f"tensor {missing[0]!r} is listed in the index but not in "
                                      f"{weight_map[missing[0]]}")
    return tensors


# --------------------------------------------------------------------------------------------
# Tensor plan: HF name -> GGUF name, expected shape, transform
# --------------------------------------------------------------------------------------------

@dataclass
class _PlanItem:
    gguf_name: str
    source: _StTensor
    shape: tuple[int, ...]          # numpy order, as in the checkpoint
    is_norm: bool = False           # stored as 1 + w
    scale: float = 1.0              # multiplied in (after the norm offset)
    ggml_type: int = _GGML_F32
    nbytes: int = 0


_LAYER_MAP = {
    "input_layernorm": ("blk.{i}.attn_norm", "norm"),
    "self_attn.q_proj": ("blk.{i}.attn_q", "q"),
    "self_attn.k_proj": ("blk.{i}.attn_k", "kv"),
    "self_attn.v_proj": ("blk.{i}.attn_v", "kv"),
    "self_attn.o_proj": ("blk.{i}.attn_output", "o"),
    "post_attention_layernorm": ("blk.{i}.post_attention_norm", "norm"),
    "pre_feedforward_layernorm": ("blk.{i}.ffn_norm", "norm"),
    "mlp.gate_proj": ("blk.{i}.ffn_gate", "up"),
    "mlp.up_proj": ("blk.{i}.ffn_up", "up"),
    "mlp.down_proj": ("blk.{i}.ffn_down", "down"),
    "post_feedforward_layernorm": ("blk.{i}.post_ffw_norm", "norm"),
}
_GEMMA3_LAYER_MAP = {
    "self_attn.q_norm": ("blk.{i}.attn_q_norm", "headnorm"),
    "self_attn.k_norm": ("blk.{i}.attn_k_norm", "headnorm"),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _tensor_type(outtype: str, shape: tuple[int, ...]) -> int:
    if len(shape) < 2 or outtype == "f32":
        return _GGML_F32
    if outtype == "f16":
        return _GGML_F16
    if outtype == "bf16":
        return _GGML_BF16
    return _GGML_Q8_0 if shape[-1] % _QK8_0 == 0 else _GGML_F16


def _type_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    if ggml_type == _GGML_F32:
        return 4 * n
    if ggml_type in (_GGML_F16, _GGML_BF16):
        return 2 * n
    return n // _QK8_0 * 34


def _plan(hp: GemmaHParams, tensors: Mapping[str, _StTensor], outtype: str,
          notes: list[str]) -> list[_PlanItem]:
    H, F, V, hd = hp.n_embd, hp.n_ff, hp.vocab_size, hp.head_dim
    shapes = {"norm": (H,), "q": (hp.q_dim, H), "kv": (hp.kv_dim, H), "o": (H, hp.q_dim),
              "up": (F, H), "down": (H, F), "headnorm": (hd,)}
    want: dict[str, tuple[str, tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ("token_embd.weight", (V, H), "embd"),
        "model.norm.weight": ("output_norm.weight", (H,), "norm"),
    }
    layer_map = dict(_LAYER_MAP)
    if hp.arch == "gemma3":
        layer_map.update(_GEMMA3_LAYER_MAP)
    for i in range(hp.n_layer):
        for hf, (gg, kind) in layer_map.items():
            want[f"model.layers.{i}.{hf}.weight"] = (gg.format(i=i) + ".weight", shapes[kind], kind)

    has_head = "lm_head.weight" in tensors
    if has_head and not hp.tie_word_embeddings:
        if hp.arch == "gemma2":
            raise UnsupportedArchitectureError(
                "untied lm_head (tie_word_embeddings = false) is not supported for Gemma 2 "
                "(llama.cpp's gemma2 graph always uses the token embedding as output)")
        want["lm_head.weight"] = ("output.weight", (V, H), "head")
    elif not hp.tie_word_embeddings and not has_head:
        raise TensorShapeError("tie_word_embeddings is false but the checkpoint has no "
                               "lm_head.weight")
    elif has_head:
        notes.append("ignored lm_head.weight (tied to the token embedding)")

    unexpected = [n for n in tensors if n not in want and n != "lm_head.weight"
                  and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        unexpected.sort()
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise TensorShapeError(f"unexpected tensor {unexpected[0]!r}{more} in the checkpoint: "
                               f"not part of a text-only {hp.hf_architecture}")
    plan: list[_PlanItem] = []
    order = ["model.embed_tokens.weight"] + (["lm_head.weight"] if "lm_head.weight" in want else []) \
        + ["model.norm.weight"] + [n for n in want if n.startswith("model.layers.")]
    for hf_name in order:
        gg, shape, kind = want[hf_name]
        t = tensors.get(hf_name)
        if t is None:
            raise TensorShapeError(f"tensor {hf_name!r} is missing from the checkpoint")
        if t.shape != shape:
            raise TensorShapeError(
                f"tensor {hf_name!r} has shape {list(t.shape)}, config.json implies "
                f"{list(shape)} (hidden_size {H}, intermediate_size {F}, heads {hp.n_head}, "
                f"KV heads {hp.n_head_kv}, head_dim {hd}, vocab_size {V})")
        if t.dtype not in _ST_DTYPES:
            raise CheckpointFileError(f"{t.file}: tensor {hf_name!r} has unsupported dtype "
                                      f"{t.dtype} (supported: {', '.join(_ST_DTYPES)})")
        item = _PlanItem(gg, t, shape, is_norm=kind in ("norm", "headnorm"))
        if hp.q_scale_fold != 1.0:
            if (hp.arch == "gemma2" and kind == "q") or \
               (hp.arch == "gemma3" and hf_name.endswith("self_attn.q_norm.weight")):
                item.scale = hp.q_scale_fold
        item.ggml_type = _tensor_type(outtype, shape)
        item.nbytes = _type_nbytes(item.ggml_type, shape)
        plan.append(item)
    if outtype == "q8_0":
        fallback = [p.gguf_name for p in plan if len(p.shape) >= 2 and p.ggml_type != _GGML_Q8_0]
        if fallback:
            notes.append(f"{len(fallback)} tensor(s) with rows not a multiple of {_QK8_0} "
                         f"written as f16 (e.g. {fallback[0]})")
    return plan


def _encode(item: _PlanItem, data: np.ndarray) -> np.ndarray:
    """float32 rows of a checkpoint tensor -> the array whose bytes go to the GGUF file
    (every output type is row-local: a block of whole rows encodes independently)."""
    if item.is_norm:
        data = data + np.float32(1.0)
    if item.scale != 1.0:
        data = data * np.float32(item.scale)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise HfConvertError(f"tensor for {item.gguf_name} contains NaN or infinite values")
    t = item.ggml_type
    if t == _GGML_F32:
        out = data
    elif t == _GGML_F16:
        out = data.astype(np.float16)
        if not np.all(np.isfinite(out)):
            raise HfConvertError(f"tensor for {item.gguf_name} has values outside the f16 range; "
                                 f"use --outtype bf16 or f32")
    elif t == _GGML_BF16:
        u = data.view(np.uint32).astype(np.uint64)
        # round to nearest even, as torch and ggml do (the data is finite: no NaN handling)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = u.astype(np.uint16)
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize
        out = quantize(data, GGMLQuantizationType.Q8_0)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

@dataclass
class _Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    source: str


def _pb_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _pb_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message (value: int or bytes)."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _pb_varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _pb_varint(buf, pos)
        elif wt == 1:
            if pos + 8 > n:
                raise ValueError("truncated fixed64")
            v, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _pb_varint(buf, pos)
            if pos + ln > n:
                raise ValueError("truncated field")
            v, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            if pos + 4 > n:
                raise ValueError("truncated fixed32")
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield fno, wt, v


def _read_sentencepiece(path: str) -> _Vocab:
    """SentencePiece ModelProto (tokenizer.model) without the sentencepiece/protobuf packages:
    pieces (field 1: piece=1, score=2, type=3) and normalizer_spec (field 3:
    add_dummy_prefix=3, remove_extra_whitespaces=4)."""
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise CheckpointFileError(f"cannot read {path}: {e.strerror or e}") from None
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    add_prefix, remove_ws = True, True
    model_type = 1
    try:
        for fno, wt, v in _pb_fields(buf):
            if fno == 1 and wt == 2:
                piece, score, ptype = None, 0.0, TT_NORMAL
                for f2, w2, v2 in _pb_fields(v):
                    if f2 == 1 and w2 == 2:
                        piece = v2.decode("utf-8")
                    elif f2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3 and w2 == 0:
                        ptype = v2
                if piece is None:
                    raise ValueError(f"piece #{len(tokens)} has no text")
                tokens.append(piece)
                scores.append(float(score))
                types.append(int(ptype) if 1 <= ptype <= 6 else TT_NORMAL)
            elif fno == 2 and wt == 2:
                for f2, w2, v2 in _pb_fields(v):
                    if f2 == 3 and w2 == 0:
                        model_type = v2
            elif fno == 3 and wt == 2:
                for f2, w2, v2 in _pb_fields(v):
                    if f2 == 3 and w2 == 0:
                        add_prefix = bool(v2)
                    elif f2 == 4 and w2 == 0:
                        remove_ws = bool(v2)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{path}: not a SentencePiece model ({e})") from None
    if not tokens:
        raise CheckpointFileError(f"{path}: not a SentencePiece model (no pieces)")
    if model_type not in (1, 2):  # UNIGRAM=1, BPE=2; llama.cpp's SPM tokenizer handles both
        raise UnsupportedArchitectureError(f"{path}: SentencePiece model type {model_type} "
                                           f"is not supported (unigram or BPE)")
    return _Vocab(tokens, scores, types, add_prefix, remove_ws, "tokenizer.model")


def _read_tokenizer_json(path: str) -> _Vocab:
    """The vocabulary from a tokenizers ``tokenizer.json`` made from a SentencePiece model
    (BPE with merges, or Unigram with scores)."""
    tj = _read_json(path, "tokenizer.json")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        raise CheckpointFileError(f"{path}: no 'model' section")
    try:
        return _vocab_from_tokenizer_json(tj, model)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CheckpointFileError(f"{path}: malformed tokenizer ({type(e).__name__}: {e})") from None


def _vocab_from_tokenizer_json(tj: dict, model: dict) -> _Vocab:
    path = "tokenizer.json"
    mtype = model.get("type")
    vocab = model.get("vocab")
    if mtype == "BPE" and isinstance(vocab, dict):
        n = max(vocab.values(), default=-1) + 1
        tokens = [""] * n
        for tok, i in vocab.items():
            tokens[i] = tok
        # SentencePiece BPE prefers the piece of the earliest merge: score = -rank
        scores = [0.0] * n
        merges = model.get("merges") or []
        for rank, m in enumerate(merges):
            a, b = (m.split(" ", 1) if isinstance(m, str) else m)
            i = vocab.get(a + b)
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
        types = [TT_BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                 else TT_NORMAL for t in tokens]
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = TT_UNKNOWN
    elif mtype == "Unigram" and isinstance(vocab, list):
        tokens = [str(p[0]) for p in vocab]
        scores = [float(p[1]) for p in vocab]
        types = [TT_BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                 else TT_NORMAL for t in tokens]
        unk_id = model.get("unk_id")
        if isinstance(unk_id, int) and 0 <= unk_id < len(tokens):
            types[unk_id] = TT_UNKNOWN
    else:
        raise UnsupportedArchitectureError(f"{path}: tokenizer model {mtype!r} is not supported "
                                           f"without tokenizer.model (BPE or Unigram)")
    for at in tj.get("added_tokens") or []:
        if not isinstance(at, dict):
            continue
        i, content = at.get("id"), at.get("content")
        if not isinstance(i, int) or not isinstance(content, str):
            continue
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(0.0)
            types.append(TT_UNUSED)
        tokens[i] = content
        if types[i] != TT_UNKNOWN:
            types[i] = TT_CONTROL if at.get("special") else TT_USER_DEFINED
    norm = json.dumps(tj.get("normalizer"))
    pre = json.dumps(tj.get("pre_tokenizer"))
    add_prefix = '"Prepend"' in norm or '"prepend_scheme": "always"' in pre \
        or '"add_prefix_space": true' in pre
    return _Vocab(tokens, scores, types, add_prefix, False, "tokenizer.json")


def _load_vocab(src_dir: str, n_vocab: int, notes: list[str]) -> _Vocab:
    spm_path = os.path.join(src_dir, "tokenizer.model")
    tj_path = os.path.join(src_dir, "tokenizer.json")
    if os.path.isfile(spm_path):
        v = _read_sentencepiece(spm_path)
        # tokens added on top of the SentencePiece model (e.g. Gemma 3's image tokens)
        tj = _read_json(tj_path, "tokenizer.json", required=False) if os.path.isfile(tj_path) else None
        added = (tj.get("added_tokens") or []) if isinstance(tj, dict) else []
        added = sorted((at for at in added if isinstance(at, dict) and isinstance(at.get("id"), int)),
                       key=lambda at: at["id"])
        for at in added:
            i, content = at.get("id"), at.get("content")
            if isinstance(i, int) and isinstance(content, str) and i >= len(v.tokens) and i < n_vocab:
                while len(v.tokens) < i:
                    v.tokens.append(f"[PAD{len(v.tokens)}]")
                    v.scores.append(0.0)
                    v.types.append(TT_UNUSED)
                v.tokens.append(content)
                v.scores.append(0.0)
                v.types.append(TT_CONTROL if at.get("special") else TT_USER_DEFINED)
    elif os.path.isfile(tj_path):
        v = _read_tokenizer_json(tj_path)
        notes.append("vocabulary taken from tokenizer.json (no tokenizer.model)")
    else:
        raise CheckpointFileError(f"no tokenizer in {src_dir}: need tokenizer.model "
                                  f"(SentencePiece) or tokenizer.json")
    if len(v.tokens) > n_vocab:
        notes.append(f"dropped {len(v.tokens) - n_vocab} tokenizer token(s) beyond the "
                     f"embedding's {n_vocab} rows")
        del v.tokens[n_vocab:], v.scores[n_vocab:], v.types[n_vocab:]
    elif len(v.tokens) < n_vocab:
        notes.append(f"padded the vocabulary with {n_vocab - len(v.tokens)} unused token(s) to "
                     f"the embedding's {n_vocab} rows")
        for i in range(len(v.tokens), n_vocab):
            v.tokens.append(f"[PAD{i}]")
            v.scores.append(0.0)
            v.types.append(TT_UNUSED)
    for i, t in enumerate(v.tokens):
        if t == "":
            raise CheckpointFileError(f"{v.source}: token id {i} has no text")
    return v


@dataclass
class _TokenizerMeta:
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: Any


def _tokenizer_meta(src_dir: str, cfg: Mapping[str, Any], vocab: _Vocab) -> _TokenizerMeta:
    tc = _read_json(os.path.join(src_dir, "tokenizer_config.json"), "tokenizer_config.json",
                    required=False) or {}
    gc = _read_json(os.path.join(src_dir, "generation_config.json"), "generation_config.json",
                    required=False) or {}
    if not isinstance(tc, dict) or not isinstance(gc, dict):
        raise CheckpointFileError(f"{src_dir}: tokenizer_config.json / generation_config.json "
                                  f"must hold JSON objects")
    stm = _read_json(os.path.join(src_dir, "special_tokens_map.json"), "special_tokens_map.json",
                     required=False) or {}
    index = {}
    for i, t in enumerate(vocab.tokens):
        index.setdefault(t, i)
    n = len(vocab.tokens)

    def special(name: str, cfg_key: str, default_text: str) -> int | None:
        for src in (tc, stm if isinstance(stm, dict) else {}):
            text = _token_text(src.get(name))
            if text is not None and text in index:
                return index[text]
        for src in (cfg, gc):
            i = _first_int(src.get(cfg_key))
            if i is not None and 0 <= i < n:
                return i
        return index.get(default_text)

    bos = special("bos_token", "bos_token_id", "<bos>")
    eos = special("eos_token", "eos_token_id", "<eos>")
    pad = special("pad_token", "pad_token_id", "<pad>")
    unk = special("unk_token", "unk_token_id", "<unk>")
    if unk is None and TT_UNKNOWN in vocab.types:
        unk = vocab.types.index(TT_UNKNOWN)

    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    if add_bos is None or add_eos is None:
        # transformers >= 5 keeps these in tokenizer.json's post-processor
        tj = _read_json(os.path.join(src_dir, "tokenizer.json"), "tokenizer.json",
                        required=False)
        single = None
        if isinstance(tj, dict) and isinstance(tj.get("post_processor"), dict):
            pp = tj["post_processor"]
            procs = pp.get("processors") if pp.get("type") == "Sequence" else [pp]
            for p in procs or []:
                if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
                    single = p.get("single")
        if isinstance(single, list):
            items = [("A" if "Sequence" in s else (s.get("SpecialToken") or {}).get("id"))
                     for s in single if isinstance(s, dict)]
            if "A" in items:
                a = items.index("A")
                bos_t = vocab.tokens[bos] if bos is not None else None
                eos_t = vocab.tokens[eos] if eos is not None else None
                if add_bos is None:
                    add_bos = bos_t is not None and bos_t in items[:a]
                if add_eos is None:
                    add_eos = eos_t is not None and eos_t in items[a + 1:]
    add_bos = True if add_bos is None else bool(add_bos)    # Gemma's defaults
    add_eos = False if add_eos is None else bool(add_eos)

    chat = tc.get("chat_template")
    if chat is None:
        jinja = os.path.join(src_dir, "chat_template.jinja")
        if os.path.isfile(jinja):
            try:
                with open(jinja, "r", encoding="utf-8") as f:
                    chat = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointFileError(f"cannot read {jinja}: {e}") from None
        else:
            cj = _read_json(os.path.join(src_dir, "chat_template.json"), "chat_template.json",
                            required=False)
            if isinstance(cj, dict):
                chat = cj.get("chat_template")
    if chat is not None and not isinstance(chat, (str, list)):
        chat = None
    return _TokenizerMeta(bos, eos, unk, pad, add_bos, add_eos, chat)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

@dataclass
class HfConvertResult:
    src: str
    dst: str
    arch: str
    outtype: str
    n_tensors: int
    n_bytes: int                       # tensor data bytes
    n_vocab: int
    dhsa: dict[str, Any]               # {name: value} of the DHSA keys written
    hparams: GemmaHParams
    notes: list[str] = field(default_factory=list)


def _check_paths(src: str, dst: str) -> None:
    if not os.path.exists(src):
        raise CheckpointFileError(f"input directory not found: {src}")
    if not os.path.isdir(src):
        raise HfConvertError(f"input is not a directory: {src}")
    if os.path.isdir(dst):
        if os.path.realpath(dst) == os.path.realpath(src):
            raise HfConvertError(f"output is the same path as the input: {dst} (give an output "
                                 f"GGUF file name)")
        raise HfConvertError(f"output path is a directory: {dst}")
    if os.path.exists(dst):
        for fn in os.listdir(src):
            p = os.path.join(src, fn)
            try:
                if os.path.isfile(p) and os.path.samefile(p, dst):
                    raise HfConvertError(f"output is the same file as the input's {fn}: {dst} "
                                         f"(the input is never modified)")
            except OSError:
                pass
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.exists(parent):
        raise ConvertIOError(f"output directory does not exist: {parent}")
    if not os.path.isdir(parent):
        raise ConvertIOError(f"output directory is not a directory: {parent}")


def _metadata(w: Any, hp: GemmaHParams, vocab: _Vocab, tm: _TokenizerMeta, outtype: str,
              name: str, dhsa: Mapping[str, Any]) -> None:
    from gguf import GGUFValueType as T
    a = hp.arch
    w.add_string("general.type", "model")
    if name:
        w.add_string("general.name", name)
    w.add_uint32("general.file_type", _FILE_TYPE[outtype])
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{a}.context_length", hp.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", hp.n_embd)
    w.add_uint32(f"{a}.block_count", hp.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", hp.n_ff)
    w.add_uint32(f"{a}.attention.head_count", hp.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", hp.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", hp.head_dim)
    w.add_uint32(f"{a}.attention.value_length", hp.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", hp.rms_eps)
    w.add_float32(f"{a}.rope.freq_base", hp.rope_theta)
    if hp.sliding_window > 0:
        w.add_float32(f"{a}.rope.freq_base_swa", hp.rope_theta_local)
    if hp.rope_scaling_factor is not None:
        w.add_string(f"{a}.rope.scaling.type", "linear")
        w.add_float32(f"{a}.rope.scaling.factor", hp.rope_scaling_factor)
    if hp.sliding_window > 0 or a == "gemma2":
        w.add_uint32(f"{a}.attention.sliding_window", hp.sliding_window)
        key = f"{a}.attention.sliding_window_pattern"
        if hp.swa_pattern is not None:
            w.add_uint32(key, hp.swa_pattern)
        else:
            w.add_key_value(key, list(hp.swa_layers), T.ARRAY, sub_type=T.BOOL)
    if a == "gemma2":
        w.add_float32(f"{a}.attn_logit_softcapping",
                      hp.attn_softcap if hp.attn_softcap is not None else _NO_SOFTCAP)
        w.add_float32(f"{a}.final_logit_softcapping",
                      hp.final_softcap if hp.final_softcap is not None else _NO_SOFTCAP)
    elif hp.final_softcap is not None:
        w.add_float32(f"{a}.final_logit_softcapping", hp.final_softcap)
    for pname, value in dhsa.items():
        w.add_key_value(gguf_key(a, pname), value, T(PARAMS_BY_NAME[pname].gguf_type))

    w.add_string("tokenizer.ggml.model", "llama")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_key_value("tokenizer.ggml.tokens", vocab.tokens, T.ARRAY, sub_type=T.STRING)
    w.add_key_value("tokenizer.ggml.scores", vocab.scores, T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("tokenizer.ggml.token_type", vocab.types, T.ARRAY, sub_type=T.INT32)
    for key, v in (("bos_token_id", tm.bos), ("eos_token_id", tm.eos),
                   ("unknown_token_id", tm.unk), ("padding_token_id", tm.pad)):
        if v is not None:
            w.add_uint32(f"tokenizer.ggml.{key}", v)
    w.add_bool("tokenizer.ggml.add_bos_token", tm.add_bos)
    w.add_bool("tokenizer.ggml.add_eos_token", tm.add_eos)
    w.add_bool("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix)
    w.add_bool("tokenizer.ggml.remove_extra_whitespaces", vocab.remove_extra_whitespaces)
    if tm.chat_template:
        w.add_chat_template(tm.chat_template)


def convert_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    outtype: str = DEFAULT_OUTTYPE,
    set_values: Mapping[str, Any] | None = None,
    write_defaults: bool = False,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
    name: str | None = None,
) -> HfConvertResult:
    """Convert the Hugging Face Gemma 2/3 checkpoint folder ``src`` to the GGUF file ``dst``.

    ``outtype``: f32, f16 (default), bf16 or q8_0 for the 2-D weights (1-D ones stay f32).
    ``set_values``: {DHSA parameter: value} written as ``<arch>.dhsa.*`` keys (validated);
    ``write_defaults``: write every DHSA parameter (given values, else built-in defaults).
    Raises ConvertError subclasses (bad input) or ConvertIOError (could not write); in both
    cases no output or temporary file is left behind.
    """
    src = os.fspath(src)
    dst = os.fspath(dst)
    stream = progress_stream if progress_stream is not None else sys.stderr
    if outtype not in OUTTYPES:
        raise HfConvertError(f"unknown output type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    _check_paths(src, dst)
    given = dict(set_values or {})
    for k in given:
        if k not in PARAMS_BY_NAME:
            raise HfConvertError(f"unknown DHSA parameter {k!r}")
    try:
        dcfg = config_from_values(given)
    except DhsaParamError as e:
        raise HfConvertError(str(e)) from None
    eff = dcfg.as_dict()
    dhsa = {p.name: eff[p.name] for p in PARAMS if write_defaults or p.name in given}

    cfg_path = os.path.join(src, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointFileError(f"input directory {src} is not a Hugging Face checkpoint: "
                                  f"no config.json")
    cfg = _read_json(cfg_path, "config.json")
    hp = _hparams_from_config(cfg, cfg_path)
    notes = list(hp.notes)
    tensors = _index_checkpoint(src)
    plan = _plan(hp, tensors, outtype, notes)
    vocab = _load_vocab(src, hp.vocab_size, notes)
    tm = _tokenizer_meta(src, cfg, vocab)
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(src)))

    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of the package
        raise HfConvertError("the 'gguf' package is required to write GGUF files") from None

    d = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(dst)
    fd, tmp = output_temp(dst)
    os.close(fd)
    total = sum(p.nbytes for p in plan)
    show = progress
    if show is None:
        show = _isatty(stream) and total >= AUTO_PROGRESS_MIN_BYTES
    prog = _Progress(total, bool(show), stream, f"writing {base}")
    ok = False
    writer = None
    try:
        try:
            writer = gguf.GGUFWriter(tmp, hp.arch)
            _metadata(writer, hp, vocab, tm, outtype, name, dhsa)
            for p in plan:
                writer.add_tensor_info(p.gguf_name, _raw_shape(p), np.dtype(np.uint8),
                                       p.nbytes, raw_dtype=gguf.GGMLQuantizationType(p.ggml_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # tensor data, streamed in row blocks (what GGUFWriter.write_tensor_data does for a
            # whole array: align the start, write, pad the end to the alignment)
            fout = writer.fout[0]
            align = writer.data_alignment
            done = 0
            for p in plan:
                writer.write_padding(fout, fout.tell())
                written = 0
                for chunk in _read_chunks(p.source):
                    data = _encode(p, chunk)
                    fout.write(data.tobytes())
                    written += data.nbytes
                    done += data.nbytes
                    prog.update(done)
                    del data, chunk
                if written != p.nbytes:  # pragma: no cover - internal consistency
                    raise HfConvertError(f"internal error: wrote {written} bytes for "
                                         f"{p.gguf_name}, expected {p.nbytes}")
                writer.write_padding(fout, p.nbytes, align)
            writer.flush()
            os.fsync(fout.fileno())
            writer.close()
            writer = None
            os.replace(tmp, dst)
            ok = True
        except ConvertError:
            raise
        except OSError as e:
            raise write_error(dst, e) from e
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        if not ok:
            prog.abort()
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_directory(d)
    return HfConvertResult(src=src, dst=dst, arch=hp.arch, outtype=outtype, n_tensors=len(plan),
                           n_bytes=total, n_vocab=len(vocab.tokens), dhsa=dhsa, hparams=hp,
                           notes=notes)


def _raw_shape(p: _PlanItem) -> list[int]:
    """Shape in bytes (numpy order) as GGUFWriter.add_tensor_info expects for raw uint8 data."""
    shape = list(p.shape)
    shape[-1] = _type_nbytes(p.ggml_type, (shape[-1],))
    return shape
