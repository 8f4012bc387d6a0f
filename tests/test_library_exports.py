"""libpydhsa exports its C API and nothing else (native/capi/pydhsa.map).

A GPU build machine once produced a libpydhsa that exported C++ runtime code; libllama bound its own
iostream calls to that copy and crashed while printing the model's info. The version script prevents it;
this checks the built library's dynamic symbol table."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pydhsa import _native


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the version script is used on Linux only")
@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_only_the_c_api_is_exported():
    lib = _native.lib_dir() / "libpydhsa.so"
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert "pydhsa_model_load" in names and "pydhsa_op_attention" in names
    assert [n for n in names if not n.startswith("pydhsa_")] == []
