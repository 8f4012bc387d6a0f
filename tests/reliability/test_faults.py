"""Faults while writing: a full disk, a read-only folder, SIGKILL halfway, two processes at once. For the
converter and for the model cache: the output either does not exist or is complete and correct, the input is
never touched, and a later run recovers without manual cleanup (a killed writer's temporary file included).

Full and read-only disks are real: small tmpfs mounts, which need root (CI and the dev machines run as root;
elsewhere these tests are skipped, saying so).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from harness import sha256

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@contextlib.contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{',ro' if read_only else ''}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pydhsa: error:"), result.stderr
    return lines[0]


def kill_when_temp_appears(argv, folder: Path, env=None, timeout=120.0):
    """Start argv, SIGKILL it as soon as a temporary file shows in `folder` (the write has begun)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the writer ended by itself ({proc.returncode}) before the kill"


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def four_mb_model(tmp_path_factory):
    from random_gguf import write_random_model
    return write_random_model(tmp_path_factory.mktemp("src") / "src.gguf", "llama", n_layer=2, n_head=4, n_head_kv=2,
                              head_dim=32, n_ff=256, n_vocab=8000, dtype="f32")


@needs_root
def test_convert_onto_a_full_disk_then_with_room(four_mb_model, tmp_path):
    before = sha256(four_mb_model)
    assert four_mb_model.stat().st_size > 4 << 20
    with tmpfs(tmp_path / "small", "1m") as d:
        result = run_cli("convert", str(four_mb_model), str(d / "out.gguf"), "--dhsa-budget", "0.3")
        assert result.returncode == 1, result
        assert "disk full" in one_error_line(result)
        assert list(d.iterdir()) == []  # neither the output nor a temporary file
    with tmpfs(tmp_path / "room", "16m") as d:
        result = run_cli("convert", str(four_mb_model), str(d / "out.gguf"), "--dhsa-budget", "0.3")
        assert result.returncode == 0, result.stderr
        from pydhsa_convert.gguf_dhsa import inspect_gguf
        assert inspect_gguf(d / "out.gguf").kv.value("llama.dhsa.budget") == pytest.approx(0.3)
        assert [p.name for p in d.iterdir()] == ["out.gguf"]
    assert sha256(four_mb_model) == before


@needs_root
def test_convert_into_a_read_only_folder(four_mb_model, tmp_path):
    with tmpfs(tmp_path / "ro", "16m", read_only=True) as d:
        result = run_cli("convert", str(four_mb_model), str(d / "out.gguf"), "--dhsa-budget", "0.3")
        assert result.returncode == 1, result
        assert "Read-only file system" in one_error_line(result)
        assert list(d.iterdir()) == []


@pytest.mark.model
def test_convert_killed_halfway_then_run_again(model_path, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "gemma-dhsa.gguf"
    before = sha256(model_path)
    argv = [sys.executable, "-m", "pydhsa", "convert", str(model_path), str(out), "--dhsa-budget", "0.3"]
    kill_when_temp_appears(argv, out_dir)
    assert not out.exists()
    assert len(temps(out_dir)) == 1  # what the killed writer left
    result = run_cli("convert", str(model_path), str(out), "--dhsa-budget", "0.3")
    assert result.returncode == 0, result.stderr
    assert temps(out_dir) == []  # the next run removed it
    assert out.stat().st_size >= model_path.stat().st_size
    assert sha256(model_path) == before


def assemble_argv():
    return [sys.executable, "-c", "from pydhsa.models import model_path; print(model_path(quiet=True))"]


def cache_env(cache: Path) -> dict:
    return {**os.environ, "PYDHSA_CACHE_DIR": str(cache)}


def assemble(cache: Path) -> subprocess.CompletedProcess:
    """The embedded model assembled into `cache` by a child process (its path on stdout)."""
    return subprocess.run(assemble_argv(), capture_output=True, text=True, env=cache_env(cache))


def assert_assembled(cache: Path, printed: str) -> None:
    models = cache / "models"
    target = Path(printed.strip())
    assert target.parent == models and target.is_file()
    assert target.with_suffix(".sha256").read_text().strip() == sha256(target)
    assert temps(models) == []


@pytest.mark.model
@needs_root
def test_model_cache_on_a_full_disk_then_with_room(model_path, tmp_path):
    with tmpfs(tmp_path / "small", "64m") as cache:
        result = assemble(cache)
        assert result.returncode != 0
        assert "disk full" in result.stderr, result.stderr
        assert list((cache / "models").iterdir()) == []
        cli = subprocess.run([sys.executable, "-m", "pydhsa", "run", "-p", "Hi", "-n", "1"], capture_output=True,
                             text=True, env=cache_env(cache))
        # the assembly's progress lines, then one error line
        errors = [line for line in cli.stderr.splitlines() if line.startswith("pydhsa: error:")]
        assert cli.returncode == 2 and len(errors) == 1 and cli.stderr.strip().splitlines()[-1] == errors[0]
        assert "cannot assemble model" in errors[0] and "disk full" in errors[0], errors
    with tmpfs(tmp_path / "room", "400m") as cache:
        result = assemble(cache)
        assert result.returncode == 0, result.stderr
        assert_assembled(cache, result.stdout)


@pytest.mark.model
def test_model_cache_killed_halfway_then_run_again(model_path, tmp_path):
    cache = tmp_path / "cache"
    kill_when_temp_appears(assemble_argv(), cache / "models", env=cache_env(cache))
    assert len(temps(cache / "models")) == 1 and not (cache / "models" / model_path.name).exists()
    result = assemble(cache)
    assert result.returncode == 0, result.stderr
    assert_assembled(cache, result.stdout)


@pytest.mark.model
def test_two_processes_assemble_the_model_at_once(model_path, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(assemble_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cache_env(cache)) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]
    assert_assembled(cache, results[0][0])
    assert sha256(Path(results[0][0].strip())) == sha256(model_path)
