"""High-level Python API: Model and Session over libpydhsa.

    from pydhsa import Model
    with Model("model.gguf") as model:
        session = model.session(n_ctx=8192)
        for piece in session.generate("The capital of France is", max_tokens=16, temperature=0):
            print(piece, end="", flush=True)
        print(session.timings())

Ownership is explicit: a Model owns its C model, a Session its C context; both free them on close(),
on leaving a `with` block, or when garbage-collected. A Session keeps its Model alive.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from . import _native
from .errors import PydhsaError, error_for
from .dhsa_params import BOUNDARY_CHOICES, BOUNDARY_IMPLEMENTED

MAX_THREADS = 1024
DEFAULT_CACHE_TYPE = "f16"  # llama.cpp's default for -ctk/-ctv


def cache_type_id(name: str) -> int:
    """The ggml type id of a K/V cache type named as llama.cpp names it (f16, bf16, q8_0, q4_0, ...)."""
    lib = _native.load()
    type_id = int(lib.pydhsa_cache_type_from_name(str(name).encode()))
    if type_id < 0:
        names = _native.ffi.string(lib.pydhsa_cache_type_names()).decode()
        raise PydhsaError(f"unknown KV cache type {name!r}; use one of {names}")
    return type_id


def cache_type_names() -> list[str]:
    return _native.ffi.string(_native.load().pydhsa_cache_type_names()).decode().split(", ")


def route_name(route: int) -> str:
    """The engine's text for a layer route: "dhsa", or "dense: <why>" (llama_dhsa_route_name)."""
    return _native.ffi.string(_native.load().pydhsa_dhsa_route_name(int(route))).decode()


def _check(lib, status: int, err) -> None:
    if status != 0:
        raise error_for(int(err.code) or status, _native.ffi.string(err.message).decode("utf-8", "replace"))


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    description: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int
    n_ctx_train: int
    n_swa: int
    n_vocab: int
    n_params: int
    size_bytes: int
    add_bos: bool


@dataclass(frozen=True)
class Timings:
    t_load_ms: float
    t_prefill_ms: float
    n_prefill: int
    t_generate_ms: float
    n_generate: int
    n_past: int
    peak_rss_bytes: int

    @property
    def prefill_tok_s(self) -> float:
        return self.n_prefill / (self.t_prefill_ms / 1e3) if self.t_prefill_ms > 0 else 0.0

    @property
    def generate_tok_s(self) -> float:
        return self.n_generate / (self.t_generate_ms / 1e3) if self.t_generate_ms > 0 else 0.0


@dataclass(frozen=True)
class DhsaDensity:
    per_layer: dict      # layer index -> computed / causal pairs (layers that ran the DHSA kernel)
    overall: Optional[float]  # over those layers; None when no layer ran it (e.g. a short context)


def _fill_dhsa_params(c, cfg) -> None:
    if cfg.boundary not in BOUNDARY_IMPLEMENTED:
        raise PydhsaError(f"DHSA boundary {cfg.boundary!r} is not implemented in the engine "
                          f"(use {' or '.join(BOUNDARY_IMPLEMENTED)})")
    c.enabled = True
    c.budget = float(cfg.budget)
    c.boundary = BOUNDARY_CHOICES.index(cfg.boundary)  # the table's choice index
    c.chunk_min, c.chunk_max, c.chunk_avg = cfg.chunk_min, cfg.chunk_max, cfg.chunk_avg
    c.q_block, c.sink_tokens, c.local_tokens = cfg.q_block, cfg.sink_tokens, cfg.local_tokens
    c.dense_tail, c.min_context = cfg.dense_tail, cfg.min_context
    c.all_layers = cfg.layers == "all"
    c.sparse_decode = cfg.decode == "sparse"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _Handle:
    """An object owning a native pointer (`_ptr`) that `close()` frees: a context manager, closed when
    collected if the caller did not."""
    _ptr = None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self.close()


