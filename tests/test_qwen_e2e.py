"""DHSA end to end on the real Qwen2.5-Coder 0.5B Instruct GGUF (qwen2: 24 layers, all global, 14/2 heads,
d 64), NIAH prompts from the shared haystack in the model's ChatML template (completion-style prompts fail
on this instruct model even at 2K tokens): DHSA 0.3 finds the needle wherever dense does, and every layer
ran DHSA."""
from __future__ import annotations

import pytest

from pydhsa import Model, niah
from pydhsa.dhsa_params import DhsaConfig

pytestmark = pytest.mark.qwen


@pytest.fixture(scope="module")
def qwen(qwen_model_path):
    with Model(qwen_model_path) as m:
        yield m


def answer(model, tokens, dhsa):
    with model.session(n_ctx=len(tokens) + 32, n_threads=2, dhsa=dhsa) as s:
        text = "".join(s.generate(tokens, max_tokens=16, temperature=0))
        return text, s.dhsa_density(), s.dhsa_routes()


@pytest.mark.parametrize("length", [4096, 8192])
def test_needle_found_by_dhsa_wherever_dense_finds_it(qwen, length):
    found = {"dense": [], "dhsa": []}
    for i, depth in enumerate((0.1, 0.5, 0.9)):
        needle = niah.NEEDLES[(i + length // 4096) % len(niah.NEEDLES)]
        prompt = niah.build_prompt(lambda s: len(qwen.tokenize(s)), length - 40, depth, needle)
        tokens = qwen.tokenize(niah.as_chat(prompt.text, qwen.chat_prompt))
        for method, dhsa in (("dense", None), ("dhsa", DhsaConfig(budget=0.3))):
            text, density, routes = answer(qwen, tokens, dhsa)
            found[method].append(niah.score(text, prompt.expected))
            if dhsa is not None:
                assert set(routes.values()) == {"dhsa"} and len(routes) == qwen.info.n_layer
                assert 0.25 < density.overall < 0.6, density  # sparse, near the budget
    assert all(d <= s for d, s in zip(found["dense"], found["dhsa"])), found
    assert sum(found["dense"]) >= 2, found  # the test means something only if dense finds needles
