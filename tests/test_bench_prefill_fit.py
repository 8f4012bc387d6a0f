"""bench/prefill.py's in-model attention time: the length fit t(n)/n = a + b (n + 1) / 2 and its bound."""
import importlib.util
import random
from pathlib import Path

import pytest

pytest.importorskip("numpy")  # bench/attention.py, which prefill.py imports, needs it

PREFILL = Path(__file__).resolve().parents[1] / "bench" / "prefill.py"


def load_prefill():
    spec = importlib.util.spec_from_file_location("bench_prefill", PREFILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def speed_rows(a: float, b: float, lengths):
    return {"rows": [{"method": "dense", "n_prompt": n, "t_prefill_ms": n * (a + b * (n + 1) / 2)}
                     for n in lengths] + [{"method": "dhsa@0.3", "n_prompt": 999, "t_prefill_ms": 1.0}]}


def test_fit_recovers_a_and_b_on_random_lines():
    P = load_prefill()
    rng = random.Random()
    for _ in range(20):
        a, b = rng.uniform(0.5, 10.0), rng.uniform(1e-5, 1e-2)
        lengths = sorted(rng.sample(range(100, 5000), rng.randint(2, 5)))
        fit = P.fit_attention(speed_rows(a, b, lengths))
        assert fit["a_ms_per_token"] == pytest.approx(a, rel=1e-9)
        assert fit["b_ms_per_pair"] == pytest.approx(b, rel=1e-9)
        n = rng.randint(10_000, 40_000)
        t_dense = n * (a + b * (n + 1) / 2)
        assert P.attention_ms_from_fit(fit, n, t_dense) == pytest.approx(b * n * (n + 1) / 2, rel=1e-6)
        assert P.attention_ms_from_fit(fit, n, 0.5 * a * n) == 0.0  # never negative


def test_fit_needs_two_lengths_and_ignores_sparse_rows():
    P = load_prefill()
    assert P.fit_attention(speed_rows(1.0, 1e-3, [1024])) is None
    assert P.fit_attention(speed_rows(1.0, 1e-3, [1024, 1024])) is None
    assert P.fit_attention(speed_rows(1.0, 1e-3, [1024, 2048]))["points"] == [
        [1024, 1024 * (1.0 + 1e-3 * 1025 / 2)], [2048, 2048 * (1.0 + 1e-3 * 2049 / 2)]]


def test_amdahl_arithmetic_that_both_bounds_use():
    """With attention 80% of dense and an op 4x faster, the bound is 1 / (0.2 + 0.8 / 4) = 2.5x."""
    P = load_prefill()
    res = P.amdahl(t_dense_ms=1000.0, t_dhsa_ms=500.0, attn_flash_ms=800.0, attn_dhsa_ms=200.0)
    assert res["attn_share"] == pytest.approx(0.8)
    assert res["bound"] == pytest.approx(2.5)
    assert res["achieved"] == pytest.approx(2.0)
    assert res["achieved_over_bound"] == pytest.approx(0.8)
