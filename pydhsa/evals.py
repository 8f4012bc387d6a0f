"""Accuracy and speed evaluations of dense attention versus DHSA on GGUF models.

Three suites share one engine (methods, runner, resumable grid, progress bar, reports):

- **NIAH** (``run_niah``): Needle-in-a-Haystack grid, context lengths x needle depths x methods.
  Completion-style prompts from ``pydhsa.niah`` (the needle rotates through ``niah.NEEDLES`` from
  cell to cell), greedy decoding, exact-match scoring (``niah.score``).
- **RULER-style** (``run_ruler``): synthetic tasks generated from a seed and inserted into the same
  haystack: ``multikey`` (several keys, one asked), ``multivalue`` (one key, every value must be
  produced), ``vartrack`` (variable assignment chains; every variable holding the value must be named).
- **Speed/memory** (``run_speed``): prefill tok/s, time to first token, decode tok/s and peak RSS at
  several context lengths, every configuration in a fresh subprocess (peak RSS is process-wide),
  medians of repeats and ratios to dense measured in the same run.

Methods are written ``dense``, ``dhsa:B`` (keysim boundaries, budget B) and ``fixed:B`` (fixed
boundaries every chunk_avg keys: the block-sparse ablation); see ``parse_methods``.

Work order: every prompt is built and tokenized once and all methods run on it before the next
prompt. Finished cases are appended (fsync'ed) to ``cases.jsonl`` in the output directory and skipped
on restart. Greedy generation stops early only once the score can no longer change (the first answer
line is complete, or every expected value has appeared); ``--no-early-stop`` disables that.

The model is ``-m FILE`` or ``--model-name NAME`` (an embedded model, ``pydhsa.models``), its KV cache
``-ctk``/``-ctv`` (llama.cpp's type names). ``--chat`` wraps NIAH/RULER prompts in the model's chat template
(``niah.as_chat``: the question is the user's turn, the answer prefix opens the assistant's); ``auto`` turns
it on for instruct models (``chat_enabled``). Settings that change the arithmetic or the prompt (``-ngl``, the
cache types, the chat template) are part of the model id in the case keys (``model_id``), so a resumed run
never mixes cases of different settings; at their defaults the ids are as they always were.

The model is reached through a *runner* (``ModelRunner``); tests substitute a fake one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import string
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import niah
from .models import DEFAULT_MODEL, is_chat_model, known_models

__all__ = [
    "Method", "parse_methods", "DEFAULT_METHODS", "parse_lengths", "parse_depths",
    "DEFAULT_LENGTHS", "DEFAULT_DEPTHS", "Generation", "Prompt", "PromptSpec", "ModelRunner",
    "Progress", "run_grid", "grid_cases", "niah_specs", "needle_for", "ruler_specs", "ruler_sample",
    "RULER_TASKS", "RulerSample", "build_inserted_prompt", "score_all", "summarize", "write_summary",
    "plot_niah_heatmaps", "plot_ruler", "collect_meta", "run_niah", "run_ruler", "run_speed",
    "summarize_speed", "plot_speed", "model_id", "chat_enabled", "tokenize_prompt", "add_niah_arguments",
    "add_ruler_arguments", "add_speed_arguments",
    "cmd_niah", "cmd_ruler", "cmd_speed", "main_niah", "main_ruler", "main_speed",
]

DEFAULT_METHODS = "dense,dhsa:0.1,dhsa:0.2,dhsa:0.3,dhsa:0.5,fixed:0.1,fixed:0.2,fixed:0.3,fixed:0.5"
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 24576, 32768)
DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
DEFAULT_SPEED_LENGTHS = (4096, 8192, 16384, 24576, 32768)
NIAH_MAX_TOKENS = 24
CTX_MARGIN = 16  # n_ctx = prompt tokens + generated tokens + CTX_MARGIN

# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------

_KIND_ALIASES = {"dense": "dense", "dhsa": "dhsa", "keysim": "dhsa", "fixed": "fixed", "block": "fixed"}
_KIND_ORDER = {"dense": 0, "dhsa": 1, "fixed": 2}


@dataclass(frozen=True)
class Method:
    """An attention method: ``dense``, or DHSA with a budget and a boundary method."""
    kind: str                       # dense | dhsa (keysim boundaries) | fixed (fixed boundaries)
    budget: Optional[float] = None  # None for dense

    @property
    def label(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}@{self.budget:g}"

    @property
    def boundary(self) -> Optional[str]:
        return {"dense": None, "dhsa": "keysim", "fixed": "fixed"}[self.kind]

    def method_id(self, overrides: Optional[Dict[str, Any]] = None) -> str:
        """The label plus the DHSA parameter overrides (dense ignores them): the name used in keys and
        reports, so runs with different settings never mix."""
        if self.kind == "dense" or not overrides:
            return self.label
        return self.label + "[" + ",".join(f"{k}={overrides[k]}" for k in sorted(overrides)) + "]"

    def config(self, file_values: Optional[Dict[str, Any]] = None, overrides: Optional[Dict[str, Any]] = None):
        """The DhsaConfig of this method (None for dense): built-in defaults < the model file's DHSA keys <
        ``overrides`` < this method's budget and boundary."""
        if self.kind == "dense":
            return None
        from .dhsa_params import config_from_values
        values = dict(file_values or {})
        values.update(overrides or {})
        values.update(budget=self.budget, boundary=self.boundary)
        return config_from_values(values)

    def sort_key(self):
        return (_KIND_ORDER.get(self.kind, 9), self.budget or 0.0)


def parse_methods(spec: Union[str, Sequence[str]]) -> List[Method]:
    """``"dense,dhsa:0.3,fixed@0.1"`` -> methods, in the given order, duplicates dropped.

    Accepted items: ``dense``; ``dhsa[:B]`` or ``keysim[:B]`` (keysim boundaries); ``fixed[:B]`` or
    ``block[:B]`` (fixed boundaries); ``:`` or ``@`` before the budget; B in (0, 1], default 0.3;
    ``default``/``all`` expands to DEFAULT_METHODS. Raises ValueError naming the bad item.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[Method] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("default", "all"):
            for m in parse_methods(DEFAULT_METHODS):
                if m not in out:
                    out.append(m)
            continue
        name, sep, budget_text = item.replace("@", ":").partition(":")
        kind = _KIND_ALIASES.get(name.strip())
        if kind is None:
            raise ValueError(f"unknown method {raw.strip()!r} (use dense, dhsa:B or fixed:B, e.g. dhsa:0.3)")
        if kind == "dense":
            if sep:
                raise ValueError(f"method {raw.strip()!r}: dense takes no budget")
            m = Method("dense")
        else:
            budget = 0.3
            if sep:
                try:
                    budget = float(budget_text)
                except ValueError:
                    raise ValueError(f"method {raw.strip()!r}: budget {budget_text!r} is not a number") from None
            if not (0.0 < budget <= 1.0):  # also rejects nan
                raise ValueError(f"method {raw.strip()!r}: budget must be > 0 and <= 1")
            m = Method(kind, budget)
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no methods given")
    return out


def parse_lengths(spec: Union[str, Sequence[int]]) -> List[int]:
    """``"2048,4k,32K"`` -> [2048, 4096, 32768] (k = 1024), sorted, unique."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        text = str(raw).strip().lower()
        if not text:
            continue
        mult = 1
        if text.endswith("k"):
            mult, text = 1024, text[:-1]
        try:
            value = int(float(text) * mult)
        except ValueError:
            raise ValueError(f"bad length {str(raw).strip()!r} (use tokens, e.g. 2048 or 2k)") from None
        if value < 64:
            raise ValueError(f"length {value} is too small (>= 64 tokens)")
        out.add(value)
    if not out:
        raise ValueError("no lengths given")
    return sorted(out)


