"""Run each tool on each malformed file in a child process, and judge how it ended.

A tool may accept a damaged file (a flipped byte inside a token's text is still a model) or refuse it, but
it must refuse it the way the CLI promises: exit status 2 and one `pydhsa: error:` line on stderr (the API:
a PydhsaError). Anything else is a defect: a signal (an upstream GGML_ASSERT is SIGABRT), a hang, a Python
traceback, another exit status, more than one line of error, the input file changed, or a partial output
left behind by `convert`.

Each run is a fork of this process (the package and its native library are loaded once, before the first
fork, and nothing in the parent has started a thread), so a crash kills only the child and a run costs
milliseconds plus what the tool does.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TOOLS = ("info", "run", "convert", "Model")
EXIT_TRACEBACK = 70   # the child's own status for an exception that escaped the tool
TIMEOUT_S = 120.0


@dataclass
class Outcome:
    case: str
    tool: str
    verdict: str          # "accepted", "refused", or the defect ("signal SIGABRT", "traceback", ...)
    detail: str = ""      # the last line of stderr

    @property
    def defect(self) -> bool:
        return self.verdict not in ("accepted", "refused")


def _argv(tool: str, path: Path, out: Path) -> list[str]:
    if tool == "info":
        return ["info", str(path)]
    if tool == "run":
        return ["run", str(path), "-p", "Hello world", "-n", "2", "-c", "128", "-t", "1", "--temp", "0"]
    if tool == "convert":
        return ["convert", str(path), str(out), "--dhsa-budget", "0.3"]
    raise ValueError(tool)


def _child(tool: str, path: Path, out: Path) -> int:
    if tool == "Model":
        from pydhsa import Model, PydhsaError
        try:
            Model(path).close()
        except PydhsaError as e:
            print(f"pydhsa: error: {e}", file=sys.stderr)
            return 2
        return 0
    from pydhsa.cli import main
    return main(_argv(tool, path, out))


def run_forked(fn: Callable[[], int], timeout: float = TIMEOUT_S) -> tuple[str, str, str]:
    """(how it ended, stdout, stderr) of fn() run in a forked child: "exit N", "signal NAME" or "timeout"."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller
            code = EXIT_TRACEBACK
            try:
                os.dup2(out_f.fileno(), 1)
                os.dup2(err_f.fileno(), 2)
                # Python's own streams may have been replaced (pytest's capture): point them at fds 1 and 2
                sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
                sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
                code = fn()
            except BaseException:
                traceback.print_exc()
                code = EXIT_TRACEBACK
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) else EXIT_TRACEBACK)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.005)
        out_f.seek(0)
        err_f.seek(0)
        stdout = out_f.read().decode("utf-8", "replace")
        stderr = err_f.read().decode("utf-8", "replace")
    if status is None:
        return "timeout", stdout, stderr
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}", stdout, stderr
    return f"exit {os.WEXITSTATUS(status)}", stdout, stderr


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def judge(case: str, tool: str, path: Path, workdir: Path, digest: str | None = None) -> Outcome:
    """Run `tool` on `path` (a malformed file) in a child and judge the result. `digest`: the file's sha256,
    when the caller has it (a corpus run hashes each file once, not once per tool)."""
    out_dir = workdir / "convert-out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "out.gguf"
    before = digest or sha256(path)
    how, _, stderr = run_forked(lambda: _child(tool, path, out))
    lines = [line for line in stderr.splitlines() if line.strip()]
    # an abort's own message rather than the backtrace ggml prints after it
    cause = [line for line in lines if "GGML_ASSERT" in line or "GGML_ABORT" in line or "terminate called" in line]
    detail = (cause or lines[-1:] or [""])[0][:300]
    verdict = _verdict(how, lines)
    if not verdict.startswith(("signal", "timeout")) and sha256(path) != before:
        verdict = "input modified"
    if tool == "convert":
        left = sorted(p.name for p in out_dir.iterdir())
        if verdict == "refused" and left:
            verdict = f"output left behind: {left}"
        for p in out_dir.iterdir():
            p.unlink()
    return Outcome(case, tool, verdict, detail)


def _verdict(how: str, lines: list[str]) -> str:
    if how == "exit 0":
        return "accepted"
    if how == f"exit {EXIT_TRACEBACK}" or any(line.startswith("Traceback") for line in lines):
        return "traceback"
    if how != "exit 2":
        return how
    errors = [line for line in lines if line.startswith("pydhsa: error:")]
    if len(errors) != 1 or len(lines) != 1:
        return f"{len(lines)} stderr lines"
    return "refused"


def run_corpus(cases, workdir: Path, tools=TOOLS, progress: bool = False) -> list[Outcome]:
    """Every case through every tool; each case's file is written, used and removed in turn."""
    import pydhsa._native
    pydhsa._native.load()  # once, in the parent, so that no child pays for it
    outcomes = []
    cases = list(cases)
    t0 = time.monotonic()
    for i, case in enumerate(cases):
        path = case.write(workdir / "case.gguf")
        try:
            digest = sha256(path)
            for tool in tools:
                outcomes.append(judge(case.name, tool, path, workdir, digest))
        finally:
            path.unlink()
        if progress:
            rate = (time.monotonic() - t0) / (i + 1)
            print(f"\r{i + 1}/{len(cases)} cases, ETA {rate * (len(cases) - i - 1):.0f} s ", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    """A table: per tool, how many runs accepted, refused, and each kind of defect."""
    by_tool: dict[str, Counter] = {}
    for o in outcomes:
        by_tool.setdefault(o.tool, Counter())[o.verdict] += 1
    rows = ["| tool | runs | accepted | refused | defects |", "|---|---|---|---|---|"]
    for tool, c in by_tool.items():
        defects = ", ".join(f"{v}: {n}" for v, n in c.items() if v not in ("accepted", "refused")) or "0"
        rows.append(f"| {tool} | {sum(c.values())} | {c['accepted']} | {c['refused']} | {defects} |")
    return "\n".join(rows)
