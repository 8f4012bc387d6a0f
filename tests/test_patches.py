"""The fork's patch series: applied exactly or not at all, and a broken patch stops the build."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "native" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


apply_patches = _load("apply_patches")
fetch_upstream = _load("fetch_upstream")

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 31))


def make_tree(root: Path) -> Path:
    tree = root / "upstream"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "file.c").write_text(ORIGINAL)
    return tree


def make_patch(before: str, after: str, path: str = "src/file.c") -> str:
    """A unified diff of `before` -> `after` (via diff(1), as a developer would produce it)."""
    import difflib
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"a/{path}", f"b/{path}"))


def write_series(root: Path, *patches: str) -> Path:
    d = root / "patches"
    d.mkdir(exist_ok=True)
    for i, text in enumerate(patches, 1):
        (d / f"{i:04d}-change-{i}.patch").write_text(text)
    return d


def test_exact_series_applies_in_order_to_a_fresh_copy(tmp_path):
    tree = make_tree(tmp_path)
    step1 = ORIGINAL.replace("line 10\n", "line 10 changed\n")
    step2 = step1.replace("line 20\n", "line 20 changed\n")
    series = write_series(tmp_path, make_patch(ORIGINAL, step1), make_patch(step1, step2))
    out = apply_patches.apply_series(tree, series, tmp_path / "out")
    assert (out / "src" / "file.c").read_text() == step2
    assert (tree / "src" / "file.c").read_text() == ORIGINAL  # the pristine tree is never touched
    assert apply_patches.apply_series(tree, series, tmp_path / "out") == out  # reused when unchanged


@pytest.mark.parametrize("kind", ["offset", "fuzz", "reject"])
def test_inexact_patch_is_refused(tmp_path, kind):
    tree = make_tree(tmp_path)
    if kind == "offset":  # the hunk's context is found, but 3 lines away from where it was written
        shifted = "extra\nextra\nextra\n" + ORIGINAL
        text = make_patch(shifted, shifted.replace("line 10\n", "line ten\n"))
    elif kind == "fuzz":  # one context line differs: patch(1) would apply it with fuzz 1
        other = ORIGINAL.replace("line 8\n", "line eight\n")
        text = make_patch(other, other.replace("line 10\n", "line ten\n"))
    else:
        other = ORIGINAL.replace("line 10\n", "something else\n")
        text = make_patch(other, other.replace("something else\n", "line ten\n"))
    series = write_series(tmp_path, text)
    with pytest.raises(apply_patches.PatchError, match="0001-change-1.patch does not apply exactly"):
        apply_patches.apply_series(tree, series, tmp_path / "out")
    assert not list((tmp_path / "out").glob("llama.cpp-patched-*"))  # nothing half-patched left behind


def test_badly_named_patch_is_refused(tmp_path):
    series = write_series(tmp_path)
    (series / "fix.patch").write_text("")
    with pytest.raises(apply_patches.PatchError, match="NNNN-topic"):
        apply_patches.apply_series(make_tree(tmp_path), series, tmp_path / "out")


@pytest.fixture(scope="module")
def upstream_tree() -> Path:
    """The pinned upstream tree (already in the cache after `pip install .`)."""
    return fetch_upstream.ensure_tree(fetch_upstream.default_cache_dir(), os.environ.get("PYDHSA_UPSTREAM_SDIST"))


def test_real_series_applies_exactly(upstream_tree, tmp_path):
    out = apply_patches.apply_series(upstream_tree, REPO / "native" / "patches", tmp_path)
    assert 'PYDHSA = 1' in (out / "src" / "llama.cpp").read_text()


def test_broken_patch_stops_the_cmake_configure(upstream_tree, tmp_path):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed (the test extra installs it)"
    project = tmp_path / "project"
    shutil.copytree(REPO / "native", project / "native", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "CMakeLists.txt", project)
    broken = make_patch("no such line\n", "still no such line\n", path="src/llama.cpp")
    (project / "native" / "patches" / "9999-broken.patch").write_text(broken)
    env = {**os.environ, "PYDHSA_LLAMA_CPP_DIR": str(upstream_tree), "PYDHSA_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([cmake, "-S", str(project), "-B", str(tmp_path / "build"),
                             f"-DPython3_EXECUTABLE={sys.executable}"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "9999-broken.patch does not apply exactly" in result.stdout + result.stderr
