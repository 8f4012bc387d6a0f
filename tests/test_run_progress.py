"""Long work shows progress and stops on request: prefill progress on stderr (a terminal, or --progress),
Ctrl-C during prefill exits 130 within a second with no traceback, and the API's prefill reports progress,
cancels from another thread and resets the session when interrupted."""
from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import niah_prompt_file, run_cli
from pydhsa.errors import PydhsaError

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def long_prompt(model, tmp_path_factory):
    return niah_prompt_file(model, tmp_path_factory.mktemp("progress"), 6000)


def test_progress_lines_with_the_flag(model_path, long_prompt):
    result = run_cli("run", str(model_path), "-f", str(long_prompt), "-n", "1", "--temp", "0", "-c", "8192",
                     "-b", "1024", "--progress")
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("pydhsa: prefill ")]
    assert len(lines) >= 5 and "tok/s | ETA" in lines[0]
    done = [int(l.split()[2].split("/")[0]) for l in lines]
    assert done == sorted(done) and lines[-1].split()[2] == f"{done[-1]}/{done[-1]}"


def test_no_progress_when_not_a_terminal(model_path, long_prompt):
    result = run_cli("run", str(model_path), "-f", str(long_prompt), "-n", "1", "--temp", "0", "-c", "8192")
    assert result.returncode == 0 and "pydhsa: prefill " not in result.stderr


def test_ctrl_c_during_prefill_on_a_terminal(model_path, long_prompt):
    """stderr on a pseudo-terminal: progress shows by default; SIGINT (what Ctrl-C sends) mid-prefill."""
    script = Path(sys.executable).with_name("pydhsa")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pydhsa"]
    master, slave = pty.openpty()
    proc = subprocess.Popen([*command, "run", str(model_path), "-f", str(long_prompt), "-n", "8", "-c", "8192",
                             "-b", "512"], stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 300
        while b"pydhsa: prefill " not in seen:  # prefill is running: the first batch is done
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            if select.select([master], [], [], 1.0)[0]:
                seen += os.read(master, 4096)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
        while select.select([master], [], [], 0.2)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert rc == 130, text
    assert took < 1.0, f"exited {took:.2f} s after SIGINT"
    assert "Traceback" not in text and "pydhsa: interrupted" in text
    assert "\r" in text  # the progress line rewrites itself on a terminal


def test_api_progress_and_cancel(model, long_prompt):
    tokens = model.tokenize(long_prompt.read_text(), add_special=True)
    with model.session(n_ctx=8192, n_batch=1024) as session:
        calls = []
        session.prefill(tokens, progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (len(tokens), len(tokens)) and len(calls) == -(-len(tokens) // 1024)
        session.reset()

        def cancel_soon(done, total):
            if done == 1024:
                threading.Thread(target=session.cancel).start()

        with pytest.raises(PydhsaError) as info:
            session.prefill(tokens, progress=cancel_soon)
        assert info.value.code == 10  # PYDHSA_ERR_CANCELLED
        session.reset()
        session.prefill(tokens[:100])  # usable again, and the request was consumed
        assert session.n_past == 100


def test_api_interrupt_resets_the_session(model, long_prompt):
    tokens = model.tokenize(long_prompt.read_text(), add_special=True)
    with model.session(n_ctx=8192, n_batch=1024) as session:
        def interrupt(done, total):
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            session.prefill(tokens, progress=interrupt)
        assert session.n_past == 0
