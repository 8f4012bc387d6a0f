"""Bad input gets one clear line on stderr and exit status 2 from the CLI, an exception from the API."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from pydhsa import ContextOverflowError, Model, ModelFileError, PydhsaError, UnsupportedModelError
from pydhsa.cli import main


def assert_one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit status {code}, stderr: {err}"
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pydhsa: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def truncated_files(model_path, tmp_path_factory):
    """The real model cut inside its header, and cut inside its tensor data."""
    d = tmp_path_factory.mktemp("truncated")
    data = model_path.read_bytes()
    header_cut, data_cut = d / "header-cut.gguf", d / "data-cut.gguf"
    header_cut.write_bytes(data[:2000])
    data_cut.write_bytes(data[: len(data) // 2])
    return header_cut, data_cut


@pytest.fixture(scope="module")
def unknown_arch_gguf(tmp_path_factory):
    import gguf
    path = tmp_path_factory.mktemp("arch") / "unknown-arch.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_model_file(capsys, tmp_path):
    assert_one_line_error(capsys, ["run", str(tmp_path / "nope.gguf"), "-p", "hi"], "not found", "nope.gguf")
    with pytest.raises(ModelFileError, match="not found"):
        Model(tmp_path / "nope.gguf")


def test_not_a_gguf_file(capsys, tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("this is a text file, not a model\n")
    assert_one_line_error(capsys, ["run", str(bogus), "-p", "hi"], "not a GGUF file")
    assert_one_line_error(capsys, ["info", str(bogus)], "not a GGUF file")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        Model(bogus)


def test_directory_as_model(capsys, tmp_path):
    assert_one_line_error(capsys, ["run", str(tmp_path), "-p", "hi"], "not a file")


@pytest.mark.model
def test_truncated_gguf(capsys, truncated_files):
    header_cut, data_cut = truncated_files
    assert_one_line_error(capsys, ["run", str(header_cut), "-p", "hi"], "truncated")
    assert_one_line_error(capsys, ["run", str(data_cut), "-p", "hi"], "truncated")
    assert_one_line_error(capsys, ["info", str(data_cut)], "truncated")
    # The engine itself refuses both, with an exception rather than a crash, when asked directly.
    for path in (header_cut, data_cut):
        with pytest.raises(PydhsaError):
            Model(path)


def test_unsupported_architecture(capsys, unknown_arch_gguf):
    assert_one_line_error(capsys, ["run", str(unknown_arch_gguf), "-p", "hi"], "notanarch")
    with pytest.raises(UnsupportedModelError, match="notanarch"):
        Model(unknown_arch_gguf)


@pytest.mark.model
def test_prompt_longer_than_context(capsys, model_path, model):
    prompt = "word " * 400
    assert_one_line_error(capsys, ["run", str(model_path), "-p", prompt, "-c", "64"], "context", "-c")
    with model.session(n_ctx=64) as session:
        with pytest.raises(ContextOverflowError, match=r"402 tokens but the context holds \d+"):
            session.prefill(model.tokenize(prompt))


@pytest.mark.parametrize("flags, needle", [
    (["-t", "0"], "-t must be between 1"),
    (["-t", "100000"], "-t must be between 1"),
    (["-b", "0"], "-b must be between 1"),
    (["-ub", "0"], "-ub must be between 1"),
    (["-ub", "-3"], "-ub must be between 1"),
    (["-c", "-1"], "-c must be between 0"),
    (["-n", "-2"], "-n must be between -1"),
    (["-n", "many"], "-n must be an integer"),
    (["--temp", "-0.5"], "--temp must be between 0"),
    (["--temp", "nan"], "--temp must be between 0"),
    (["--seed", "-7"], "--seed must be between -1"),
    (["-ngl", "-9"], "-ngl must be between -1"),
    (["-b", "99999999999"], "-b must be between 1"),
])
def test_bad_numeric_flags(capsys, flags, needle):
    assert_one_line_error(capsys, ["run", "model.gguf", "-p", "hi", *flags], needle)


@pytest.mark.model
def test_context_beyond_training_context(capsys, model_path):
    assert_one_line_error(capsys, ["run", str(model_path), "-p", "hi", "-c", "1000000"], "training context")


def test_prompt_missing_or_empty(capsys, tmp_path):
    assert_one_line_error(capsys, ["run", "model.gguf", "-f", str(tmp_path / "none.txt")], "prompt file not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(capsys, ["run", "model.gguf", "-f", str(empty)], "prompt is empty")
    assert_one_line_error(capsys, ["run", "model.gguf"], "-p")  # neither -p nor -f


def test_cli_error_in_a_real_process(tmp_path):
    """Exit status and stderr as a shell sees them, not only through main()."""
    result = run_cli("run", str(tmp_path / "missing.gguf"), "-p", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"pydhsa: error: model file not found: {tmp_path / 'missing.gguf'}"]
    assert result.stdout == ""


@pytest.mark.model
def test_api_rejects_bad_session_values(model):
    with pytest.raises(PydhsaError, match="threads"):
        model.session(n_threads=0)
    with pytest.raises(PydhsaError, match="batch size"):
        model.session(n_batch=0)
    with pytest.raises(PydhsaError, match="training context"):
        model.session(n_ctx=-5)
    with model.session(n_ctx=128) as session:
        with pytest.raises(PydhsaError, match="prefill at least one token"):
            list(session.generate(max_tokens=4))
        with pytest.raises(PydhsaError, match="no tokens"):
            session.prefill([])
        with pytest.raises(PydhsaError, match="out of range"):
            session.prefill([10**9])
        with pytest.raises(PydhsaError, match="seed"):
            session.generate("hi", seed=-1)