def parse_depths(spec: Union[str, Sequence[float]]) -> List[float]:
    """``"0,0.1,0.5"`` or ``"0%,50%,100%"`` -> sorted unique depths in [0, 1]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        scale = 1.0
        if text.endswith("%"):
            scale, text = 0.01, text[:-1]
        try:
            value = round(float(text) * scale, 6)
        except ValueError:
            raise ValueError(f"bad depth {str(raw).strip()!r} (a fraction 0..1 or a percentage)") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"depth {str(raw).strip()} is outside 0..1")
        out.add(value)
    if not out:
        raise ValueError("no depths given")
    return sorted(out)


def parse_overrides(min_context: Optional[int] = None, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """DHSA parameter overrides from ``--dhsa-min-context`` and ``--dhsa-opt NAME=VALUE`` items."""
    from .dhsa_params import PARAMS_BY_NAME, validate_values
    values: Dict[str, Any] = {}
    for item in opts or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--dhsa-opt {item!r}: expected NAME=VALUE, e.g. chunk_avg=64")
        if name in ("budget", "boundary"):
            raise ValueError(f"--dhsa-opt {item!r}: budget and boundary come from --methods")
        if name not in PARAMS_BY_NAME:
            raise ValueError(f"--dhsa-opt {item!r}: unknown DHSA parameter {name!r}")
        kind = PARAMS_BY_NAME[name].kind
        values[name] = int(value) if kind == "int" and value.strip().lstrip("-").isdigit() else value.strip()
    if min_context is not None:
        values["min_context"] = int(min_context)
    return validate_values(values, labels={k: f"DHSA override {k}" for k in values})


# --------------------------------------------------------------------------------------------
# Runner: the model behind a small interface (tests use a fake one)
# --------------------------------------------------------------------------------------------

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
    from .api import DEFAULT_CACHE_TYPE
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
        from .api import DEFAULT_CACHE_TYPE, Model, default_threads
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


class _TokenMemo:
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


def _run_tokens(runner, memo: _TokenMemo, text: str) -> List[int]:
    """The tokens a built prompt runs as: those counted while building it, or its chat-wrapped ones."""
    return runner.prompt_tokens(text) if runner.chat else memo.tokens(text)


def _target_tokens(length: int, max_tokens: int, n_ctx_train: Optional[int]) -> int:
    """Prompt size for a context length: the length itself, unless prompt + generation would not fit the
    model's training context (then the prompt shrinks so that it does)."""
    if n_ctx_train and length + max_tokens + CTX_MARGIN > n_ctx_train:
        return max(64, n_ctx_train - max_tokens - CTX_MARGIN)
    return length


# --------------------------------------------------------------------------------------------
# Prompts, specs and the grid
# --------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """A built prompt: what every method runs on."""
    text: str
    tokens: List[int]
    expected: List[str]            # all of them must be produced
    scoring: str                   # "first_line" (niah.score on the answer line) | "all" (whole continuation)
    max_tokens: int
    info: Dict[str, Any] = field(default_factory=dict)  # extra fields for the records


@dataclass
class PromptSpec:
    """One prompt of a grid, identified by ``fields``; built lazily (only if some method still needs it)."""
    fields: Dict[str, Any]
    weight: float                  # relative cost, for the ETA
    build: Callable[[Any], Prompt]  # build(runner) -> Prompt


def grid_cases(specs: Sequence[PromptSpec], methods: Sequence[Method]) -> List[Tuple[PromptSpec, Method]]:
    """The run order: each prompt with all methods, prompt after prompt."""
    return [(spec, m) for spec in specs for m in methods]


def case_fields(spec: PromptSpec, method: Method, overrides: Optional[Dict[str, Any]], model_id: str) -> Dict[str, Any]:
    return {**spec.fields, "method": method.method_id(overrides), "model": model_id}


def _contains(text: str, value: str) -> bool:
    exp = niah._words(value)
    got = niah._words(text)
    k = len(exp)
    return bool(exp) and any(got[i:i + k] == exp for i in range(len(got) - k + 1))


def score_all(generated: str, expected: Sequence[str]) -> Tuple[bool, float]:
    """(every expected value appears, fraction that appears) in the whole continuation; whole-word
    matching with niah.score's word rules."""
    if not expected:
        return False, 0.0
    found = sum(1 for e in expected if _contains(generated, e))
    return found == len(expected), found / len(expected)


def score_prompt(prompt: Prompt, generated: str) -> Tuple[bool, float]:
    if prompt.scoring == "first_line":
        ok = all(niah.score(generated, e) for e in prompt.expected)
        return ok, 1.0 if ok else 0.0
    return score_all(generated, prompt.expected)


def stop_rule(prompt: Prompt) -> Callable[[str], bool]:
    """When the score can no longer change: the first answer line is complete (first_line), or every
    expected value has appeared (all)."""
    if prompt.scoring == "first_line":
        return lambda text: "\n" in text.lstrip()
    return lambda text: score_all(text, prompt.expected)[0]


def _fmt_dur(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress bar with ETA on stderr (a line per step when stderr is not a terminal).

    The ETA weighs steps by their cost (``weight``, e.g. prompt tokens): remaining weight times the
    measured seconds per unit of weight.
    """

    def __init__(self, total: int, total_weight: float, title: str = "", stream=None, enabled: bool = True,
                 width: int = 24, clock: Callable[[], float] = time.monotonic):
        self.total, self.total_weight = total, float(total_weight)
        self.done, self.done_weight = 0, 0.0
        self.title, self.stream, self.enabled, self.width = title, stream or sys.stderr, enabled, width
        self.clock = clock
        self.start = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0

    def eta(self) -> Optional[float]:
        if self.done_weight <= 0:
            return None
        rate = (self.clock() - self.start) / self.done_weight
        return rate * max(self.total_weight - self.done_weight, 0.0)

    def line(self, msg: str = "") -> str:
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        head = f"{self.title} " if self.title else ""
        return (f"{head}[{bar}] {self.done}/{self.total} {frac:4.0%} | {_fmt_dur(self.clock() - self.start)} "
                f"elapsed | ETA {_fmt_dur(self.eta())}" + (f" | {msg}" if msg else ""))

    def _write(self, text: str, newline: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad + ("\n" if newline else ""))
            self._last_len = 0 if newline else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def show(self, msg: str = "") -> None:
        """Redraw the bar (terminals only: a log gets one line per finished step)."""
        if self.tty:
            self._write(self.line(msg), newline=False)

    def note(self, msg: str) -> None:
        """A message above the bar."""
        if self.tty:
            self._write(msg, newline=True)
            self.show()
        else:
            self._write(msg, newline=False)

    def advance(self, weight: float = 1.0, msg: str = "") -> None:
        self.done += 1
        self.done_weight += weight
        self._write(self.line(msg), newline=not self.tty)

    def close(self) -> None:
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


def _record_done(store: niah.ResultStore, key: str) -> bool:
    rec = store.get(key)
    return rec is not None and not rec.get("error")


def run_grid(specs: Sequence[PromptSpec], methods: Sequence[Method], runner, store: niah.ResultStore, *,
             overrides: Optional[Dict[str, Any]] = None, model_id: Optional[str] = None, early_stop: bool = True,
             title: str = "", progress: bool = True, stream=None,
             extra: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Run every (prompt, method) case not yet in ``store``; append one record per case.

    Prompts are built (and tokenized) once, only when some method still needs them, and all pending
    methods run on a prompt before the next one is built. A case that raises is stored with an
    ``error`` field and retried on the next run. Returns counts: run, skipped, errors.
    """
    stream = stream or sys.stderr
    model_id = model_id or getattr(runner, "model_id", "model")
    pending: List[Tuple[PromptSpec, List[Tuple[Method, str]]]] = []
    n_total = n_skipped = 0
    for spec in specs:
        todo = []
        for m in methods:
            n_total += 1
            key = store.key_of(case_fields(spec, m, overrides, model_id))
            if _record_done(store, key):
                n_skipped += 1
            else:
                todo.append((m, key))
        if todo:
            pending.append((spec, todo))
    n_todo = n_total - n_skipped
    bar = Progress(n_todo, sum(s.weight * len(t) for s, t in pending), title=title, stream=stream,
                   enabled=progress)
    if progress and n_skipped:
        stream.write(f"{title}: {n_skipped} of {n_total} cases already in {store.path}, skipped\n")
    counts = {"run": 0, "skipped": n_skipped, "errors": 0, "total": n_total}
    try:
        for spec, todo in pending:
            bar.show(f"building prompt {_spec_label(spec.fields)}")
            try:
                prompt = spec.build(runner)
            except Exception as e:  # a prompt that cannot be built fails all its cases
                for m, key in todo:
                    store.add({**case_fields(spec, m, overrides, model_id), "key": key, "error": repr(e),
                               **(extra or {})})
                    counts["errors"] += 1
                    bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: ERROR {e}")
                continue
            for m, key in todo:
                bar.show(f"{_spec_label(spec.fields)} {m.label} ({len(prompt.tokens)} tokens)")
                rec = {**case_fields(spec, m, overrides, model_id), "key": key, "method_label": m.label,
                       "kind": m.kind, "budget": m.budget, "n_prompt": len(prompt.tokens),
                       "expected": prompt.expected, "max_tokens": prompt.max_tokens, **prompt.info,
                       **(extra or {})}
                try:
                    cfg = runner.config(m) if hasattr(runner, "config") else None
                    rec["dhsa_config"] = cfg.as_dict() if cfg is not None else None
                    g = runner.generate(prompt.tokens, m, prompt.max_tokens,
                                        stop_rule(prompt) if early_stop else None)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    rec["error"] = repr(e)
                    store.add(rec)
                    counts["errors"] += 1
                    bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: ERROR {e}")
                    continue
                ok, frac = score_prompt(prompt, g.text)
                rec.update(generated=g.text, answer=niah.answer_span(g.text), correct=bool(ok), recall=frac,
                           t_prefill_ms=g.t_prefill_ms, t_generate_ms=g.t_generate_ms, n_generate=g.n_generate,
                           ttft_ms=g.ttft_ms, wall_ms=g.wall_ms, peak_rss_bytes=g.peak_rss_bytes,
                           density=g.density, time=datetime.datetime.now().isoformat(timespec="seconds"))
                store.add(rec)
                counts["run"] += 1
                bar.advance(spec.weight, f"{_spec_label(spec.fields)} {m.label}: "
                                         f"{'OK  ' if ok else 'MISS'} {niah.answer_span(g.text)[:40]!r}")
    finally:
        bar.close()
    return counts


def _spec_label(fields: Dict[str, Any]) -> str:
    parts = []
    if "task" in fields:
        parts.append(str(fields["task"]))
    if "length" in fields:
        parts.append(f"L={fields['length']}")
    if "depth" in fields:
        parts.append(f"d={fields['depth']:.2f}")
    if "sample" in fields:
        parts.append(f"#{fields['sample']}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# NIAH
# --------------------------------------------------------------------------------------------

def needle_for(length: int, depth: float, seed: int = 0, k: int = 0) -> niah.Needle:
    """The needle of a grid cell: consecutive depths take consecutive needles, each length starts at its
    own offset, so a length column uses every needle; stable whatever the rest of the grid is."""
    offset = zlib.crc32(f"{length}:{seed}".encode())
    return niah.NEEDLES[(offset + int(round(depth * 10)) + k) % len(niah.NEEDLES)]


def niah_specs(lengths: Sequence[int], depths: Sequence[float], *, seed: int = 0, needles_per_cell: int = 1,
               max_tokens: int = NIAH_MAX_TOKENS, n_ctx_train: Optional[int] = None,
               haystack_dir: Union[str, Path, None] = None) -> List[PromptSpec]:
    """NIAH prompts, ordered by length (ascending), then depth, then needle."""
    specs = []
    for length in sorted(lengths):
        target = _target_tokens(length, max_tokens, n_ctx_train)
        for depth in sorted(depths):
            for k in range(needles_per_cell):
                needle = needle_for(length, depth, seed, k)

                def build(runner, target=target, depth=depth, needle=needle) -> Prompt:
                    memo = _TokenMemo(runner.tokenize)
                    p = niah.build_prompt(memo.count, target - runner.chat_overhead, depth, needle, haystack_dir)
                    return Prompt(text=p.text, tokens=_run_tokens(runner, memo, p.text), expected=[p.expected],
                                  scoring="first_line", max_tokens=max_tokens,
                                  info={"actual_depth": round(p.actual_depth, 4), "target_tokens": target,
                                        "question": needle.question})

                specs.append(PromptSpec({"suite": "niah", "length": length, "depth": depth, "needle": needle.name,
                                         "max_tokens": max_tokens}, weight=float(target), build=build))
    return specs


# --------------------------------------------------------------------------------------------
# RULER-style synthetic tasks
# --------------------------------------------------------------------------------------------

RULER_TASKS = ("multikey", "multivalue", "vartrack")
RULER_MAX_TOKENS = {"multikey": 24, "multivalue": 64, "vartrack": 64}

_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid", "shiny", "tidy", "upbeat", "vivid",
               "witty", "young", "zesty", "bold", "crisp", "dapper", "elegant", "frosty")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quiver", "ribbon", "saddle", "tunnel",
          "umbrella", "violin", "walnut", "yacht", "zeppelin", "beacon", "compass", "drum", "feather", "glacier")

