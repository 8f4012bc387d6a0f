"""Odd prompts and flags through `pydhsa run` on the real model: each is either run or refused with one
`pydhsa: error:` line and exit status 2, and a generation cut short by a full context says so."""
from __future__ import annotations

import pytest

from harness import run_forked

pytestmark = pytest.mark.model


def pydhsa_run(*argv):
    from pydhsa.cli import main
    how, out, err = run_forked(lambda: main(["run", *map(str, argv)]))
    return how, out, [line for line in err.splitlines() if line.strip()]


def assert_refused(result, needle):
    how, _, lines = result
    assert how == "exit 2", (how, lines)
    assert len(lines) == 1 and lines[0].startswith("pydhsa: error:") and needle in lines[0], lines


def assert_ran(result):
    how, out, lines = result
    assert how == "exit 0", (how, lines)
    assert not any("Traceback" in line or "error" in line for line in lines), lines
    return out, lines


def text_of_n_tokens(model, n):
    """A prompt that tokenizes (with BOS) to exactly n tokens."""
    for k in range(n, 0, -1):
        text = "word " * k
        if len(model.tokenize(text)) == n:
            return text
    raise AssertionError(f"no 'word ' prompt of {n} tokens")


def test_prompt_bytes_that_are_not_utf8(model_path, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Hello \xff\xfe world \xc3(")
    assert_refused(pydhsa_run(model_path, "-f", bad, "-n", "2"), "is not valid UTF-8 (byte 0xff at offset 6)")
    import os
    assert_refused(pydhsa_run(model_path, "-p", os.fsdecode(b"Hi \xff there"), "-n", "2"),
                   "the -p prompt is not valid UTF-8 (byte 0xff at offset 3)")


def test_empty_nul_and_special_only_prompts(model_path, tmp_path):
    assert_refused(pydhsa_run(model_path, "-p", "", "-n", "2"), "the prompt is empty")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"Hello\0world\0\0")
    assert_ran(pydhsa_run(model_path, "-f", nul, "-n", "2", "--temp", "0"))
    assert_ran(pydhsa_run(model_path, "-p", "<bos><start_of_turn><end_of_turn><eos>", "-n", "2", "--temp", "0"))


def test_a_one_megabyte_line(model_path, tmp_path):
    line = tmp_path / "line.txt"
    line.write_text("lorem ipsum dolor sit amet " * 40000)  # 1.08 MB, no newline
    assert_refused(pydhsa_run(model_path, "-f", line, "-n", "2"), "but the context holds")


def test_no_tokens_to_generate(model_path):
    out, _ = assert_ran(pydhsa_run(model_path, "-p", "Hello", "-n", "0"))
    assert out == "\n"


def test_context_exactly_full_and_generation_into_its_end(model_path, model):
    n_ctx = 256  # llama.cpp's context granularity: -c 256 holds exactly 256 tokens
    full = text_of_n_tokens(model, n_ctx)
    out, lines = assert_ran(pydhsa_run(model_path, "-p", full, "-c", n_ctx, "-n", "8", "--temp", "0"))
    assert f"prompt {n_ctx} tokens" in lines[0] and "generated 0 tokens" in lines[0], lines
    assert lines[1] == f"pydhsa: the context is full ({n_ctx} tokens): generation stopped after 0 tokens; " \
                       "raise -c for more", lines
    assert_refused(pydhsa_run(model_path, "-p", text_of_n_tokens(model, n_ctx + 1), "-c", n_ctx, "-n", "8"),
                   f"but the context holds {n_ctx}")
    near = text_of_n_tokens(model, n_ctx - 5)
    out, lines = assert_ran(pydhsa_run(model_path, "-p", near, "-c", n_ctx, "-n", "50", "--temp", "0"))
    assert "generated 5 tokens" in lines[0], lines
    assert "generation stopped after 5 tokens" in lines[1], lines
    _, lines = assert_ran(pydhsa_run(model_path, "-p", near, "-c", n_ctx, "-n", "5", "--temp", "0"))
    assert len(lines) == 1, lines  # asked for exactly what fits: no notice
