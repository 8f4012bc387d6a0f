"""llama.cpp's own programs from the fork (`pydhsa server | cli | llama-bench`, built with
CMAKE_ARGS="-DPYDHSA_BUILD_TOOLS=ON"): arguments pass straight through, DHSA keys work there; without the
option the commands say how to get them."""
from __future__ import annotations

import pytest

from conftest import run_cli
from pydhsa._native import lib_dir

HAVE_TOOLS = (lib_dir() / "llama-bench").exists()


@pytest.mark.skipif(HAVE_TOOLS, reason="this build has the programs")
@pytest.mark.parametrize("command", ["server", "cli", "llama-bench"])
def test_without_the_option_the_commands_say_how_to_build_them(command):
    result = run_cli(command, "-m", "x.gguf")
    assert result.returncode == 2
    assert 'CMAKE_ARGS="-DPYDHSA_BUILD_TOOLS=ON" pip install .' in result.stderr and "Traceback" not in result.stderr


@pytest.mark.model
@pytest.mark.skipif(not HAVE_TOOLS, reason='built without llama.cpp\'s programs (CMAKE_ARGS="-DPYDHSA_BUILD_TOOLS=ON")')
def test_llama_bench_runs_dhsa_from_the_keys(model_path, tmp_path):
    keyed = tmp_path / "dhsa.gguf"
    assert run_cli("convert", str(model_path), str(keyed), "--dhsa-budget", "0.3").returncode == 0
    result = run_cli("llama-bench", "-m", str(keyed), "-p", "2560", "-n", "0", "-r", "1", "-t", "2", "-v")
    assert result.returncode == 0, result.stderr
    assert "pp2560" in result.stdout and "| model" in result.stdout  # llama-bench's own table
    assert "pydhsa: DHSA on (the model's GGUF keys)" in result.stderr