_MK_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")
_VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


@dataclass
class RulerSample:
    task: str
    text: str
    n_tokens: int
    expected: List[str]
    inserts: List[str]            # the inserted statements, in text order
    depths: List[float]           # requested depth of each insert
    scoring: str
    max_tokens: int
    target_tokens: int
    count_calls: int = 0


def _distinct(rng: random.Random, n: int, make: Callable[[], str]) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        v = make()
        if v not in out:
            out.append(v)
    return out


def _ruler_task(task: str, rng: random.Random, n_keys: int, n_values: int, n_hops: int, n_chains: int):
    """(header, inserts [(depth, sentence)], tail, expected, scoring) of one sample."""
    number = lambda: str(rng.randint(1_000_000, 9_999_999))  # noqa: E731
    if task == "multikey":
        keys = _distinct(rng, n_keys, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
        values = _distinct(rng, n_keys, number)
        inserts = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values)]
        i = rng.randrange(n_keys)
        tail = (f"\n\nQuestion: What is the special magic number for {keys[i]} mentioned in the provided text?\n"
                f"Answer: The special magic number for {keys[i]} mentioned in the provided text is")
        return _MK_HEADER, inserts, tail, [values[i]], "first_line"
    if task == "multivalue":
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        values = _distinct(rng, n_values, number)
        inserts = [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values]
        tail = (f"\n\nQuestion: What are all the special magic numbers for {key} mentioned in the provided text?\n"
                f"Answer: The special magic numbers for {key} mentioned in the provided text are")
        return _MK_HEADER, inserts, tail, values, "all"
    if task == "vartrack":
        names = _distinct(rng, n_chains * (n_hops + 1), lambda: "".join(rng.choice(string.ascii_uppercase)
                                                                       for _ in range(5)))
        values = _distinct(rng, n_chains, lambda: str(rng.randint(10_000, 99_999)))
        inserts = []
        for c in range(n_chains):
            chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
            depths = sorted(rng.random() for _ in chain)  # a chain reads in order
            inserts.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
            for j in range(1, len(chain)):
                inserts.append((depths[j], f"VAR {chain[j]} = VAR {chain[j - 1]}."))
        q = rng.randrange(n_chains)
        tail = (f"\n\nQuestion: Find all variables that are assigned the value {values[q]} in the text above.\n"
                f"Answer: According to the chain(s) of variable assignment in the text above, {n_hops + 1} "
                f"variables are assigned the value {values[q]}, they are:")
        return _VT_HEADER, inserts, tail, names[q * (n_hops + 1):(q + 1) * (n_hops + 1)], "all"
    raise ValueError(f"unknown RULER task {task!r} (known: {', '.join(RULER_TASKS)})")


def _insert_all(hay: str, inserts: Sequence[Tuple[float, str]]) -> Tuple[str, List[str]]:
    """Insert each sentence at the sentence boundary nearest its depth (inserts at the same boundary keep
    their order); returns the text and the sentences in text order."""
    bounds = niah._sentence_boundaries(hay)
    placed = []
    for i, (depth, sentence) in enumerate(inserts):
        cands = bounds[1:] if depth > 0 and len(bounds) > 1 else bounds
        target = depth * len(hay)
        b = min(cands, key=lambda x: (abs(x - target), x))
        placed.append((b, i, sentence))
    placed.sort()
    pieces, pos = [], 0
    for b, _, sentence in placed:
        seg = hay[pos:b].strip()
        if seg:
            pieces.append(seg)
        pieces.append(sentence)
        pos = b
    rest = hay[pos:].strip()
    if rest:
        pieces.append(rest)
    return " ".join(pieces), [s for _, _, s in placed]


