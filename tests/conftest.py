"""Shared fixtures: the real embedded GGUFs (Gemma 3 270M; Qwen2.5-Coder 0.5B when installed) and helpers to run
the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# DHSA settings whose selection is every causal key, through the DHSA kernel: the local window covers the whole
# context, so each block's forced range is [0, pe + 1). (Budget 1 does not do this: it is upstream's own dense
# attention.) Tests use it to check the kernel against dense attention on a real model.
DENSE_RANGES = dict(local_tokens=1 << 24)
# The shared data sits beside the repository; the installed package cannot know where that is.
os.environ.setdefault("PYDHSA_HAYSTACK_DIR", str(REPO_ROOT.parent / "shared" / "data" / "niah" / "haystack"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The Gemma 3 270M GGUF. The test extra installs it; a missing package is a failure, not a skip."""
    from pydhsa.default_model import default_model_path
    return default_model_path(quiet=True)


@pytest.fixture(scope="session")
def qwen_model_path() -> Path:
    """The Qwen2.5-Coder 0.5B Instruct GGUF; an optional extra, so without its packages the test is skipped."""
    from pydhsa import models
    name = "qwen2.5-coder-0.5b"
    missing = models.missing_packages(name)
    if missing:
        pytest.skip(f"needs {models.MODELS[name].install_hint} (not installed: {', '.join(missing)})")
    return models.model_path(name, quiet=True)


@pytest.fixture(scope="session")
def model(model_path):
    from pydhsa import Model
    with Model(model_path) as m:
        yield m


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `pydhsa` as a user would, in a child process."""
    script = Path(sys.executable).with_name("pydhsa")  # the console script pip installed
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pydhsa"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def niah_prompt_file(model, directory: Path, n_tokens: int) -> Path:
    """A NIAH prompt of about n_tokens tokens of `model` (needle 0 at 50% depth), written to directory."""
    from pydhsa import niah
    prompt = niah.build_prompt(lambda s: len(model.tokenize(s)), n_tokens, 0.5, niah.NEEDLES[0])
    path = directory / "prompt.txt"
    path.write_text(prompt.text)
    return path
