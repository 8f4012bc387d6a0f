"""config.json of a Hugging Face Gemma 2 / Gemma 3 checkpoint -> the hyperparameters llama.cpp's ``gemma2`` /
``gemma3`` need (``GemmaHParams``), for ``hf_gemma``.

Both config layouts are read: transformers >= 5 (``rope_parameters``, possibly per layer type, and
``layer_types``) and the older one (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
``sliding_window_pattern``). What llama.cpp's graphs cannot reproduce is refused here, before anything is
written: other activations, attention bias, bidirectional attention, RoPE scaling other than linear, Gemma 3
attention soft-capping. ``query_pre_attn_scalar`` becomes ``q_scale_fold``, the factor the tensor plan folds
into the query path (llama.cpp scales queries by ``1/sqrt(head_dim)``, or by ``1/sqrt(hidden_size/num_heads)``
for the 27B sizes it recognises by layer count).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .hf_checkpoint import CheckpointFileError, HfConvertError, UnsupportedArchitectureError, read_json

SUPPORTED_ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}

# llama.cpp's 27B special case (src/models/gemma2.cpp / gemma3.cpp): layer count -> that size.
_LLAMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's default sliding-window layer pattern when the file has no pattern key.
_DEFAULT_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# Stand-in for "no soft-capping" where llama.cpp's gemma2 graph always caps:
# tanh(x / C) * C == x * (1 - x^2 / (3 C^2) + ...), i.e. a relative change below 1e-9 for |x| < 50.
NO_SOFTCAP = 1.0e6


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


def hparams_from_config(cfg: Mapping[str, Any], where: str) -> GemmaHParams:
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
            notes.append(f"attn_logit_softcapping is null: wrote {NO_SOFTCAP:g} (llama.cpp's "
                         f"gemma2 graph always caps; this cap changes nothing measurable)")
        if final_cap is None:
            notes.append(f"final_logit_softcapping is null: wrote {NO_SOFTCAP:g}")

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
    return hparams_from_config(read_json(path, "config.json"), path)