def build_inserted_prompt(count_tokens: Callable[[str], int], target_tokens: int, header: str, tail: str,
                          inserts: Sequence[Tuple[float, str]], haystack_dir: Union[str, Path, None] = None, *,
                          tolerance: float = 0.01, max_count_calls: int = 24) -> Tuple[str, int, List[str], int]:
    """A prompt ``header + haystack-with-inserts + tail`` of ``target_tokens*(1-tolerance) .. target_tokens``
    tokens (by ``count_tokens``). Returns (text, n_tokens, inserts in text order, count calls)."""
    if target_tokens <= 0:
        raise ValueError("target_tokens must be positive")
    hs = niah._Haystack(niah.load_haystack(haystack_dir))
    cache: Dict[int, Tuple[int, str, List[str]]] = {}
    calls = 0

    def evaluate(n: int, snap: bool = True) -> Tuple[int, int]:
        nonlocal calls
        hay = hs.prefix(n, snap)
        n_eff = len(hay)
        if n_eff not in cache:
            body, order = _insert_all(hay, inserts)
            text = header + body + tail
            calls += 1
            cache[n_eff] = (count_tokens(text), text, order)
        return n_eff, cache[n_eff][0]

    lo_ok, aim = target_tokens * (1.0 - tolerance), target_tokens * (1.0 - tolerance / 4.0)
    ok = lambda t: lo_ok <= t <= target_tokens  # noqa: E731
    n0, overhead = evaluate(0)
    if overhead > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is smaller than the fixed prompt overhead ({overhead})")
    lo: Tuple[int, int] = (n0, overhead)
    hi: Optional[Tuple[int, int]] = None
    n, t = evaluate(int(min(max(4.0 * (target_tokens - overhead), 2000), 200_000)))
    found = n if ok(t) else (n0 if ok(overhead) else None)
    while found is None and calls < max_count_calls:
        if t <= target_tokens:
            lo = max(lo, (n, t))
        else:
            hi = (n, t) if hi is None or n < hi[0] else hi
        if hi is None:  # extrapolate with the measured chars per token
            cpt = (n - n0) / max(t - overhead, 1)
            guess = int(n + (aim - t) * cpt * 1.02) + 16
        else:
            (na, ta), (nb, tb) = lo, hi
            if nb - na <= 1:
                break
            guess = int(round(na + (aim - ta) * (nb - na) / max(tb - ta, 1)))
            if guess <= na or guess >= nb:
                guess = (na + nb) // 2
        n, t = evaluate(guess)
        if (n <= lo[0] or (hi is not None and n >= hi[0])) and not ok(t):
            n, t = evaluate(guess, snap=False)  # word snapping stalled: cut mid-word
        if ok(t):
            found = n
    if found is None:
        best = min(cache.items(), key=lambda kv: abs(kv[1][0] - target_tokens))
        if abs(best[1][0] - target_tokens) > tolerance * target_tokens:
            raise ValueError(f"could not reach {target_tokens} tokens within {tolerance:.1%} after {calls} "
                             f"count_tokens calls (closest: {best[1][0]})")
        found = best[0]
    n_tok, text, order = cache[found]
    return text, n_tok, order, calls


def ruler_sample(task: str, count_tokens: Callable[[str], int], target_tokens: int, seed: int = 0, sample: int = 0,
                 haystack_dir: Union[str, Path, None] = None, *, n_keys: int = 4, n_values: int = 4, n_hops: int = 4,
                 n_chains: int = 1, tolerance: float = 0.01, reserve: int = 0) -> RulerSample:
    """One RULER-style sample; the same (task, target_tokens, seed, sample) always gives the same keys,
    values, depths and text (for the same tokenizer). The text is fitted to ``target_tokens - reserve``
    (the room a chat template takes), with the same keys and values."""
    rng = random.Random(f"ruler:{task}:{target_tokens}:{seed}:{sample}")
    header, inserts, tail, expected, scoring = _ruler_task(task, rng, n_keys, n_values, n_hops, n_chains)
    text, n_tok, order, calls = build_inserted_prompt(count_tokens, target_tokens - reserve, header, tail, inserts,
                                                      haystack_dir, tolerance=tolerance)
    return RulerSample(task=task, text=text, n_tokens=n_tok, expected=list(expected), inserts=order,
                       depths=[d for d, _ in inserts], scoring=scoring, max_tokens=RULER_MAX_TOKENS[task],
                       target_tokens=target_tokens, count_calls=calls)


def ruler_specs(tasks: Sequence[str], lengths: Sequence[int], samples: int, *, seed: int = 0,
                n_ctx_train: Optional[int] = None, haystack_dir: Union[str, Path, None] = None,
                task_args: Optional[Dict[str, int]] = None) -> List[PromptSpec]:
    """RULER prompts, ordered by length, then task, then sample."""
    task_args = dict(task_args or {})
    for t in tasks:
        if t not in RULER_TASKS:
            raise ValueError(f"unknown RULER task {t!r} (known: {', '.join(RULER_TASKS)})")
    specs = []
    for length in sorted(lengths):
        for task in tasks:
            max_tokens = RULER_MAX_TOKENS[task]
            target = _target_tokens(length, max_tokens, n_ctx_train)
            for s in range(samples):
                def build(runner, task=task, target=target, s=s) -> Prompt:
                    memo = _TokenMemo(runner.tokenize)
                    r = ruler_sample(task, memo.count, target, seed, s, haystack_dir, reserve=runner.chat_overhead,
                                     **task_args)
                    return Prompt(text=r.text, tokens=_run_tokens(runner, memo, r.text), expected=r.expected,
                                  scoring=r.scoring, max_tokens=r.max_tokens,
                                  info={"target_tokens": target, "inserts": r.inserts})

                specs.append(PromptSpec({"suite": "ruler", "task": task, "length": length, "sample": s, "seed": seed,
                                         "max_tokens": max_tokens, **task_args}, weight=float(target), build=build))
    return specs


# --------------------------------------------------------------------------------------------
# Summaries and plots
# --------------------------------------------------------------------------------------------

