"""Our CUDA sources compile (CI has nvcc but no GPU, so this is where a syntax or type error is caught).

Each kernel file is compiled on its own with the flags the build gives it: the selection without fast math
(it must be exact), the attention as part of ggml-cuda (-use_fast_math -extended-lambda). The ggml-cuda glue
files (ggml-cuda-dhsa.cu, ggml-cuda-dhsa-fattn.cu) include ggml-cuda's common.cuh, which needs the cuBLAS
headers; they are compiled when those are installed (or PYDHSA_CUBLAS_INCLUDE names them, e.g. the include
folder of the nvidia-cublas wheel). Skipped, with the reason, on machines without nvcc.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DHSA = REPO / "native" / "dhsa"
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
ARCH = os.environ.get("PYDHSA_TEST_CUDA_ARCH", "80")  # the oldest architecture the kernels support

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (the CUDA sources are compiled where it is)")


def pristine_tree() -> Path:
    """The pinned upstream tree, from the build's cache (fetched if absent)."""
    out = subprocess.run([sys.executable, str(REPO / "native" / "fetch_upstream.py")], capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def cmake_flags(text: str, pattern: str) -> list:
    """The flags a CMake file gives a target, read with `pattern` (one group: the flag list)."""
    match = re.search(pattern, text)
    assert match, f"not found in the CMake file: {pattern}"
    return match.group(1).split()


def build_flags() -> dict:
    """Each kernel file's nvcc flags, read from where the build defines them (so this test cannot drift from
    the build): the selection is its own target with native/CMakeLists.txt's options; the attention is
    compiled as part of ggml-cuda, with upstream's CUDA_FLAGS (ggml/src/ggml-cuda/CMakeLists.txt)."""
    ours = (REPO / "native" / "CMakeLists.txt").read_text()
    upstream = (pristine_tree() / "ggml" / "src" / "ggml-cuda" / "CMakeLists.txt").read_text()
    return {
        "dhsa-cuda-select.cu": cmake_flags(
            ours, r"target_compile_options\(pydhsa-cuda-select PRIVATE \$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>\)"),
        "dhsa-cuda-attn.cu": cmake_flags(upstream, r"set\(CUDA_FLAGS ([^)]*)\)"),
    }


FILES = ["dhsa-cuda-attn.cu", "dhsa-cuda-select.cu"]


def nvcc(source: Path, flags, out: Path, includes=()):
    cmd = [NVCC, "-std=c++17", "-O2", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}", "-I", str(DHSA),
           *[f"-I{i}" for i in includes], *flags, "-c", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def patched_tree(tmp_path: Path) -> Path:
    """The pinned upstream tree (from the build's cache, fetched if absent) with our patch series applied."""

    def last_line(*args):
        out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])

    return last_line(REPO / "native" / "apply_patches.py", pristine_tree(), REPO / "native" / "patches", tmp_path)


def test_build_flags_are_found():
    flags = build_flags()
    assert "--fmad=false" in flags["dhsa-cuda-select.cu"]  # the exact selection (native/CMakeLists.txt)
    assert "-use_fast_math" in flags["dhsa-cuda-attn.cu"]


@pytest.mark.parametrize("name", FILES)
def test_kernel_file_compiles(name, tmp_path):
    result = nvcc(DHSA / name, build_flags()[name], tmp_path / (name + ".o"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / (name + ".o")).stat().st_size > 0


CUBLAS_CANDIDATES = [p for p in (os.environ.get("PYDHSA_CUBLAS_INCLUDE"),
                                  NVCC and str(Path(NVCC).resolve().parents[1] / "include"),
                                  str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include")) if p]


def cublas_include() -> list:
    """The folder holding cublas_v2.h, as a list of one (or none): the CUDA toolkit's, or the include folder
    of the nvidia-cublas wheel named by PYDHSA_CUBLAS_INCLUDE."""
    return [p for p in CUBLAS_CANDIDATES if (Path(p) / "cublas_v2.h").exists()][:1]


@pytest.mark.parametrize("name", ["ggml-cuda-dhsa.cu", "ggml-cuda-dhsa-fattn.cu"])
def test_ggml_cuda_glue_compiles(name, tmp_path):
    if not cublas_include():
        pytest.skip(f"cuBLAS headers not installed (looked in {', '.join(map(str, CUBLAS_CANDIDATES))}; "
                    "PYDHSA_CUBLAS_INCLUDE names another folder); ggml-cuda's common.cuh needs them")
    tree = patched_tree(tmp_path)
    result = nvcc(DHSA / name, [*build_flags()["dhsa-cuda-attn.cu"], "-DPYDHSA_CUDA"], tmp_path / "glue.o",
                  includes=(tree / "ggml" / "include", tree / "ggml" / "src", *cublas_include()))
    assert result.returncode == 0, result.stderr[-4000:]
