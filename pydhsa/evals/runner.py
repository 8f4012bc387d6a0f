"""The model behind a small interface: ``ModelRunner`` runs greedy generation for a method in a fresh
session and reports the engine's timings (tests substitute a fake runner); the chat-template rules and the
model part of a case key live here too."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .. import niah
from ..models import is_chat_model
from .methods import Method

CTX_MARGIN = 16  # n_ctx = prompt tokens + generated tokens + CTX_MARGIN


@dataclass
class Generation:
    text: str
    n_prompt: int
    t_prefill_ms: float = 0.0
    t_generate_ms: float = 0.0
    n_generate: int = 0
    ttft_ms: float = 0.0        # from the start of the call to the first generated piece (prefill included)
    wall_ms: float = 0.0
    peak_rss_bytes: int = 0
    density: Optional[float] = None  # DHSA computed/causal pairs over the layers that ran it


def model_id(path: Union[str, os.PathLike], n_gpu_layers: int = 0, type_k: Optional[str] = None,
             type_v: Optional[str] = None, chat: bool = False) -> str:
    """The model part of a case key: file name and size, plus each setting that changes the cases when it is
    not the default (offloaded layers compute in another backend's arithmetic, a quantised KV cache in other
    numbers, a chat template on other prompts), so a resumed run never mixes them; default ids stay as they were.
    A cache type of None is the engine's default."""
    from ..api import DEFAULT_CACHE_TYPE
    type_k, type_v = type_k or DEFAULT_CACHE_TYPE, type_v or DEFAULT_CACHE_TYPE
    path = Path(path)
    ident = f"{path.name}:{path.stat().st_size}"
    if n_gpu_layers:
        ident += f":ngl={n_gpu_layers}"
    if (type_k, type_v) != (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE):
        ident += f":ctk={type_k},ctv={type_v}"
    return ident + (":chat" if chat else "")


def chat_enabled(choice: str, model_name: Optional[str], path: Union[str, os.PathLike],
                 meta: Callable[[str], Optional[str]]) -> bool:
    """--chat: ``on``/``off`` as given; ``auto``: for an embedded model what the registry says (an instruct
    model), for a file whether it has a chat template and its general.name or file name says instruct or
    chat. ``meta`` reads a GGUF metadata key (None when absent)."""
    has_template = meta("tokenizer.chat_template") is not None
    if choice == "on" and not has_template:
        raise ValueError(f"--chat on: {Path(path).name} has no chat template (tokenizer.chat_template)")
    if choice != "auto":
        return choice == "on"
    if model_name:
        return is_chat_model(model_name)
    names = f"{meta('general.name') or ''} {Path(path).name}".lower()
    return has_template and ("instruct" in names or "chat" in names)


def tokenize_prompt(model, text: str, chat: bool) -> List[int]:
    """The tokens of a completion-style prompt (with the model's BOS); with ``chat``, first wrapped by
    niah.as_chat in the model's chat template, without a second BOS when the template writes one itself."""
    if not chat:
        return model.tokenize(text, add_special=True)
    wrapped = niah.as_chat(text, model.chat_prompt)
    with_special, plain = model.tokenize(wrapped, add_special=True), model.tokenize(wrapped, add_special=False)
    doubled = len(with_special) == len(plain) + 1 and plain[:1] == with_special[:1]
    return plain if doubled else with_special


