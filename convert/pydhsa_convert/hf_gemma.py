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

The work is split by concern: ``hf_config`` (config.json -> ``GemmaHParams``), ``hf_checkpoint`` (the
folder's files: safetensors weights read a block of rows at a time, errors), ``hf_tensors`` (HF name ->
GGUF name, the rewrites llama.cpp's graphs need, the encoding), ``hf_tokenizer`` (vocabulary and special
tokens); this module writes the file with ``gguf.GGUFWriter``, tensor data streamed block by block, so
memory holds one block of rows, not a tensor or the model. The output goes to a temporary file in the
output's directory and is renamed only when complete; on any error the temporary file is removed.

Reading needs the ``convert`` extra (``pip install "pydhsa[convert]"``: safetensors, sentencepiece,
protobuf); without it the conversion stops with one ``MissingLibraryError`` line, before writing anything.

Library API: ``convert_hf(src_dir, dst, outtype="f16", set_values=None, ...) -> HfConvertResult``,
``read_hf_config(src_dir) -> GemmaHParams``, ``is_hf_checkpoint(path)``.
Errors: ``ConvertError`` subclasses (bad input; exit status 2 through the CLI) and
``ConvertIOError`` (the output could not be written; exit status 1, as for GGUF input).
"""
from __future__ import annotations

import os
import sys
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Mapping, TextIO

import gguf
import numpy as np
from gguf import GGUFValueType as T

from pydhsa.dhsa_params import PARAMS, PARAMS_BY_NAME, DhsaParamError, config_from_values, gguf_key

from .gguf_dhsa import AUTO_PROGRESS_MIN_BYTES, ConvertIOError, _isatty, _Progress, atomic_output, given_dhsa_values
from .hf_checkpoint import (
    CheckpointFileError,
    HfConvertError,
    MissingLibraryError,
    TensorShapeError,
    UnsupportedArchitectureError,
    index_checkpoint,
    is_hf_checkpoint,
    read_chunks,
    read_json,
)
from .hf_config import NO_SOFTCAP, SUPPORTED_ARCHITECTURES, GemmaHParams, hparams_from_config, read_hf_config
from .hf_tensors import DEFAULT_OUTTYPE, OUTTYPES, PlanItem, encode, plan_tensors, raw_shape
from .hf_tokenizer import TokenizerMeta, Vocab, load_vocab, tokenizer_meta

__all__ = [
    "OUTTYPES", "DEFAULT_OUTTYPE", "SUPPORTED_ARCHITECTURES", "HfConvertError",
    "UnsupportedArchitectureError", "CheckpointFileError", "TensorShapeError", "MissingLibraryError",
    "GemmaHParams", "HfConvertResult", "is_hf_checkpoint", "read_hf_config", "convert_hf",
]

_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "bf16": gguf.LlamaFileType.MOSTLY_BF16}


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


def _metadata(w: Any, hp: GemmaHParams, vocab: Vocab, tm: TokenizerMeta, outtype: str,
              name: str, dhsa: Mapping[str, Any]) -> None:
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
                      hp.attn_softcap if hp.attn_softcap is not None else NO_SOFTCAP)
        w.add_float32(f"{a}.final_logit_softcapping",
                      hp.final_softcap if hp.final_softcap is not None else NO_SOFTCAP)
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
    if outtype not in OUTTYPES:
        raise HfConvertError(f"unknown output type {outtype!r} (choose from {', '.join(OUTTYPES)})")
    _check_paths(src, dst)
    given = given_dhsa_values(set_values)
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
    cfg = read_json(cfg_path, "config.json")
    hp = hparams_from_config(cfg, cfg_path)
    notes = list(hp.notes)
    tensors = index_checkpoint(src)
    plan = plan_tensors(hp, tensors, outtype, notes)
    vocab = load_vocab(src, hp.vocab_size, notes)
    tm = tokenizer_meta(src, cfg, vocab)
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(src)))

    total = sum(p.nbytes for p in plan)
    stream = progress_stream if progress_stream is not None else sys.stderr
    show = progress
    if show is None:
        show = _isatty(stream) and total >= AUTO_PROGRESS_MIN_BYTES
    prog = _Progress(total, bool(show), stream, f"writing {os.path.basename(dst)}")
    with atomic_output(dst, prog) as (fd, tmp):
        os.close(fd)   # GGUFWriter opens the file by name
        with closing(gguf.GGUFWriter(tmp, hp.arch)) as writer:
            _write(writer, hp, vocab, tm, outtype, name, dhsa, plan, prog)
    return HfConvertResult(src=src, dst=dst, arch=hp.arch, outtype=outtype, n_tensors=len(plan),
                           n_bytes=total, n_vocab=len(vocab.tokens), dhsa=dhsa, hparams=hp,
                           notes=notes)


def _write(writer: Any, hp: GemmaHParams, vocab: Vocab, tm: TokenizerMeta, outtype: str, name: str,
           dhsa: Mapping[str, Any], plan: list[PlanItem], prog: _Progress) -> None:
    """The whole GGUF file through `writer`: header, metadata, tensor infos, then the tensor data, streamed in
    row blocks (what GGUFWriter.write_tensors_to_file does for whole arrays: align each tensor's start, write
    it, pad its end to the alignment); flushed and fsynced."""
    _metadata(writer, hp, vocab, tm, outtype, name, dhsa)
    for p in plan:
        writer.add_tensor_info(p.gguf_name, raw_shape(p), np.dtype(np.uint8), p.nbytes, raw_dtype=p.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    done = 0
    for p in plan:
        writer.write_padding(fout, fout.tell())
        written = 0
        for chunk in read_chunks(p.source):
            data = encode(p, chunk)
            fout.write(data.tobytes())
            written += data.nbytes
            done += data.nbytes
            prog.update(done)
            del data, chunk
        if written != p.nbytes:  # pragma: no cover - internal consistency
            raise HfConvertError(f"internal error: wrote {written} bytes for {p.gguf_name}, expected {p.nbytes}")
        writer.write_padding(fout, p.nbytes, writer.data_alignment)
    writer.flush()
    os.fsync(fout.fileno())
