"""Our CUDA sources compile (CI has nvcc but no GPU, so this is where a syntax or type error is caught).

Each kernel file is compiled on its own with the flags the build gives it: the selection without fast math
(it must be exact), the attention as part of ggml-cuda (-use_fast_math -extended-lambda). The ggml-cuda glue
file (ggml-cuda-dhsa.cu) includes ggml-cuda's common.cuh, which needs the cuBLAS headers; it is compiled
when they are installed. Skipped, with the reason, on machines without nvcc.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DHSA = REPO / "native" / "dhsa"
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
ARCH = os.environ.get("PYDHSA_TEST_CUDA_ARCH", "80")  # the oldest architecture the kernels support

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (the CUDA sources are compiled where it is)")

FILES = {
    "dhsa-cuda-select.cu": ["--fmad=false"],
    "dhsa-cuda-attn.cu": ["-use_fast_math", "-extended-lambda"],
}


def nvcc(source: Path, flags, out: Path, includes=()):
    cmd = [NVCC, "-std=c++17", "-O2", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}", "-I", str(DHSA),
           *[f"-I{i}" for i in includes], *flags, "-c", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def patched_tree(tmp_path: Path) -> Path:
    """The pinned upstream tree (from the build's cache, fetched if absent) with our patch series applied."""
    import sys

    def last_line(*args):
        out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip().splitlines()[-1])

    pristine = last_line(REPO / "native" / "fetch_upstream.py")
    return last_line(REPO / "native" / "apply_patches.py", pristine, REPO / "native" / "patches", tmp_path)


@pytest.mark.parametrize("name", sorted(FILES))
def test_kernel_file_compiles(name, tmp_path):
    result = nvcc(DHSA / name, FILES[name], tmp_path / (name + ".o"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / (name + ".o")).stat().st_size > 0


def test_ggml_cuda_glue_compiles(tmp_path):
    candidates = [Path(NVCC).resolve().parents[1] / "include",
                  Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if not any((c / "cublas_v2.h").exists() for c in candidates):
        pytest.skip(f"cuBLAS headers not installed (looked in {', '.join(map(str, candidates))}); "
                    "ggml-cuda's common.cuh needs them")
    tree = patched_tree(tmp_path)
    result = nvcc(DHSA / "ggml-cuda-dhsa.cu", ["-use_fast_math", "-extended-lambda", "-DPYDHSA_CUDA"],
                  tmp_path / "glue.o", includes=(tree / "ggml" / "include", tree / "ggml" / "src"))
    assert result.returncode == 0, result.stderr[-4000:]