def _method_order(records: Iterable[Dict[str, Any]]) -> List[str]:
    seen: Dict[str, Tuple] = {}
    for r in records:
        mid = r["method"]
        if mid not in seen:
            seen[mid] = (_KIND_ORDER.get(r.get("kind"), 9), r.get("budget") or 0.0, mid)
    return sorted(seen, key=lambda m: seen[m])


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def summarize(records: Iterable[Dict[str, Any]], row_field: Optional[str] = None) -> Dict[str, Any]:
    """Accuracy per method x length (and per ``row_field`` value x length when given: depth for NIAH,
    task for RULER), with counts, mean recall, median prefill speed and mean DHSA density.

    Cases with an ``error`` are left out of the accuracies and counted in ``errors``.
    """
    records = list(records)
    recs = [r for r in records if not r.get("error")]
    errors = sum(1 for r in records if r.get("error"))
    methods = _method_order(recs)
    lengths = sorted({int(r["length"]) for r in recs})
    out: Dict[str, Any] = {"methods": methods, "lengths": lengths, "n_cases": len(recs), "errors": errors,
                           "accuracy": {}, "correct": {}, "count": {}, "overall": {}, "recall": {},
                           "prefill_tok_s": {}, "density": {}}
    for m in methods:
        mr = [r for r in recs if r["method"] == m]
        out["overall"][m] = _mean([float(bool(r["correct"])) for r in mr])
        out["accuracy"][m], out["correct"][m], out["count"][m] = {}, {}, {}
        out["recall"][m], out["prefill_tok_s"][m], out["density"][m] = {}, {}, {}
        for L in lengths:
            cell = [r for r in mr if int(r["length"]) == L]
            if not cell:
                continue
            k = str(L)
            out["correct"][m][k] = sum(1 for r in cell if r["correct"])
            out["count"][m][k] = len(cell)
            out["accuracy"][m][k] = out["correct"][m][k] / len(cell)
            out["recall"][m][k] = _mean([float(r.get("recall", float(bool(r["correct"])))) for r in cell])
            out["prefill_tok_s"][m][k] = _median([r["n_prompt"] / (r["t_prefill_ms"] / 1e3) for r in cell
                                                  if r.get("t_prefill_ms")])
            dens = [r["density"] for r in cell if r.get("density") is not None]
            out["density"][m][k] = _mean(dens)
    if row_field:
        rows = sorted({r[row_field] for r in recs}, key=lambda v: (str(type(v)), v))
        out["rows"] = {"field": row_field, "values": rows}
        grid: Dict[str, Dict[str, Dict[str, float]]] = {}
        rgrid: Dict[str, Dict[str, Dict[str, float]]] = {}
        for m in methods:
            grid[m], rgrid[m] = {}, {}
            for v in rows:
                grid[m][str(v)], rgrid[m][str(v)] = {}, {}
                for L in lengths:
                    cell = [r for r in recs if r["method"] == m and r[row_field] == v and int(r["length"]) == L]
                    if cell:
                        grid[m][str(v)][str(L)] = _mean([float(bool(r["correct"])) for r in cell])
                        rgrid[m][str(v)][str(L)] = _mean([float(r.get("recall", float(bool(r["correct"]))))
                                                          for r in cell])
        out["grid"] = grid          # accuracy per method, row value, length
        out["recall_grid"] = rgrid  # mean fraction of the expected values produced
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summary_markdown(summary: Dict[str, Any], title: str, meta: Optional[Dict[str, Any]] = None) -> str:
    lengths = [str(L) for L in summary["lengths"]]
    lines = [f"# {title}", ""]
    if meta:
        m = meta.get("model", {})
        lines += [f"- model: `{m.get('file')}` ({m.get('description')}) | KV cache K {m.get('type_k')}, V "
                  f"{m.get('type_v')} | chat template {'on' if m.get('chat_template') else 'off'}",
                  f"- machine: {meta.get('machine', {}).get('cpu')} | {meta.get('machine', {}).get('platform')} | "
                  f"threads {meta.get('model', {}).get('threads')}",
                  f"- pydhsa {meta.get('pydhsa_version')} | git {meta.get('git_commit') or 'n/a'} | "
                  f"{meta.get('system_info', '').strip()}",
                  f"- cases: {summary['n_cases']} (errors left out: {summary.get('errors') or 0})", ""]
    lines += ["## Accuracy (%) per method and context length (correct/total)", "",
              "| method | " + " | ".join(lengths) + " | all |", "|---" * (len(lengths) + 2) + "|"]
    for m in summary["methods"]:
        cells = []
        for L in lengths:
            if L in summary["accuracy"][m]:
                cells.append(f"{_pct(summary['accuracy'][m][L])} ({summary['correct'][m][L]}/"
                             f"{summary['count'][m][L]})")
            else:
                cells.append("-")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(summary['overall'][m])} |")
    if "grid" in summary and summary["rows"]["field"] == "task":
        lines += ["", "## Accuracy (%) per task, method and context length", "",
                  "| task | method | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 2) + "|"]
        for v in summary["rows"]["values"]:
            for m in summary["methods"]:
                row = summary["grid"][m].get(str(v), {})
                lines.append(f"| {v} | {m} | " + " | ".join(_pct(row.get(L)) for L in lengths) + " |")
    if "grid" in summary and summary["rows"]["field"] == "task":
        lines += ["", "## Mean recall (%) of the expected values (partial credit) per task", "",
                  "| task | method | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 2) + "|"]
        for v in summary["rows"]["values"]:
            for m in summary["methods"]:
                row = summary["recall_grid"][m].get(str(v), {})
                lines.append(f"| {v} | {m} | " + " | ".join(_pct(row.get(L)) for L in lengths) + " |")
    lines += ["", "## Median prefill speed (tok/s)", "", "| method | " + " | ".join(lengths) + " |",
              "|---" * (len(lengths) + 1) + "|"]
    for m in summary["methods"]:
        vals = summary["prefill_tok_s"][m]
        lines.append(f"| {m} | " + " | ".join("-" if vals.get(L) is None else f"{vals[L]:.0f}" for L in lengths)
                     + " |")
    dens_methods = [m for m in summary["methods"] if any(v is not None for v in summary["density"][m].values())]
    if dens_methods:
        lines += ["", "## Mean DHSA attention density (computed / causal pairs, DHSA layers only)", "",
                  "| method | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for m in dens_methods:
            vals = summary["density"][m]
            lines.append(f"| {m} | " + " | ".join("-" if vals.get(L) is None else f"{vals[L]:.3f}" for L in lengths)
                         + " |")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _niah_cmap():
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    if hasattr(cmap, "with_extremes"):
        return cmap.with_extremes(bad="#DDDDDD")
    cmap.set_bad("#DDDDDD")  # matplotlib < 3.4
    return cmap


def _grid_matrix(summary: Dict[str, Any], method: str):
    import numpy as np
    rows = summary["rows"]["values"]
    lengths = [str(L) for L in summary["lengths"]]
    mat = np.full((len(rows), len(lengths)), np.nan)
    for i, v in enumerate(rows):
        for j, L in enumerate(lengths):
            x = summary["grid"][method].get(str(v), {}).get(L)
            if x is not None:
                mat[i, j] = x
    return np.ma.masked_invalid(mat)


def _draw_grid(ax, summary, method, ylabels, ylabel, annotate=False):
    mat = _grid_matrix(summary, method)
    im = ax.imshow(mat, cmap=_niah_cmap(), vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(summary["lengths"])))
    ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in summary["lengths"]])
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels)
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_xticks([x - 0.5 for x in range(1, len(summary["lengths"]))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(ylabels))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    if annotate:
        import numpy as np
        mask = np.ma.getmaskarray(mat)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if not mask[i, j]:
                    ax.text(j, i, f"{100 * mat[i, j]:.0f}", ha="center", va="center", fontsize=8)
    acc = summary["overall"].get(method)
    ax.set_title(f"{method}\naccuracy {_pct(acc)}%", fontsize=9)
    return im


def plot_niah_heatmaps(summary: Dict[str, Any], out_dir: Union[str, Path], title: str = "") -> List[Path]:
    """One PNG per method (depth x length, green = found, red = missed, grey = not run) and one with all
    methods side by side. Returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    depths = summary["rows"]["values"]
    ylabels = [f"{100 * d:.0f}%" for d in depths]
    files = []
    # cells holding several needles show their fraction as a number
    multi = any(0.0 < x < 1.0 for g in summary["grid"].values() for row in g.values() for x in row.values())
    for m in summary["methods"]:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(summary["lengths"]), 2), 1.5 + 0.35 * len(depths)))
        im = _draw_grid(ax, summary, m, ylabels, "Needle depth", annotate=multi)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="fraction retrieved")
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"heatmap-{_safe(m)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    n = len(summary["methods"])
    if n:
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, squeeze=False,
                                 figsize=(cols * (1.2 + 0.9 * max(len(summary["lengths"]), 2)),
                                          rows * (1.5 + 0.35 * len(depths))))
        for i, m in enumerate(summary["methods"]):
            _draw_grid(axes[i // cols][i % cols], summary, m, ylabels, "Needle depth", annotate=multi)
        for j in range(n, rows * cols):
            axes[j // cols][j % cols].axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / "heatmaps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_ruler(summary: Dict[str, Any], out_dir: Union[str, Path], title: str = "") -> List[Path]:
    """Per method a task x length grid (accuracy annotated), plus accuracy vs length per task (one line
    per method) in ruler-accuracy.png."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    tasks = summary["rows"]["values"]
    files = []
    for m in summary["methods"]:
        fig, ax = plt.subplots(figsize=(1.6 + 0.9 * max(len(summary["lengths"]), 2), 1.4 + 0.45 * len(tasks)))
        im = _draw_grid(ax, summary, m, [str(t) for t in tasks], "Task", annotate=True)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label="accuracy")
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"ruler-{_safe(m)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    if tasks:
        # top row: exact accuracy (every expected value produced); bottom row: mean recall (partial credit)
        fig, axes = plt.subplots(2, len(tasks), squeeze=False, figsize=(4.2 * len(tasks), 6.6), sharey=True)
        for k, (grid_key, ylabel) in enumerate((("grid", "accuracy (%)"), ("recall_grid", "recall of values (%)"))):
            for i, t in enumerate(tasks):
                ax = axes[k][i]
                for m in summary["methods"]:
                    row = summary.get(grid_key, {}).get(m, {}).get(str(t), {})
                    xs = [L for L in summary["lengths"] if str(L) in row]
                    ax.plot(xs, [100 * row[str(L)] for L in xs], "--" if m.startswith("fixed") else "-", marker="o",
                            label=m)
                ax.set_xscale("log", base=2)
                ax.set_xticks(summary["lengths"])
                ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in summary["lengths"]])
                ax.minorticks_off()
                ax.set_title(f"{t}: {ylabel.split(' (')[0]}", fontsize=10)
                ax.set_xlabel("Context length (tokens)")
                ax.set_ylim(-5, 105)
                ax.grid(alpha=0.3)
            axes[k][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7, loc="best")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / "ruler-accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def write_summary(out_dir: Union[str, Path], records: List[Dict[str, Any]], meta: Dict[str, Any], suite: str,
                  plots: bool = True) -> Dict[str, Any]:
    """summary.json, summary.md and the PNGs of a NIAH or RULER result directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, row_field="depth" if suite == "niah" else "task")
    name = meta.get("model", {}).get("file", "")
    title = {"niah": "Needle in a Haystack", "ruler": "RULER-style synthetic tasks"}[suite] + (f": {name}" if name
                                                                                            else "")
    files: List[Path] = []
    if plots and summary["methods"]:
        try:
            files = plot_niah_heatmaps(summary, out_dir, title) if suite == "niah" else \
                plot_ruler(summary, out_dir, title)
        except ImportError as e:
            print(f"pydhsa: no plots ({e}; pip install matplotlib)", file=sys.stderr)
    summary["plots"] = [p.name for p in files]
    summary["meta"] = meta
    _write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(summary_markdown(summary, title, meta), encoding="utf-8")
    return summary


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Machine / build / model information
# --------------------------------------------------------------------------------------------

def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_info() -> Dict[str, Any]:
    roots = [Path(__file__).resolve().parent.parent, Path.cwd()]
    for root in roots:
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip()),
                    "git_root": str(root)}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"git_commit": None, "git_dirty": None}


def _system_info() -> Optional[str]:
    try:
        from . import _native
        return _native.ffi.string(_native.load().pydhsa_system_info()).decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({e})"


def collect_meta(runner=None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from . import __version__
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    meta = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "pydhsa_version": __version__,
            **_git_info(), "system_info": _system_info(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
                        "hostname": platform.node()},
            "lib_dir": _lib_dir()}
    if runner is not None and hasattr(runner, "describe"):
        meta["model"] = runner.describe()
    meta.update(extra or {})
    return meta


def _lib_dir() -> Optional[str]:
    try:
        from . import _native
        return str(_native.lib_dir())
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------

def _repo_root() -> Optional[Path]:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "bench").is_dir() else None


def default_out_dir(suite: str, model_path: Union[str, Path]) -> Path:
    """bench/results/<suite>-<model file stem>/ under the repository (source checkout) or the working
    directory (installed package)."""
    base = _repo_root() or Path.cwd()
    return base / "bench" / "results" / f"{suite}-{Path(model_path).stem}"


def _resolve_model(args) -> Tuple[Path, Optional[str]]:
    """The checked model file of -m FILE / --model-name NAME (default: the embedded DEFAULT_MODEL) and the
    registry name (None for a file). Also checks the -ctk/-ctv names, so that a bad one fails before loading."""
    from .api import cache_type_id
    from .gguf_info import check_model_path
    from .models import model_path
    if args.model and args.model_name:
        raise ValueError("give either -m/--model FILE or --model-name NAME, not both")
    cache_type_id(args.cache_type_k), cache_type_id(args.cache_type_v)
    name = None if args.model else (args.model_name or DEFAULT_MODEL)
    return check_model_path(Path(args.model) if args.model else model_path(name)), name


def _open_runner(args):
    path, name = _resolve_model(args)
    overrides = parse_overrides(args.dhsa_min_context, args.dhsa_opt)
    return ModelRunner(path, n_threads=args.threads, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                       overrides=overrides, n_gpu_layers=args.n_gpu_layers, type_k=args.cache_type_k,
                       type_v=args.cache_type_v, chat=args.chat, model_name=name)


def _run_accuracy_suite(suite: str, args, make_specs: Callable[[Any], List[PromptSpec]], methods: List[Method],
                        runner=None, out_dir: Optional[Path] = None) -> int:
    own = runner is None
    if own:
        runner = _open_runner(args)
    try:
        out = Path(out_dir or args.out or default_out_dir(suite, runner.model_path))
        out.mkdir(parents=True, exist_ok=True)
        store = niah.ResultStore(out / "cases.jsonl")
        meta = collect_meta(runner, {"suite": suite, "argv": sys.argv, "args": _args_dict(args),
                                     "dhsa_overrides": runner.overrides})
        _write_json(out / "meta.json", meta)
        counts = {"run": 0, "skipped": 0, "errors": 0, "total": 0}
        interrupted = False
        if not getattr(args, "summarize_only", False):
            try:
                counts = run_grid(make_specs(runner), methods, runner, store, overrides=runner.overrides,
                                  model_id=runner.model_id, early_stop=not args.no_early_stop, title=suite,
                                  progress=not args.quiet,
                                  extra={"threads": runner.n_threads, "n_gpu_layers": runner.n_gpu_layers,
                                         "type_k": runner.type_k, "type_v": runner.type_v,
                                         "chat_template": runner.chat})
            except KeyboardInterrupt:
                interrupted = True
                print(f"\npydhsa: interrupted; finished cases are kept in {store.path}, rerun the same command "
                      f"to resume", file=sys.stderr)
        records = [r for r in store.records() if r.get("model") == runner.model_id]  # this model and settings
        summary = write_summary(out, records, meta, suite, plots=not args.no_plots)
        print(summary_markdown(summary, f"{suite}: {out}"), end="")
        print(f"pydhsa: {suite}: {counts['run']} cases run, {counts['skipped']} already done, "
              f"{counts['errors']} errors; results in {out}", file=sys.stderr)
        if interrupted:
            return 130
        return 1 if counts["errors"] else 0
    finally:
        if own:
            runner.close()


def _args_dict(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "handler" and not k.startswith("_") and not callable(v)}


def run_niah(args, runner=None) -> int:
    if args.quick:
        _apply_quick(args, lengths="1024,2048", depths="0.1,0.5,0.9", methods="dense,dhsa:0.3", min_context=0)
    methods = parse_methods(args.methods)
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    if args.needles_per_cell < 1:
        raise ValueError("--needles-per-cell must be >= 1")

    def make(r):
        return niah_specs(lengths, depths, seed=args.seed, needles_per_cell=args.needles_per_cell,
                          max_tokens=args.max_tokens, n_ctx_train=r.n_ctx_train, haystack_dir=args.haystack_dir)
    return _run_accuracy_suite("niah", args, make, methods, runner)


def run_ruler(args, runner=None) -> int:
    if args.quick:
        _apply_quick(args, lengths="1024,2048", methods="dense,dhsa:0.3", min_context=0)
        args.samples = 1 if args.samples is None else args.samples
    methods = parse_methods(args.methods)
    lengths = parse_lengths(args.lengths)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    samples = 4 if args.samples is None else args.samples
    if samples < 1:
        raise ValueError("--samples must be >= 1")
    task_args = {"n_keys": args.n_keys, "n_values": args.n_values, "n_hops": args.n_hops, "n_chains": args.n_chains}
    if min(task_args.values()) < 1 or args.n_keys < 1:
        raise ValueError("--n-keys, --n-values, --n-hops and --n-chains must be >= 1")

    def make(r):
        return ruler_specs(tasks, lengths, samples, seed=args.seed, n_ctx_train=r.n_ctx_train,
                           haystack_dir=args.haystack_dir, task_args=task_args)
    return _run_accuracy_suite("ruler", args, make, methods, runner)


def _apply_quick(args, lengths=None, depths=None, methods=None, min_context=None) -> None:
    """--quick: a small smoke grid; flags given explicitly still win."""
    defaults = getattr(args, "_defaults", {})
    if lengths and args.lengths == defaults.get("lengths"):
        args.lengths = lengths
    if depths and getattr(args, "depths", None) == defaults.get("depths"):
        args.depths = depths
    if methods and args.methods == defaults.get("methods"):
        args.methods = methods
    if min_context is not None and args.dhsa_min_context is None:
        args.dhsa_min_context = min_context


# --------------------------------------------------------------------------------------------
# Speed / memory
# --------------------------------------------------------------------------------------------

def _rss_now() -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss() -> Optional[int]:
    try:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(v if sys.platform == "darwin" else v * 1024)
    except (ImportError, OSError):
        return None


def speed_worker(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One measured configuration (meant to run in a fresh process): load the model, build a haystack prompt of
    ``length`` tokens, prefill it and generate ``n_gen`` tokens greedily."""
    from .api import DEFAULT_CACHE_TYPE, Model
    t0 = time.perf_counter()
    model = Model(cfg["model_path"])
    t_load = (time.perf_counter() - t0) * 1e3
    rss_load = _rss_now()
    cache = {"type_k": cfg.get("type_k", DEFAULT_CACHE_TYPE), "type_v": cfg.get("type_v", DEFAULT_CACHE_TYPE)}
    method = parse_methods(cfg["method"])[0]
    overrides = cfg.get("overrides") or {}
    dhsa = method.config(model.dhsa_file_values(), overrides)
    n_gen = int(cfg["n_gen"])
    target = _target_tokens(int(cfg["length"]), n_gen, model.info.n_ctx_train)
    memo = _TokenMemo(lambda s: model.tokenize(s, add_special=True))
    p = niah.build_prompt(memo.count, target, 0.5, niah.NEEDLES[0], cfg.get("haystack_dir"))
    tokens = memo.tokens(p.text)
    memo.memo.clear()
    if cfg.get("warmup", True):  # thread pools, weight repacking, first-touch of the weights
        with model.session(n_ctx=64, n_threads=cfg["threads"], dhsa=None, **cache) as s:
            for _ in s.generate(tokens[:16], max_tokens=2, temperature=0, seed=0):
                pass
    n_ctx = len(tokens) + n_gen + CTX_MARGIN
    with model.session(n_ctx=n_ctx, n_threads=cfg["threads"], n_batch=cfg.get("n_batch", 2048),
                       n_ubatch=cfg.get("n_ubatch", 512), dhsa=dhsa, **cache) as s:
        t_start = time.perf_counter()
        gen = s.generate(tokens, max_tokens=n_gen, temperature=0, seed=0)
        t_first = None
        n_pieces = 0
        for _ in gen:
            if t_first is None:
                t_first = time.perf_counter()
            n_pieces += 1
        t_end = time.perf_counter()
        tm = s.timings()
        dens = s.dhsa_density()
    res = {"length": int(cfg["length"]), "method": cfg["method"], "n_prompt": len(tokens), "n_ctx": n_ctx,
           "t_load_ms": t_load, "t_prefill_ms": tm.t_prefill_ms, "n_prefill": tm.n_prefill,
           "t_generate_ms": tm.t_generate_ms, "n_generate": tm.n_generate,
           "prefill_tok_s": tm.prefill_tok_s, "decode_tok_s": tm.generate_tok_s,
           "ttft_ms": ((t_first or t_end) - t_start) * 1e3, "wall_ms": (t_end - t_start) * 1e3,
           "wall_decode_tok_s": (n_pieces - 1) / (t_end - t_first) if t_first and n_pieces > 1 and t_end > t_first
           else None,
           "peak_rss_bytes": tm.peak_rss_bytes, "ru_maxrss_bytes": _ru_maxrss(), "rss_after_load_bytes": rss_load,
           "density": dens.overall if dens is not None else None,
           "dhsa_config": dhsa.as_dict() if dhsa is not None else None}
    model.close()
    return res


