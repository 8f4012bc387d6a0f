"""DHSA on architectures other than Gemma, end to end on random-weight GGUFs (tests/random_gguf.py):
llama (32/8 heads, d 128) and qwen2 (14/2 heads, d 64, Q/K/V biases). Every layer is global there, so
DHSA takes all of them. Dense ranges through the DHSA kernel must give dense's greedy tokens, DHSA settings
that apply to no layer must leave the logits bit-identical to dense (upstream), and the routes must say what
ran and why."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DENSE_RANGES, run_cli
from pydhsa import Model
from pydhsa.dhsa_params import DhsaConfig
from random_gguf import write_random_model

N_PROMPT = 2600  # past min_context (2048) below, and across five 512-key segments
SHAPES = {"llama": dict(n_head=32, n_head_kv=8, head_dim=128, n_embd=1024), "qwen2": dict(n_head=14, n_head_kv=2,
                                                                                          head_dim=64)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def arch_model(request, tmp_path_factory):
    arch = request.param
    path = write_random_model(tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf", arch, seed=7, **SHAPES[arch])
    with Model(path) as model:
        yield arch, path, model


@pytest.fixture(scope="module")
def prompt(arch_model):
    _, _, model = arch_model
    rng = np.random.default_rng(11)
    return [int(t) for t in rng.integers(0, 256, N_PROMPT)]  # byte tokens: any text the model could see


def run(model, tokens, dhsa=None, n_generate=12, **session_kw):
    with model.session(n_ctx=len(tokens) + n_generate + 8, n_threads=2, dhsa=dhsa, **session_kw) as s:
        s.prefill(tokens)
        logits = s.logits()
        text = "".join(s.generate(max_tokens=n_generate, temperature=0))
        return logits, text, s.dhsa_density(), s.dhsa_routes()


def test_every_layer_takes_dhsa_and_dense_ranges_are_dense(arch_model, prompt):
    arch, _, model = arch_model
    dense_logits, dense_text, _, _ = run(model, prompt)
    logits, text, density, routes = run(model, prompt, DhsaConfig(**DENSE_RANGES))
    assert routes == {il: "dhsa" for il in range(model.info.n_layer)}
    assert sorted(density.per_layer) == list(range(model.info.n_layer))
    assert density.overall == pytest.approx(1.0)
    assert text == dense_text
    # f32 accumulation in another order than upstream's flash attention: rounding, not a different key set.
    assert np.abs(logits - dense_logits).max() < 1e-2 * max(1.0, np.abs(dense_logits).max())


def test_sparse_budget_runs_sparse_on_every_layer(arch_model, prompt):
    _, _, model = arch_model
    _, text, density, _ = run(model, prompt, DhsaConfig(budget=0.3))
    assert sorted(density.per_layer) == list(range(model.info.n_layer))
    assert 0.2 < density.overall < 0.7, density  # sparse (sink, local window and dense tail add to the budget)
    assert text


def test_dhsa_off_is_bit_identical_to_dense(arch_model, prompt):
    _, _, model = arch_model
    dense_logits, dense_text, _, _ = run(model, prompt)
    inert_logits, inert_text, density, _ = run(model, prompt, DhsaConfig(min_context=1 << 20))
    assert density.overall is None
    np.testing.assert_array_equal(inert_logits, dense_logits)
    assert inert_text == dense_text


@pytest.mark.parametrize("cache", ["q8_0", "bf16"])
def test_quantised_cache_runs_dhsa_and_matches_dense_on_that_cache(arch_model, prompt, cache):
    _, _, model = arch_model
    dense_logits, dense_text, _, _ = run(model, prompt, type_k=cache, type_v=cache)
    logits, text, density, routes = run(model, prompt, DhsaConfig(**DENSE_RANGES), type_k=cache, type_v=cache)
    assert set(routes.values()) == {"dhsa"}
    assert density.overall == pytest.approx(1.0)
    assert text == dense_text
    assert np.abs(logits - dense_logits).max() < 1e-2 * max(1.0, np.abs(dense_logits).max())


def test_unsupported_cache_type_runs_dense_with_a_reason(arch_model, prompt):
    _, _, model = arch_model
    dense_logits, _, _, _ = run(model, prompt, n_generate=1, type_k="q4_0", type_v="q4_0")
    logits, _, density, routes = run(model, prompt, DhsaConfig(budget=0.3), n_generate=1, type_k="q4_0",
                                     type_v="q4_0")
    assert set(routes.values()) == {"dense: K/V cache type the DHSA kernel cannot read"}
    assert density.overall is None
    np.testing.assert_array_equal(logits, dense_logits)  # upstream attention, untouched
    assert model.dhsa_plan(DhsaConfig(), "q4_0", "q4_0") == list(routes.values())
    assert model.dhsa_plan(DhsaConfig(), "q8_0", "f16") == ["dhsa"] * model.info.n_layer


def test_cli_verbose_reports_layers_and_info_lists_the_plan(arch_model, tmp_path):
    _, path, model = arch_model
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("the quick brown fox jumps over the lazy dog " * 95)  # ~2,800 tokens here
    r = run_cli("run", str(path), "-f", str(prompt_file), "-n", "4", "-c", "4096", "-t", "2", "--temp", "0",
                "--dhsa-budget", "0.3", "-ctk", "q8_0", "-v")
    assert r.returncode == 0, r.stderr
    n = model.info.n_layer
    assert f"pydhsa: DHSA layers | dhsa: L0-{n - 1}" in r.stderr
    r = run_cli("info", str(path), "-ctk", "q4_0")
    assert r.returncode == 0, r.stderr
    assert f"dense: K/V cache type the DHSA kernel cannot read: {n} layers (L0-{n - 1})" in r.stdout


def test_sampling_flags(arch_model):
    """top-k 1 at any temperature is greedy; a strong repeat penalty changes a greedy continuation."""
    _, path, _ = arch_model
    greedy = run_cli("run", str(path), "-p", "abc abc abc abc", "-n", "16", "-t", "2", "--temp", "0")
    top1 = run_cli("run", str(path), "-p", "abc abc abc abc", "-n", "16", "-t", "2", "--temp", "1.5", "--top-k", "1",
                   "--seed", "3")
    assert greedy.returncode == 0 and top1.returncode == 0, greedy.stderr + top1.stderr
    assert top1.stdout == greedy.stdout
    penalised = run_cli("run", str(path), "-p", "abc abc abc abc", "-n", "16", "-t", "2", "--temp", "0",
                        "--repeat-penalty", "5", "--repeat-last-n", "-1")
    assert penalised.returncode == 0, penalised.stderr
    assert penalised.stdout != greedy.stdout


def test_chat_template(arch_model):
    arch, path, model = arch_model
    if arch != "qwen2":
        r = run_cli("run", str(path), "-cnv", "-p", "hi", "-n", "2")
        assert r.returncode == 2 and "no chat template" in r.stderr, r.stderr
        return
    text = model.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    r = run_cli("run", str(path), "-cnv", "-sys", "Be brief.", "-p", "hi", "-n", "4", "--temp", "0", "-t", "2")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", str(path), "-sys", "Be brief.", "-p", "hi", "-n", "4")
    assert r.returncode == 2 and "needs -cnv" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["-ctk", "q9_9"], "unknown KV cache type 'q9_9'"),
    (["-ctv", "q8_0", "-fa", "off"], "a quantised V cache (q8_0) needs flash attention"),
])
def test_bad_cache_types_are_one_line_errors(arch_model, args, message):
    _, path, _ = arch_model
    r = run_cli("run", str(path), "-p", "hi", "-n", "2", *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"pydhsa: error: {r.stderr.split('pydhsa: error: ')[1].strip()}"]
    assert message in r.stderr
