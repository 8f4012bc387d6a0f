"""The tensor plan of a Gemma 2 / Gemma 3 checkpoint (Hugging Face name -> GGUF name, expected shape, how the
values change, the GGUF type) and the encoding of its rows, for ``hf_gemma``.

How the weights are rewritten for llama.cpp's graphs (``src/models/gemma2.cpp``, ``gemma3.cpp``):

- Gemma's RMSNorm multiplies by ``(1 + weight)``, llama.cpp by ``weight``: every norm weight is
  stored as ``1 + weight`` (q/k norms of Gemma 3 included).
- llama.cpp ignores ``query_pre_attn_scalar``: when the checkpoint's ``query_pre_attn_scalar**-0.5``
  differs from llama.cpp's query scale, the ratio (``GemmaHParams.q_scale_fold``) is folded into the
  query path (Gemma 2: ``q_proj``; Gemma 3: the q-norm weight, applied after the norm and before the
  linear RoPE), so the attention logits are exactly Hugging Face's.
- The embedding stays unscaled (llama.cpp multiplies by ``sqrt(hidden_size)`` itself); the output
  projection is the tied embedding (an untied ``lm_head`` becomes ``output.weight`` for Gemma 3).
- 2-D weights are f32, f16, bf16 or q8_0 (the ``outtype``); 1-D tensors (the norms) always f32, as
  llama.cpp does; a q8_0 tensor whose rows are not a multiple of 32 falls back to f16. The encoding is
  the ``gguf`` package's (``gguf.quants.quantize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape, quantize

from .hf_checkpoint import HfConvertError, StTensor, TensorShapeError, UnsupportedArchitectureError, check_dtype
from .hf_config import GemmaHParams

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"
_OUTTYPE_GGML = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
                 "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}
_QK8_0 = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]   # values per q8_0 block (32)


@dataclass
class PlanItem:
    gguf_name: str
    source: StTensor
    shape: tuple[int, ...]          # numpy order, as in the checkpoint
    is_norm: bool = False           # stored as 1 + w
    scale: float = 1.0              # multiplied in (after the norm offset)
    ggml_type: GGMLQuantizationType = GGMLQuantizationType.F32
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


def _tensor_type(outtype: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if outtype == "q8_0" and shape[-1] % _QK8_0:
        return GGMLQuantizationType.F16
    return _OUTTYPE_GGML[outtype]


def type_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    return int(np.prod(quant_shape_to_byte_shape(shape, ggml_type), dtype=np.int64))


def raw_shape(p: PlanItem) -> list[int]:
    """Shape in bytes (numpy order) as GGUFWriter.add_tensor_info expects for raw uint8 data."""
    return [int(d) for d in quant_shape_to_byte_shape(p.shape, p.ggml_type)]


def plan_tensors(hp: GemmaHParams, tensors: Mapping[str, StTensor], outtype: str,
                 notes: list[str]) -> list[PlanItem]:
    """The tensors to write, in GGUF order, each checked against config.json (names, shapes, dtypes)."""
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
    plan: list[PlanItem] = []
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
        check_dtype(t)
        item = PlanItem(gg, t, shape, is_norm=kind in ("norm", "headnorm"))
        if hp.q_scale_fold != 1.0:
            if (hp.arch == "gemma2" and kind == "q") or \
               (hp.arch == "gemma3" and hf_name.endswith("self_attn.q_norm.weight")):
                item.scale = hp.q_scale_fold
        item.ggml_type = _tensor_type(outtype, shape)
        item.nbytes = type_nbytes(item.ggml_type, shape)
        plan.append(item)
    if outtype == "q8_0":
        fallback = [p.gguf_name for p in plan if len(p.shape) >= 2
                    and p.ggml_type != GGMLQuantizationType.Q8_0]
        if fallback:
            notes.append(f"{len(fallback)} tensor(s) with rows not a multiple of {_QK8_0} "
                         f"written as f16 (e.g. {fallback[0]})")
    return plan


def encode(item: PlanItem, data: np.ndarray) -> np.ndarray:
    """float32 rows of a checkpoint tensor -> the array whose bytes go to the GGUF file, encoded by
    gguf.quants.quantize (f16: numpy's rounding; bf16: round to nearest even, as ggml and torch do; q8_0:
    bit-exact with ggml's reference quantize_row_q8_0). Every output type is row-local: a block of whole
    rows encodes independently."""
    if item.is_norm:
        data = data + np.float32(1.0)
    if item.scale != 1.0:
        data = data * np.float32(item.scale)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise HfConvertError(f"tensor for {item.gguf_name} contains NaN or infinite values")
    out = quantize(data, item.ggml_type)
    if item.ggml_type == GGMLQuantizationType.F16 and not np.all(np.isfinite(out)):
        raise HfConvertError(f"tensor for {item.gguf_name} has values outside the f16 range; "
                             f"use --outtype bf16 or f32")
    return out