def _worker_env() -> Dict[str, str]:
    """The environment of a worker: the pydhsa package of this process comes first on its path."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn_worker(cfg: Dict[str, Any], timeout: Optional[float] = None) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pydhsa.evals", "speed-worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=_worker_env(), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"speed worker failed (status {proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


SPEED_METRICS = ("prefill_tok_s", "t_prefill_ms", "ttft_ms", "decode_tok_s", "peak_rss_bytes")


def summarize_speed(runs: List[Dict[str, Any]], methods: Sequence[str], lengths: Sequence[int]) -> List[Dict[str, Any]]:
    """Median of each metric per (length, method) over the repeats, and ratios to dense at the same length:
    prefill/ttft speedup = dense time / method time, decode speedup = method tok/s / dense tok/s,
    rss_ratio = method peak RSS / dense peak RSS."""
    rows = []
    for L in lengths:
        med: Dict[str, Dict[str, Optional[float]]] = {}
        for m in methods:
            rs = [r for r in runs if r["length"] == L and r["method"] == m and not r.get("error")]
            if not rs:
                continue
            med[m] = {k: _median([r[k] for r in rs if r.get(k) is not None]) for k in SPEED_METRICS}
            med[m]["density"] = _mean([r["density"] for r in rs if r.get("density") is not None])
            med[m]["n_prompt"] = rs[0]["n_prompt"]
            med[m]["repeats"] = len(rs)
        dense = med.get("dense")
        for m, v in med.items():
            row = {"length": L, "method": m, **v}
            if dense and m != "dense":
                def ratio(a, b):
                    return a / b if a and b else None
                row["prefill_speedup"] = ratio(dense["t_prefill_ms"], v["t_prefill_ms"])
                row["ttft_speedup"] = ratio(dense["ttft_ms"], v["ttft_ms"])
                row["decode_speedup"] = ratio(v["decode_tok_s"], dense["decode_tok_s"])
                row["rss_ratio"] = ratio(v["peak_rss_bytes"], dense["peak_rss_bytes"])
            rows.append(row)
    return rows


def speed_markdown(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    m = meta.get("model", {})
    lines = ["# Speed and memory: dense versus DHSA", "",
             f"- model: `{m.get('file')}` | KV cache K {meta.get('type_k')}, V {meta.get('type_v')} | threads "
             f"{meta.get('threads')} | repeats {meta.get('repeats')} "
             f"(medians) | {meta.get('n_gen')} generated tokens",
             f"- machine: {meta.get('machine', {}).get('cpu')} | {meta.get('machine', {}).get('platform')}",
             f"- pydhsa {meta.get('pydhsa_version')} | git {meta.get('git_commit') or 'n/a'} | "
             f"{(meta.get('system_info') or '').strip()}", "",
             "| context | method | prompt | prefill tok/s | TTFT s | decode tok/s | peak RSS MiB | density | "
             "prefill x | TTFT x | decode x | RSS ratio |", "|---" * 12 + "|"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    for r in rows:
        lines.append(f"| {r['length']} | {r['method']} | {r['n_prompt']} | {f(r['prefill_tok_s'], '.1f')} | "
                     f"{f(r['ttft_ms'] and r['ttft_ms'] / 1e3, '.2f')} | {f(r['decode_tok_s'], '.1f')} | "
                     f"{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} | {f(r.get('density'), '.3f')} | "
                     f"{f(r.get('prefill_speedup'), '.2f')} | {f(r.get('ttft_speedup'), '.2f')} | "
                     f"{f(r.get('decode_speedup'), '.2f')} | {f(r.get('rss_ratio'), '.2f')} |")
    return "\n".join(lines) + "\n"


def plot_speed(rows: List[Dict[str, Any]], path: Union[str, Path], title: str = "") -> Path:
    """2x2: prefill speedup, decode speedup (vs dense), TTFT and peak RSS versus context length."""
    plt = _pyplot()
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("prefill_speedup", "prefill speedup vs dense (x)", 1.0), ("decode_speedup",
              "decode speedup vs dense (x)", 1.0), ("ttft_ms", "time to first token (s)", 1e-3),
              ("peak_rss_bytes", "peak RSS (MiB)", 1.0 / 2**20)]
    lengths = sorted({r["length"] for r in rows})
    for ax, (key, label, scale) in zip(axes.flat, panels):
        for m in methods:
            pts = [(r["length"], r.get(key)) for r in rows if r["method"] == m and r.get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", label=m,
                    linestyle="--" if m == "dense" else "-")
        if key.endswith("speedup"):
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.minorticks_off()
        ax.set_xticklabels([f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _new_run_id(taken) -> str:
    """A timestamp id no record in the store has yet: two runs started within one second (another cache type
    right after the first) must not share an id, or the second would count the first one's cases as done."""
    base = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    run_id, n = base, 1
    while run_id in taken:
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def run_speed(args, spawn: Callable[[Dict[str, Any]], Dict[str, Any]] = None) -> int:
    """Every (length, repeat, method) in a fresh worker process; methods interleaved inside each repeat so
    slow drifts of the machine hit all methods alike. Raw runs go to runs.jsonl as they finish
    (``--resume`` continues the latest run), medians and ratios to speed.json / speed.md / speed.png."""
    from .api import default_threads
    if args.quick:
        _apply_quick(args, lengths="1024,2048", methods="dense,dhsa:0.3", min_context=0)
        if args.repeats == getattr(args, "_defaults", {}).get("repeats"):
            args.repeats = 1
        if args.n_gen == getattr(args, "_defaults", {}).get("n_gen"):
            args.n_gen = 16
    spawn = spawn or _spawn_worker
    methods = parse_methods(args.methods)
    if not any(m.kind == "dense" for m in methods):
        methods = [Method("dense")] + methods  # ratios need dense measured in the same run
    lengths = parse_lengths(args.lengths)
    if args.repeats < 1 or args.n_gen < 1:
        raise ValueError("--repeats and --n-gen must be >= 1")
    overrides = parse_overrides(args.dhsa_min_context, args.dhsa_opt)
    model_path = _resolve_model(args)[0].resolve()
    threads = args.threads or default_threads()
    out = Path(args.out or default_out_dir("speed", model_path))
    out.mkdir(parents=True, exist_ok=True)
    store = niah.ResultStore(out / "runs.jsonl")
    setup = {"model": model_id(model_path, type_k=args.cache_type_k, type_v=args.cache_type_v),
             "threads": threads, "n_gen": args.n_gen,
             "n_batch": args.batch_size, "n_ubatch": args.ubatch_size, "overrides": overrides,
             "warmup": not args.no_warmup}
    records = store.records()
    run_ids = [r["run_id"] for r in records if r.get("setup") == json.loads(json.dumps(setup))]
    run_id = run_ids[-1] if args.resume and run_ids else _new_run_id({r.get("run_id") for r in records})
    mids = [m.method_id(overrides) for m in methods]
    plan = [(L, rep, m, mid) for L in lengths for rep in range(args.repeats) for m, mid in zip(methods, mids)]
    todo = [p for p in plan if not _record_done(store, {"run_id": run_id, "length": p[0], "repeat": p[1],
                                                        "method": p[3]})]
    meta = collect_meta(None, {"suite": "speed", "run_id": run_id, "threads": threads, "repeats": args.repeats,
                               "n_gen": args.n_gen, "n_batch": args.batch_size, "n_ubatch": args.ubatch_size,
                               "dhsa_overrides": overrides, "warmup": not args.no_warmup, "argv": sys.argv,
                               "type_k": args.cache_type_k, "type_v": args.cache_type_v,
                               "model": _model_meta(model_path, threads)})
    bar = Progress(len(todo), sum(p[0] for p in todo), title="speed", enabled=not args.quiet)
    if todo != plan and not args.quiet:
        print(f"speed: resuming run {run_id}: {len(plan) - len(todo)} of {len(plan)} runs already done",
              file=sys.stderr)
    errors = 0
    interrupted = False
    try:
        for L, rep, m, mid in todo:
            bar.show(f"L={L} {mid} repeat {rep + 1}")
            cfg = {"model_path": str(model_path), "length": L, "method": m.label, "overrides": overrides,
                   "n_gen": args.n_gen, "threads": threads, "n_batch": args.batch_size, "n_ubatch": args.ubatch_size,
                   "warmup": not args.no_warmup, "haystack_dir": args.haystack_dir,
                   "type_k": args.cache_type_k, "type_v": args.cache_type_v}
            ident = {"run_id": run_id, "length": L, "repeat": rep, "method": mid}
            rec = {**ident, "key": store.key_of(ident), "setup": setup}
            try:
                res = spawn(cfg)
                res["method"] = mid
                rec.update({k: v for k, v in res.items() if k != "length"})
                msg = (f"L={L} {mid} #{rep + 1}: prefill {res['prefill_tok_s']:.1f} tok/s, decode "
                       f"{res['decode_tok_s']:.1f} tok/s, peak {res['peak_rss_bytes'] / 2**20:.0f} MiB")
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                rec["error"] = str(e)
                errors += 1
                msg = f"L={L} {mid} #{rep + 1}: ERROR {e}"
            store.add(rec)
            bar.advance(L, msg)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\npydhsa: interrupted; rerun with --resume to continue run {run_id}", file=sys.stderr)
    finally:
        bar.close()
    runs = [r for r in store.records() if r.get("run_id") == run_id]
    rows = summarize_speed(runs, mids, lengths)
    result = {"meta": meta, "rows": rows, "runs": runs}
    _write_json(out / "speed.json", result)
    (out / "speed.md").write_text(speed_markdown(rows, meta), encoding="utf-8")
    if rows and not args.no_plots:
        try:
            plot_speed(rows, out / "speed.png", f"{model_path.name} | {meta['machine']['cpu']} | {threads} threads")
        except ImportError as e:
            print(f"pydhsa: no plot ({e}; pip install matplotlib)", file=sys.stderr)
    print(speed_markdown(rows, meta), end="")
    print(f"pydhsa: speed: results in {out}", file=sys.stderr)
    return 130 if interrupted else (1 if errors else 0)


