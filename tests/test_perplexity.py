"""`pydhsa perplexity`: the scoring arithmetic against a direct float64 computation, the windows, and end to
end on Gemma 3 270M: KLD 0 for dense against dense, the perplexity of a direct token-by-token computation,
and sparse positions reported when DHSA skips attention."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_cli
from pydhsa import niah
from pydhsa.perplexity import score_batch, summarize, windows


def _direct(logits, targets):
    x = logits.astype(np.float64)
    lp = x - x.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return lp, -lp[np.arange(len(targets)), targets]


@pytest.mark.parametrize("n, vocab", [(1, 7), (65, 1000), (130, 4099)])
def test_score_batch_matches_float64(n, vocab):
    rng = np.random.default_rng(n + vocab)
    test = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
    base = (test + rng.standard_normal((n, vocab)).astype(np.float32) * 0.5).astype(np.float32)
    targets = rng.integers(0, vocab, n)
    s = score_batch(test, targets, base)
    lt, nll_t = _direct(test, targets)
    lb, nll_b = _direct(base, targets)
    kld = (np.exp(lb) * (lb - lt)).sum(axis=1)
    np.testing.assert_allclose(s["nll"], nll_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["nll_base"], nll_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["kld"], kld, rtol=1e-4, atol=1e-5)
    assert (s["agree"] == (lb.argmax(1) == lt.argmax(1))).all()


def test_identical_logits_give_zero_kld_and_full_agreement():
    logits = np.random.default_rng(0).standard_normal((40, 500)).astype(np.float32)
    s = score_batch(logits, np.arange(40), logits.copy())
    assert (s["kld"] == 0).all() and s["agree"].all()
    stats = summarize(s, np.ones(40, bool))
    assert stats["kld_max"] == 0 and stats["top1_agree"] == 1 and stats["ppl"] == pytest.approx(stats["ppl_dense"])


def test_windows():
    tokens = list(range(10, 30))
    assert windows(tokens, 5, bos=1) == [[1, 10, 11, 12, 13], [1, 14, 15, 16, 17], [1, 18, 19, 20, 21],
                                         [1, 22, 23, 24, 25], [1, 26, 27, 28, 29]]
    assert windows(tokens, 8, bos=None, max_windows=2) == [list(range(10, 18)), list(range(18, 26))]
    assert windows(tokens, 40, bos=1) == []


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(niah.load_haystack()[:12000])  # about 2,500 tokens of the essays
    return path


@pytest.mark.model
def test_dense_against_dense_is_zero(model_path, text_file, tmp_path):
    out = tmp_path / "r.json"
    result = run_cli("perplexity", str(model_path), "-f", str(text_file), "-c", "512", "--chunks", "2",
                     "--kl-divergence", "--dense", "--json", str(out), "-t", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["all"]["positions"] == 2 * 511 and data["all"]["kld_max"] == 0.0
    assert data["all"]["top1_agree"] == 1.0 and data["sparse"] is None and data["kld_mean"] is None
    assert "Final estimate: PPL = " in result.stdout and "meta" in data and data["settings"]["ctx_size"] == 512


@pytest.mark.model
def test_perplexity_equals_a_direct_computation(model, model_path, text_file, tmp_path):
    out = tmp_path / "r.json"
    result = run_cli("perplexity", str(model_path), "-f", str(text_file), "-c", "64", "--chunks", "1", "--dense",
                     "--json", str(out), "-t", "2")
    assert result.returncode == 0, result.stderr
    window = windows(model.tokenize(text_file.read_text(), add_special=False), 64,
                     model.tokenize("", add_special=True)[0])[0]
    nll = []
    with model.session(n_ctx=64, n_threads=2) as s:  # one token at a time, through prefill and last_logits
        for j in range(63):
            s.prefill(window[j:j + 1])
            _, row = _direct(s.logits()[None, :], np.array([window[j + 1]]))
            nll.append(row[0])
    # One token per call and 64 per call take different upstream matmul paths on the quantised weights; a
    # CI run saw them 0.4% apart in perplexity (48.22 vs 48.04), so 1% leaves room for that, not for a
    # wrong window or an off-by-one position (tens of percent).
    assert json.loads(out.read_text())["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-2)


@pytest.mark.model
def test_sparse_positions_are_reported(model_path, text_file, tmp_path):
    out = tmp_path / "r.json"
    result = run_cli("perplexity", str(model_path), "-f", str(text_file), "-c", "2048", "--chunks", "1",
                     "--kl-divergence", "--dhsa-budget", "0.2", "--dhsa-min-context", "1024", "--json", str(out),
                     "-t", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    sparse, every = data["sparse"], data["all"]
    assert 0 < sparse["positions"] < every["positions"] == 2047
    assert data["kld_mean"] == sparse["kld_mean"] > 0 and 0 < data["top1_agree"] <= 1
    assert sparse["kld_p99"] <= sparse["kld_max"] and sparse["kld_median"] <= sparse["kld_p99"]
    assert "ran sparse" in result.stdout and "Same top token" in result.stdout
