"""The vocabulary and tokenizer settings of a Hugging Face Gemma checkpoint -> what GGUF's ``tokenizer.ggml.*``
keys hold (llama.cpp's SentencePiece tokenizer, ``llama``), for ``hf_gemma``.

``tokenizer.model`` (SentencePiece) is read with the ``sentencepiece`` and ``protobuf`` libraries (the
``convert`` extra); tokens that ``tokenizer.json`` adds on top of it (e.g. Gemma 3's image tokens) are
appended. Without ``tokenizer.model`` the vocabulary comes from ``tokenizer.json`` (a BPE or Unigram model
made from SentencePiece); that is JSON, read with ``json``. The special token ids, add-BOS/EOS and the chat
template come from ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``,
``config.json``, ``tokenizer.json``'s post-processor and ``chat_template.jinja``/``.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .hf_checkpoint import CheckpointFileError, UnsupportedArchitectureError, read_json, require

# llama token types (== SentencePiece piece types == gguf.TokenType)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    source: str


def read_sentencepiece(path: str) -> Vocab:
    """tokenizer.model through SentencePiece's own schema of it (``sentencepiece_model_pb2``, read by protobuf):
    each piece's text, score and type, the model type, and the normalizer's add_dummy_prefix and
    remove_extra_whitespaces. (SentencePieceProcessor cannot replace the schema: it tells no USER_DEFINED
    piece from a normal one and does not expose the normalizer's settings.)"""
    pb2 = require("sentencepiece.sentencepiece_model_pb2")
    decode_error = require("google.protobuf.message").DecodeError
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise CheckpointFileError(f"cannot read {path}: {e.strerror or e}") from None
    m = pb2.ModelProto()
    try:
        m.ParseFromString(buf)
    except decode_error as e:
        raise CheckpointFileError(f"{path}: not a SentencePiece model ({e})") from None
    if not m.pieces:
        raise CheckpointFileError(f"{path}: not a SentencePiece model (no pieces)")
    model_type = m.trainer_spec.model_type
    if model_type not in (pb2.TrainerSpec.UNIGRAM, pb2.TrainerSpec.BPE):  # llama.cpp's SPM tokenizer does both
        raise UnsupportedArchitectureError(f"{path}: SentencePiece model type {model_type} "
                                           f"is not supported (unigram or BPE)")
    tokens, scores, types = [], [], []
    for p in m.pieces:   # piece types are llama's token types (an unknown value reads as NORMAL)
        tokens.append(p.piece)
        scores.append(p.score)
        types.append(p.type)
    ns = m.normalizer_spec
    return Vocab(tokens, scores, types, ns.add_dummy_prefix, ns.remove_extra_whitespaces, "tokenizer.model")


def _read_tokenizer_json(path: str) -> Vocab:
    """The vocabulary from a tokenizers ``tokenizer.json`` made from a SentencePiece model
    (BPE with merges, or Unigram with scores)."""
    tj = read_json(path, "tokenizer.json")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        raise CheckpointFileError(f"{path}: no 'model' section")
    try:
        return _vocab_from_tokenizer_json(tj, model)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise CheckpointFileError(f"{path}: malformed tokenizer ({type(e).__name__}: {e})") from None


def _vocab_from_tokenizer_json(tj: dict, model: dict) -> Vocab:
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
    return Vocab(tokens, scores, types, add_prefix, False, "tokenizer.json")


def load_vocab(src_dir: str, n_vocab: int, notes: list[str]) -> Vocab:
    spm_path = os.path.join(src_dir, "tokenizer.model")
    tj_path = os.path.join(src_dir, "tokenizer.json")
    if os.path.isfile(spm_path):
        v = read_sentencepiece(spm_path)
        # tokens added on top of the SentencePiece model (e.g. Gemma 3's image tokens)
        tj = read_json(tj_path, "tokenizer.json", required=False) if os.path.isfile(tj_path) else None
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


@dataclass
class TokenizerMeta:
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: Any


def tokenizer_meta(src_dir: str, cfg: Mapping[str, Any], vocab: Vocab) -> TokenizerMeta:
    tc = read_json(os.path.join(src_dir, "tokenizer_config.json"), "tokenizer_config.json",
                   required=False) or {}
    gc = read_json(os.path.join(src_dir, "generation_config.json"), "generation_config.json",
                   required=False) or {}
    if not isinstance(tc, dict) or not isinstance(gc, dict):
        raise CheckpointFileError(f"{src_dir}: tokenizer_config.json / generation_config.json "
                                  f"must hold JSON objects")
    stm = read_json(os.path.join(src_dir, "special_tokens_map.json"), "special_tokens_map.json",
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
        tj = read_json(os.path.join(src_dir, "tokenizer.json"), "tokenizer.json",
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
            cj = read_json(os.path.join(src_dir, "chat_template.json"), "chat_template.json",
                           required=False)
            if isinstance(cj, dict):
                chat = cj.get("chat_template")
    if chat is not None and not isinstance(chat, (str, list)):
        chat = None
    return TokenizerMeta(bos, eos, unk, pad, add_bos, add_eos, chat)