def _model_meta(path: Path, threads: int) -> Dict[str, Any]:
    from .gguf_info import read_gguf_info
    d: Dict[str, Any] = {"path": str(path), "file": path.name, "size_bytes": path.stat().st_size, "threads": threads}
    try:
        info = read_gguf_info(path)
        d.update(architecture=info.architecture, name=info.metadata.get("general.name"),
                 n_ctx_train=info.arch_value("context_length"), dhsa_keys=dict(info.dhsa_keys))
    except Exception as e:  # noqa: BLE001
        d["info_error"] = str(e)
    return d


# --------------------------------------------------------------------------------------------
# Command-line flags (shared by `pydhsa niah|ruler|bench` and bench/*.py)
# --------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, lengths: str, methods: str) -> None:
    from .cli import add_cache_type_arguments
    p.add_argument("-m", "--model", default=None, metavar="FILE",
                   help=f"GGUF model file (default: the embedded model {DEFAULT_MODEL})")
    p.add_argument("--model-name", choices=known_models(), default=None,
                   help=f"an embedded model instead of -m, assembled once into the model cache "
                        f"(default {DEFAULT_MODEL})")
    add_cache_type_arguments(p)  # -ctk/-ctv; non-f16 cases are stored apart
    p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, comma separated, k = 1024 "
                                                      f"(default {lengths})")
    p.add_argument("--methods", default=methods, help="dense, dhsa:B (keysim) and fixed:B (block-sparse "
                                                      f"ablation), comma separated (default {methods})")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch size (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=int, default=512, help="physical batch size (default 512)")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<suite>-<model>/)")
    p.add_argument("--dhsa-min-context", type=int, default=None, metavar="N",
                   help="override DHSA min_context (contexts with fewer keys run dense; 0 = always DHSA)")
    p.add_argument("--dhsa-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="override another DHSA parameter (repeatable), e.g. chunk_avg=64")
    p.add_argument("--haystack-dir", default=None, help="haystack essays (default: $PYDHSA_HAYSTACK_DIR or "
                                                        "../shared/data/niah/haystack)")
    p.add_argument("--quick", action="store_true", help="small smoke grid: lengths 1024,2048, methods "
                   "dense,dhsa:0.3, DHSA min_context 0 (explicit flags still win)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_accuracy(p: argparse.ArgumentParser) -> None:
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, metavar="N",
                   help="layers offloaded to the GPU in a CUDA/Metal build (-1 = all; default 0 = CPU only); "
                        "such cases are stored apart from CPU ones")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the model's chat template, the answer prefix opening the assistant's turn "
                        f"(default auto: on for {', '.join(n for n in known_models() if is_chat_model(n))} and for "
                        "a GGUF with a template whose name says instruct or chat); stored apart")
    p.add_argument("--seed", type=int, default=0, help="seed of the needle rotation / task generator (default 0)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always generate max tokens (default: stop once the score can no longer change)")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing; rewrite summary.json/.md and the plots from cases.jsonl")


