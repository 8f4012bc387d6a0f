"""Threads and sessions (the API as servers use it): two sessions on one Model generate in parallel threads
exactly what they generate one after the other; a session used from two threads at once refuses the second
call with a clear error instead of corrupting its context; a generator closed halfway, or a session closed
under an unfinished stream, leaves no worker thread behind."""
from __future__ import annotations

import threading
import time

import pytest

from pydhsa.dhsa_params import DhsaConfig
from pydhsa.errors import PydhsaError

pytestmark = pytest.mark.model

PROMPTS = ["The history of the printing press begins", "A recipe for bread needs flour, water,"]


def generate(model, prompt, dhsa=None, n=24):
    with model.session(n_ctx=512, n_threads=1, dhsa=dhsa) as s:
        return "".join(s.generate(prompt, max_tokens=n, temperature=0))


def generate_threads():
    return [t for t in threading.enumerate() if t.name in ("pydhsa-generate", "pydhsa-prefill")]


@pytest.mark.parametrize("dhsa", [None, DhsaConfig(budget=0.3, min_context=0)], ids=["dense", "dhsa"])
def test_two_sessions_in_two_threads_match_one_after_the_other(model, dhsa):
    sequential = [generate(model, p, dhsa) for p in PROMPTS]
    results = [None, None]
    errors = []

    def run(i):
        try:
            results[i] = generate(model, PROMPTS[i], dhsa)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == sequential
    assert all(results)


def test_a_session_refuses_a_second_thread_while_busy(model):
    tokens = model.tokenize("word " * 1500)
    with model.session(n_ctx=2048, n_threads=1) as s:
        started = threading.Event()
        outcome = []

        def long_prefill():
            started.set()
            s.prefill(tokens)
            outcome.append("done")

        t = threading.Thread(target=long_prefill)
        t.start()
        started.wait()
        time.sleep(0.2)  # the prefill holds the session now (1500 tokens take seconds on one thread)
        with pytest.raises(PydhsaError, match="in use by another call"):
            s.prefill(model.tokenize(" more"))
        with pytest.raises(PydhsaError, match="in use by another call"):
            s.logits()
        t.join()
        assert outcome == ["done"]
        s.prefill(model.tokenize(" more"))  # free again once the first call returned
        assert s.logits().shape == (model.info.n_vocab,)


def test_closing_a_generator_halfway_frees_its_worker(model):
    with model.session(n_ctx=512, n_threads=1) as s:
        stream = s.generate(PROMPTS[0], max_tokens=200, temperature=0)
        first = [next(stream) for _ in range(3)]
        assert all(first)
        stream.close()
        assert not generate_threads()
        assert "".join(s.generate(max_tokens=4, temperature=0))  # the session is usable again


def test_closing_the_session_under_an_unfinished_stream(model):
    s = model.session(n_ctx=512, n_threads=1)
    stream = s.generate(PROMPTS[1], max_tokens=200, temperature=0)
    assert next(stream)
    s.close()  # stops the stream's worker, then frees the context
    assert not generate_threads()
    rest = list(stream)  # the stream ends: at most what the worker had queued before it stopped comes out
    assert len(rest) < 200
    with pytest.raises(PydhsaError, match="closed"):
        s.prefill([1, 2, 3])
