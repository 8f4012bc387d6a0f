"""Needle in a Haystack through `pydhsa run`: a ~4,000-token completion-style prompt built from the
shared haystack, the needle at 50% depth, greedy decoding; the model must print the secret."""
from __future__ import annotations

import pytest

from conftest import run_cli
from pydhsa import niah

pytestmark = pytest.mark.model


@pytest.mark.parametrize("needle_index", [0, 2])
def test_pydhsa_run_retrieves_the_needle_at_4k(model, model_path, tmp_path, needle_index):
    needle = niah.NEEDLES[needle_index]
    prompt = niah.build_prompt(lambda s: len(model.tokenize(s)), 4000, 0.5, needle)
    assert 3960 <= prompt.n_tokens <= 4000
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt.text)
    result = run_cli("run", str(model_path), "-f", str(prompt_file), "-n", "16", "--temp", "0", "-c", "4608")
    assert result.returncode == 0, result.stderr
    assert niah.score(result.stdout, prompt.expected), (prompt.expected, result.stdout)