class ModelRunner:
    """Runs greedy generation for a method on a loaded Model; one fresh session per call.

    ``chat``: "on", "off" or "auto" (see chat_enabled; ``model_name`` is the registry name of an embedded
    model); ``type_k``/``type_v``: the KV cache types of every session (None: the engine's default, f16).
    With chat on, prompts are built ``chat_overhead`` tokens (what the template adds) below their target and
    run as ``prompt_tokens`` gives them, so that the wrapped prompt has the target size."""

    def __init__(self, model_path: Union[str, os.PathLike], n_threads: Optional[int] = None, n_batch: int = 2048,
                 n_ubatch: int = 512, overrides: Optional[Dict[str, Any]] = None, n_gpu_layers: int = 0,
                 type_k: Optional[str] = None, type_v: Optional[str] = None, chat: str = "off",
                 model_name: Optional[str] = None):
        from ..api import DEFAULT_CACHE_TYPE, Model, default_threads
        self.model_path = Path(model_path)
        self.model = Model(self.model_path, n_gpu_layers=n_gpu_layers)
        self.n_threads = int(n_threads) if n_threads else default_threads()
        self.n_batch, self.n_ubatch, self.n_gpu_layers = n_batch, n_ubatch, n_gpu_layers
        self.type_k, self.type_v = type_k or DEFAULT_CACHE_TYPE, type_v or DEFAULT_CACHE_TYPE
        self.chat = chat_enabled(chat, model_name, self.model_path, self.model.meta)
        probe = "Question: Who?\nAnswer: It is"
        self.chat_overhead = len(self.prompt_tokens(probe)) - len(self.tokenize(probe)) if self.chat else 0
        self.overrides = dict(overrides or {})
        self.file_values = self.model.dhsa_file_values()
        self.n_ctx_train = self.model.info.n_ctx_train
        self._configs: Dict[Method, Any] = {}

    @property
    def model_id(self) -> str:
        return model_id(self.model_path, self.n_gpu_layers, self.type_k, self.type_v, self.chat)

    def tokenize(self, text: str) -> List[int]:
        """Tokens of a text as written (prompt sizes, needle depths)."""
        return self.model.tokenize(text, add_special=True)

    def prompt_tokens(self, text: str) -> List[int]:
        """Tokens of a whole prompt as the model runs it: in the chat template when chat is on."""
        return tokenize_prompt(self.model, text, self.chat)

    def config(self, method: Method):
        if method not in self._configs:
            self._configs[method] = method.config(self.file_values, self.overrides)
        return self._configs[method]

    def generate(self, tokens: Sequence[int], method: Method, max_tokens: int,
                 stop: Optional[Callable[[str], bool]] = None) -> Generation:
        cfg = self.config(method)
        n_ctx = len(tokens) + max_tokens + CTX_MARGIN
        t0 = time.perf_counter()
        with self.model.session(n_ctx=n_ctx, n_threads=self.n_threads, n_batch=self.n_batch,
                                n_ubatch=self.n_ubatch, dhsa=cfg, type_k=self.type_k,
                                type_v=self.type_v) as session:
            text, ttft = "", None
            gen = session.generate(list(tokens), max_tokens=max_tokens, temperature=0, seed=0)
            try:
                for piece in gen:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    text += piece
                    if stop is not None and stop(text):
                        break
            finally:
                gen.close()
            wall = (time.perf_counter() - t0) * 1e3
            t = session.timings()
            dens = session.dhsa_density()
        return Generation(text=text, n_prompt=len(tokens), t_prefill_ms=t.t_prefill_ms,
                          t_generate_ms=t.t_generate_ms, n_generate=t.n_generate,
                          ttft_ms=ttft if ttft is not None else wall, wall_ms=wall,
                          peak_rss_bytes=t.peak_rss_bytes, density=dens.overall if dens is not None else None)

    def describe(self) -> Dict[str, Any]:
        info = self.model.info
        return {"path": str(self.model_path), "file": self.model_path.name,
                "size_bytes": self.model_path.stat().st_size, "architecture": info.architecture,
                "description": info.description, "n_params": info.n_params, "n_layer": info.n_layer,
                "n_ctx_train": info.n_ctx_train, "n_swa": info.n_swa, "dhsa_file_values": dict(self.file_values),
                "threads": self.n_threads, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
                "n_gpu_layers": self.n_gpu_layers, "flash_attn": "auto", "type_k": self.type_k,
                "type_v": self.type_v, "chat_template": self.chat}

    def close(self) -> None:
        self.model.close()


class TokenMemo:
    """count_tokens for the prompt builders that keeps the token lists, so the chosen prompt is not
    tokenized a second time."""

    def __init__(self, tokenize: Callable[[str], List[int]]):
        self.tokenize_fn = tokenize
        self.memo: Dict[str, List[int]] = {}

    def count(self, text: str) -> int:
        toks = self.memo.get(text)
        if toks is None:
            toks = self.memo[text] = self.tokenize_fn(text)
        return len(toks)

    def tokens(self, text: str) -> List[int]:
        return self.memo[text] if text in self.memo else self.tokenize_fn(text)


def run_tokens(runner, memo: TokenMemo, text: str) -> List[int]:
    """The tokens a built prompt runs as: those counted while building it, or its chat-wrapped ones."""
    return runner.prompt_tokens(text) if runner.chat else memo.tokens(text)


def target_tokens(length: int, max_tokens: int, n_ctx_train: Optional[int]) -> int:
    """Prompt size for a context length: the length itself, unless prompt + generation would not fit the
    model's training context (then the prompt shrinks so that it does)."""
    if n_ctx_train and length + max_tokens + CTX_MARGIN > n_ctx_train:
        return max(64, n_ctx_train - max_tokens - CTX_MARGIN)
    return length
