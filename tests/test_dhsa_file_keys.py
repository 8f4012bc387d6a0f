"""DHSA keys written into the real Gemma 3 270M GGUF are what `pydhsa info` shows and what
`pydhsa run` uses, unless a flag overrides them."""
from __future__ import annotations

import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.model

PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # a few hundred tokens


@pytest.fixture(scope="module")
def model_with_keys(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("keys") / "gemma3-dhsa.gguf"
    # min_context 0 so that DHSA engages on a short prompt.
    result = run_cli("convert", str(model_path), str(out), "--dhsa-budget", "0.25", "--dhsa-min-context", "0",
                     "--dhsa-boundary", "fixed", "--dhsa-sink", "16", "--dhsa-local", "16")
    assert result.returncode == 0, result.stderr
    return out


def test_info_shows_the_keys(model_with_keys):
    result = run_cli("info", str(model_with_keys))
    assert result.returncode == 0, result.stderr
    assert "gemma3.dhsa.budget = 0.25" in result.stdout
    assert "gemma3.dhsa.boundary = fixed" in result.stdout


def run_reported_config(path, *flags):
    result = run_cli("run", str(path), "-p", PROMPT, "-n", "2", "--temp", "0", "-c", "1024", "-v", *flags)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith("pydhsa: attention:"))
    return line, result.stderr


def measured_density(stderr: str) -> float:
    return float(re.search(r"DHSA density ([0-9.]+) overall", stderr).group(1))


def test_run_uses_the_file_budget(model_with_keys):
    line, stderr = run_reported_config(model_with_keys)
    assert "budget=0.25" in line and "boundary='fixed'" in line and "min_context=0" in line
    assert measured_density(stderr) < 0.9  # sparse attention really ran


def test_flags_override_the_file(model_with_keys):
    _, file_stderr = run_reported_config(model_with_keys)
    line, stderr = run_reported_config(model_with_keys, "--dhsa-budget", "0.5")
    assert "budget=0.5" in line and "boundary='fixed'" in line
    # What the engine ran, not only what was printed: the flag's larger budget computes more pairs than the
    # file's (on this short prompt the 64-token dense tail lifts both well above their budgets).
    assert measured_density(stderr) > measured_density(file_stderr) + 0.05
    line, stderr = run_reported_config(model_with_keys, "--dense")
    assert line == "pydhsa: attention: dense"
    assert "DHSA density" not in stderr


def test_dense_file_without_keys_stays_dense(model_path):
    line, _ = run_reported_config(model_path)
    assert line == "pydhsa: attention: dense"