def _remember_defaults(p: argparse.ArgumentParser) -> None:
    p.set_defaults(_defaults={a.dest: a.default for a in p._actions if a.dest != "help"})


def add_niah_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_LENGTHS)), DEFAULT_METHODS)
    _add_accuracy(p)
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="needle depths, fractions 0..1 or percentages (default 0,0.1,...,1)")
    p.add_argument("--max-tokens", type=int, default=NIAH_MAX_TOKENS, help="tokens to generate (default 24)")
    p.add_argument("--needles-per-cell", type=int, default=1,
                   help="needles (different prompts) per length x depth cell (default 1)")
    _remember_defaults(p)


def add_ruler_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_LENGTHS)), DEFAULT_METHODS)
    _add_accuracy(p)
    p.add_argument("--tasks", default=",".join(RULER_TASKS), help=f"tasks (default {','.join(RULER_TASKS)})")
    p.add_argument("--samples", type=int, default=None, help="samples per task x length (default 4; --quick 1)")
    p.add_argument("--n-keys", type=int, default=4, help="multikey: keys inserted, one asked (default 4)")
    p.add_argument("--n-values", type=int, default=4, help="multivalue: values of the key (default 4)")
    p.add_argument("--n-hops", type=int, default=4, help="vartrack: hops per chain (default 4: 5 variables)")
    p.add_argument("--n-chains", type=int, default=1, help="vartrack: chains, one asked (default 1)")
    _remember_defaults(p)


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, ",".join(map(str, DEFAULT_SPEED_LENGTHS)), "dense,dhsa:0.3")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration, medians reported (default 3)")
    p.add_argument("--n-gen", type=int, default=64, help="tokens generated after the prefill (default 64)")
    p.add_argument("--resume", action="store_true", help="continue the latest run with the same settings")
    p.add_argument("--no-warmup", action="store_true", help="skip the tiny warm-up generation in each worker")
    _remember_defaults(p)


def cmd_niah(args) -> int:
    return run_niah(args)


def cmd_ruler(args) -> int:
    return run_ruler(args)


def cmd_speed(args) -> int:
    return run_speed(args)


def _script_main(add: Callable, run: Callable, description: str, argv=None) -> int:
    p = argparse.ArgumentParser(description=description)
    add(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # PydhsaError and friends
        from .errors import PydhsaError
        if isinstance(e, PydhsaError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def main_niah(argv=None) -> int:
    return _script_main(add_niah_arguments, run_niah, "Needle-in-a-Haystack grid: lengths x depths x methods.", argv)


def main_ruler(argv=None) -> int:
    return _script_main(add_ruler_arguments, run_ruler, "RULER-style synthetic tasks: tasks x lengths x methods.",
                        argv)


def main_speed(argv=None) -> int:
    return _script_main(add_speed_arguments, run_speed, "Prefill/decode speed and peak memory, dense versus DHSA.",
                        argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "speed-worker":
        print(json.dumps(speed_worker(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    print("usage: python -m pydhsa.evals speed-worker JSON (internal; use `pydhsa niah|ruler|bench`)",
          file=sys.stderr)
    sys.exit(2)