class Model(_Handle):
    """A GGUF model loaded by the engine. `n_gpu_layers`: layers to offload (-1 = all, 0 = CPU only).
    `metadata_only`: hyperparameters, vocabulary and tensor shapes without the weights (info, dhsa_plan,
    chat templates; no sessions)."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, verbose: bool = False,
                 metadata_only: bool = False):
        self._lib = _native.load()
        self._ptr = None
        self.path = Path(path)
        ffi = _native.ffi
        self._lib.pydhsa_set_verbose(bool(verbose))
        out = ffi.new("pydhsa_model **")
        err = ffi.new("pydhsa_error *")
        if metadata_only:
            status = self._lib.pydhsa_model_load_metadata(os.fsencode(self.path), out, err)
        else:
            status = self._lib.pydhsa_model_load(os.fsencode(self.path), int(n_gpu_layers), out, err)
        _check(self._lib, status, err)
        self._ptr = out[0]
        info = ffi.new("pydhsa_model_info *")
        _check(self._lib, self._lib.pydhsa_model_get_info(self._ptr, info, err), err)
        self.info = ModelInfo(
            architecture=ffi.string(info.architecture).decode(), description=ffi.string(info.description).decode(),
            n_layer=info.n_layer, n_head=info.n_head, n_head_kv=info.n_head_kv, n_embd=info.n_embd,
            head_dim=info.head_dim, n_ctx_train=info.n_ctx_train, n_swa=info.n_swa, n_vocab=info.n_vocab,
            n_params=int(info.n_params), size_bytes=int(info.size_bytes), add_bos=bool(info.add_bos))

    def _handle(self):
        if self._ptr is None:
            raise PydhsaError("the model has been closed")
        return self._ptr

    def meta(self, key: str) -> Optional[str]:
        """A metadata value as text, or None when the file has no such key."""
        ffi = _native.ffi
        buf = ffi.new("char[]", 4096)
        err = ffi.new("pydhsa_error *")
        if self._lib.pydhsa_model_meta(self._handle(), key.encode(), buf, len(buf), err) != 0:
            return None
        return ffi.string(buf).decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        ffi = _native.ffi
        data = text.encode("utf-8")
        n_out = ffi.new("int32_t *")
        err = ffi.new("pydhsa_error *")
        capacity = len(data) + 8
        while True:
            tokens = ffi.new("int32_t[]", capacity)
            status = self._lib.pydhsa_tokenize(self._handle(), data, len(data), add_special, tokens, capacity, n_out, err)
            if status == self._lib.PYDHSA_ERR_BUFFER:  # too small: retry with the size the library asked for
                capacity = n_out[0]
                continue
            _check(self._lib, status, err)
            return list(tokens[0:n_out[0]])

    def detokenize(self, tokens: Sequence[int]) -> str:
        ffi = _native.ffi
        arr = ffi.new("int32_t[]", list(tokens))
        n_out = ffi.new("int32_t *")
        err = ffi.new("pydhsa_error *")
        capacity = 16 * len(tokens) + 16
        while True:
            buf = ffi.new("char[]", capacity)
            status = self._lib.pydhsa_detokenize(self._handle(), arr, len(tokens), buf, capacity, n_out, err)
            if status == self._lib.PYDHSA_ERR_BUFFER:
                capacity = n_out[0] + 1
                continue
            _check(self._lib, status, err)
            return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")

    def chat_prompt(self, messages: Sequence[dict], add_assistant: bool = True) -> str:
        """`messages` ([{"role": "system"|"user"|"assistant", "content": text}, ...]) in the model's own
        chat template (llama_chat_apply_template), ending with the start of the assistant's turn."""
        ffi = _native.ffi
        roles = [ffi.new("char[]", str(m["role"]).encode()) for m in messages]
        contents = [ffi.new("char[]", str(m["content"]).encode()) for m in messages]
        role_arr, content_arr = ffi.new("char *[]", roles), ffi.new("char *[]", contents)
        n_out = ffi.new("int32_t *")
        err = ffi.new("pydhsa_error *")
        capacity = 2 * sum(len(m["content"]) + len(m["role"]) for m in messages) + 256
        while True:
            buf = ffi.new("char[]", capacity)
            status = self._lib.pydhsa_chat_apply(self._handle(), role_arr, content_arr, len(messages),
                                                 bool(add_assistant), buf, capacity, n_out, err)
            if status == self._lib.PYDHSA_ERR_BUFFER:
                capacity = n_out[0] + 1
                continue
            _check(self._lib, status, err)
            return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")

    def dhsa_plan(self, dhsa: Optional["DhsaConfig"] = None, type_k: str = DEFAULT_CACHE_TYPE,
                  type_v: str = DEFAULT_CACHE_TYPE) -> list[str]:
        """Per layer, what DHSA would do with these settings and cache types: "dhsa" or "dense: <why>"
        (the engine's own rules, from the hyperparameters and weights)."""
        ffi = _native.ffi
        n = self.info.n_layer
        routes = ffi.new("int32_t[]", max(n, 1))
        all_layers = dhsa is not None and dhsa.layers == "all"
        self._lib.pydhsa_model_dhsa_plan(self._handle(), all_layers, cache_type_id(type_k), cache_type_id(type_v),
                                         routes, n)
        return [route_name(routes[il]) for il in range(n)]

    def dhsa_file_values(self) -> dict:
        """The `<arch>.dhsa.*` parameters stored in the model file ({} when it has none)."""
        from .dhsa_params import read_gguf_dhsa
        return dict(read_gguf_dhsa(self.path))

    def session(self, n_ctx: int = 4096, n_threads: Optional[int] = None, n_batch: int = 2048, n_ubatch: int = 512,
                verbose: bool = False, dhsa: Optional["DhsaConfig"] = None,
                flash_attn: Optional[bool] = None, type_k: str = DEFAULT_CACHE_TYPE,
                type_v: str = DEFAULT_CACHE_TYPE) -> "Session":
        """A new context. `dhsa`: a pydhsa.dhsa_params.DhsaConfig to run DHSA attention, None for dense.
        `flash_attn`: None = llama.cpp's automatic choice, True/False to force it (dense only).
        `type_k`/`type_v`: KV cache types by llama.cpp's names (cache_type_names(); f16 by default)."""
        return Session(self, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, n_ubatch=n_ubatch, verbose=verbose,
                       dhsa=dhsa, flash_attn=flash_attn, type_k=type_k, type_v=type_v)

    def close(self) -> None:
        if self._ptr is not None:
            self._lib.pydhsa_model_free(self._ptr)
            self._ptr = None



class Session(_Handle):
    """A context (KV cache) on a Model: prefill tokens, then generate.

    One session serves one call at a time: a call made while another thread's call (or an unfinished
    generate stream) uses it raises PydhsaError instead of corrupting the context. Sessions of one Model
    may run in parallel threads. cancel(), timings() and the DHSA statistics may be called at any time."""

    def __init__(self, model: Model, n_ctx: int = 4096, n_threads: Optional[int] = None, n_batch: int = 2048,
                 n_ubatch: int = 512, verbose: bool = False, dhsa: Optional["DhsaConfig"] = None,
                 flash_attn: Optional[bool] = None, type_k: str = DEFAULT_CACHE_TYPE,
                 type_v: str = DEFAULT_CACHE_TYPE):
        self.model = model
        self._lib = model._lib
        self._ptr = None
        self._busy = threading.Lock()  # held by the call that uses the context (see the class docstring)
        self._active_stream = None  # (stop event, worker thread) of a generate stream that has started
        ffi = _native.ffi
        threads = default_threads() if n_threads is None else int(n_threads)
        if not 1 <= threads <= MAX_THREADS:
            raise PydhsaError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")
        params = ffi.new("pydhsa_session_params *")
        self._lib.pydhsa_session_default_params(params)
        params.n_ctx, params.n_threads = int(n_ctx), threads
        params.n_batch, params.n_ubatch, params.verbose = int(n_batch), int(n_ubatch), bool(verbose)
        params.flash_attn = -1 if flash_attn is None else int(bool(flash_attn))
        params.type_k, params.type_v = cache_type_id(type_k), cache_type_id(type_v)
        self.type_k, self.type_v = type_k, type_v
        self.dhsa = dhsa
        if dhsa is not None:
            _fill_dhsa_params(params.dhsa, dhsa)
        out = ffi.new("pydhsa_session **")
        err = ffi.new("pydhsa_error *")
        _check(self._lib, self._lib.pydhsa_session_create(model._handle(), params, out, err), err)
        self._ptr = out[0]
        self.n_ctx = int(self._lib.pydhsa_session_n_ctx(self._ptr))
        self.n_threads = threads

    def _handle(self):
        if self._ptr is None:
            raise PydhsaError("the session has been closed")
        return self._ptr

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """Hold the session for one call; raise at once if another call holds it."""
        if not self._busy.acquire(blocking=False):
            raise PydhsaError(f"the session is in use by another call ({what} refused): a session serves one "
                              "call at a time; use a session per thread")
        try:
            yield
        finally:
            self._busy.release()

    @property
    def n_past(self) -> int:
        return self.timings().n_past

    def prefill(self, tokens: Sequence[int], progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Evaluate `tokens` after what the context holds. `progress(done, total)` is called after each batch
        (from another thread). The C call runs in a worker thread so that Ctrl-C (KeyboardInterrupt) stops
        it within a graph node's compute; the session is then reset (its context emptied) and the
        KeyboardInterrupt propagates."""
        with self._exclusive("prefill"):
            self._prefill(tokens, progress)

    def _prefill(self, tokens: Sequence[int], progress: Optional[Callable[[int, int], None]]) -> None:
        ffi = _native.ffi
        arr = ffi.new("int32_t[]", list(tokens))
        err = ffi.new("pydhsa_error *")
        failure: list = []

        @ffi.callback("int32_t(void *, int32_t, int32_t)")
        def on_progress(_user, done, total):
            try:
                if progress is not None:
                    progress(int(done), int(total))
            except BaseException as e:  # never raise across the C boundary
                failure.append(e)
                return 1
            return 0

        status: list = []

        def worker():
            try:
                status.append(self._lib.pydhsa_prefill_progress(self._handle(), arr, len(tokens), on_progress,
                                                                ffi.NULL, err))
            except BaseException as e:  # reported in the calling thread
                failure.append(e)

        thread = threading.Thread(target=worker, name="pydhsa-prefill", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.05)
        except KeyboardInterrupt:
            self.cancel()
            thread.join()
            self._reset()
            raise
        if failure:
            self._reset()
            raise failure[0]
        _check(self._lib, status[0], err)

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` (at most the batch size) after what the context holds and return the logits of
        every one of them, float32 [len(tokens), n_vocab]. No dense tail: every position runs the session's
        attention (for scoring text; see pydhsa.perplexity)."""
        n_vocab = self.model.info.n_vocab
        out = np.empty((len(tokens), n_vocab), dtype=np.float32)
        ffi = _native.ffi
        arr = ffi.new("int32_t[]", list(tokens))
        err = ffi.new("pydhsa_error *")
        buf = ffi.cast("float *", out.ctypes.data)
        with self._exclusive("eval_logits"):
            _check(self._lib, self._lib.pydhsa_eval_logits(self._handle(), arr, len(tokens), buf, out.size, err), err)
        return out

    def _dhsa_stats(self) -> tuple:
        """Per layer, the computed and the causal query-key pairs the DHSA kernel counted so far."""
        ffi = _native.ffi
        n = self.model.info.n_layer
        computed, causal = ffi.new("int64_t[]", n), ffi.new("int64_t[]", n)
        self._lib.pydhsa_session_dhsa_stats(self._handle(), computed, causal, n)
        return list(computed), list(causal)

    def dhsa_pairs(self) -> tuple:
        """(computed, causal) query-key pairs summed over the layers that ran the DHSA kernel so far; (0, 0)
        for a dense session. computed < causal means some attention was skipped."""
        if self.dhsa is None:
            return 0, 0
        computed, causal = self._dhsa_stats()
        return sum(computed), sum(causal)

    def cancel(self) -> None:
        """Ask the prefill or generation running in another thread to stop (thread-safe): it raises
        PydhsaError with code 10 (cancelled) within a graph node's compute; reset() before reusing the
        session. A request made while nothing runs stops the next call."""
        self._lib.pydhsa_session_cancel(self._handle())

    def reset(self) -> None:
        with self._exclusive("reset"):
            self._reset()

    def _reset(self) -> None:
        err = _native.ffi.new("pydhsa_error *")
        _check(self._lib, self._lib.pydhsa_session_reset(self._handle(), err), err)

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated position (float32, n_vocab)."""
        n_vocab = self.model.info.n_vocab
        out = np.empty(n_vocab, dtype=np.float32)
        err = _native.ffi.new("pydhsa_error *")
        buf = _native.ffi.cast("float *", out.ctypes.data)
        with self._exclusive("logits"):
            _check(self._lib, self._lib.pydhsa_last_logits(self._handle(), buf, n_vocab, err), err)
        return out

    def generate(self, prompt: Optional[str | Sequence[int]] = None, max_tokens: int = 128, temperature: float = 0.8,
                 seed: Optional[int] = None, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64,
                 progress: Optional[Callable[[int, int], None]] = None) -> Iterator[str]:
        """Yield the text of each generated token as it is produced.

        `prompt` (text or token ids) is prefilled first; text gets the model's BOS when the context is
        empty. max_tokens < 0 means until an end-of-generation token or a full context. temperature <= 0
        is greedy decoding; `seed` makes sampling repeatable (default: random). The other settings are
        llama.cpp's samplers with its defaults (top_k <= 0, top_p 1, min_p 0, repeat_penalty 1: off;
        repeat_last_n -1: the whole context). `progress` is prefill's (see prefill).
        """
        if prompt is not None:
            tokens = self.model.tokenize(prompt, add_special=self.n_past == 0) if isinstance(prompt, str) else prompt
            self.prefill(tokens, progress)
        if max_tokens < 0:
            max_tokens = self.n_ctx
        if seed is None:
            seed = random.getrandbits(32)
        if not 0 <= seed < 2**32:
            raise PydhsaError(f"seed must be between 0 and 2^32-1, got {seed}")
        sampling = _native.ffi.new("pydhsa_sampling_params *")
        self._lib.pydhsa_sampling_default_params(sampling)
        sampling.temperature, sampling.seed = float(temperature), int(seed)
        sampling.top_k, sampling.top_p, sampling.min_p = int(top_k), float(top_p), float(min_p)
        sampling.repeat_penalty, sampling.repeat_last_n = float(repeat_penalty), int(repeat_last_n)
        return self._stream(int(max_tokens), sampling)

    def _stream(self, max_tokens: int, sampling) -> Iterator[str]:
        # The C loop runs in a worker thread (without the GIL) and hands token pieces over a queue, so
        # the caller can consume them lazily; closing the generator asks the C loop to stop.
        ffi = _native.ffi
        pieces: "queue.Queue[tuple[str, object]]" = queue.Queue()
        stop = threading.Event()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        @ffi.callback("int32_t(void *, int32_t, const char *, int32_t)")
        def on_token(_user, _token, piece, n):
            try:
                text = decoder.decode(ffi.unpack(piece, n)) if n > 0 else ""
                if text:
                    pieces.put(("piece", text))
            except Exception as e:  # never raise across the C boundary
                pieces.put(("error", e))
                return 1
            return 1 if stop.is_set() else 0

        def worker():
            err = ffi.new("pydhsa_error *")
            n_generated = ffi.new("int32_t *")
            try:
                status = self._lib.pydhsa_generate_sampled(self._handle(), max_tokens, sampling, on_token,
                                                           ffi.NULL, n_generated, err)
                tail = decoder.decode(b"", final=True)
                if tail:
                    pieces.put(("piece", tail))
                if status != 0:
                    pieces.put(("error", error_for(int(err.code) or status, ffi.string(err.message).decode())))
            except Exception as e:
                pieces.put(("error", e))
            finally:
                pieces.put(("done", None))

        with self._exclusive("generate"):
            yield from self._pump(worker, pieces, stop)

    def _pump(self, worker, pieces, stop) -> Iterator[str]:
        """Run the generate worker and yield its pieces; the worker is stopped and joined however the
        consumer leaves (exhausted, closed halfway, an error), or by close()."""
        thread = threading.Thread(target=worker, name="pydhsa-generate", daemon=True)
        self._active_stream = (stop, thread)
        thread.start()
        try:
            while True:
                kind, value = pieces.get()
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            stop.set()
            thread.join()
            self._active_stream = None

    def dhsa_density(self) -> Optional[DhsaDensity]:
        """Attention density DHSA actually used (computed query-key pairs over causal pairs), per layer
        and overall, summed over everything evaluated so far; None for a dense session."""
        if self.dhsa is None:
            return None
        computed, causal = self._dhsa_stats()
        per_layer = {il: c / k for il, (c, k) in enumerate(zip(computed, causal)) if k > 0}
        overall = sum(computed) / sum(causal) if sum(causal) else None
        return DhsaDensity(per_layer=per_layer, overall=overall)

    def dhsa_routes(self) -> Optional[dict]:
        """Per layer, what the graphs built so far did with its attention: "dhsa" or "dense: <why>"
        (layers no graph has reached yet are left out); None for a dense session."""
        if self.dhsa is None:
            return None
        ffi = _native.ffi
        n = self.model.info.n_layer
        routes = ffi.new("int32_t[]", max(n, 1))
        self._lib.pydhsa_session_dhsa_routes(self._handle(), routes, n)
        return {il: route_name(routes[il]) for il in range(n) if routes[il] != 0}

    def timings(self) -> Timings:
        out = _native.ffi.new("pydhsa_timings *")
        self._lib.pydhsa_session_timings(self._handle(), out)
        return Timings(t_load_ms=out.t_load_ms, t_prefill_ms=out.t_prefill_ms, n_prefill=out.n_prefill,
                       t_generate_ms=out.t_generate_ms, n_generate=out.n_generate, n_past=out.n_past,
                       peak_rss_bytes=int(out.peak_rss_bytes))

    def close(self) -> None:
        """Free the context. A generate stream left unfinished is stopped first (its iterator then ends);
        a prefill or other call running in another thread makes close raise instead."""
        if self._ptr is None:
            return
        stream = self._active_stream
        if stream is not None and self._busy.locked():
            stop, thread = stream
            stop.set()  # the C loop stops at its next token (a stop, not an error, for the stream)
            thread.join()
            self._free()
            return
        with self._exclusive("close"):
            self._free()

    def _free(self) -> None:
        self._lib.pydhsa_session_free(self._ptr)
        self._ptr = None
