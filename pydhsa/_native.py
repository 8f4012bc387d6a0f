"""Low-level cffi binding of libpydhsa (ABI mode: no compiler needed at install or import time).

The declarations come from the one header that the C side is compiled with, installed next to the
libraries in pydhsa/_lib/, so the binding cannot drift from the library. cffi releases the GIL for
the duration of every C call, so long prefill and generation calls do not block other threads.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

from cffi import FFI

LIB_DIR_ENV = "PYDHSA_LIB_DIR"  # override where libpydhsa and its header are found (development)

ffi = FFI()
_lib = None
_lock = threading.Lock()


def lib_dir() -> Path:
    env = os.environ.get(LIB_DIR_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent / "_lib"
    if (here / "pydhsa.h").exists():
        return here
    # Imported from a source checkout (e.g. `python -m pytest` in the repository root): the libraries
    # are in the installed copy of the package, further down sys.path.
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / "pydhsa" / "_lib"
        if (candidate / "pydhsa.h").exists():
            return candidate
    return here


def library_file(directory: Path, name: str = "pydhsa") -> Path:
    """The file of shared library `name` (pydhsa, llama, ...) in `directory`, as this platform names it."""
    if sys.platform == "darwin":
        return directory / f"lib{name}.dylib"
    if sys.platform == "win32":
        return directory / f"{name}.dll"
    return directory / f"lib{name}.so"


def cdef_from_header(text: str) -> str:
    """The plain-C part of pydhsa.h between its cffi markers, export macro removed."""
    match = re.search(r"/\* cffi:begin \*/(.*?)/\* cffi:end \*/", text, re.S)
    if not match:
        raise RuntimeError("pydhsa.h has no cffi:begin/cffi:end section")
    return match.group(1).replace("PYDHSA_API ", "")


def load():
    """The loaded library (once per process)."""
    global _lib
    with _lock:
        if _lib is None:
            directory = lib_dir()
            header = directory / "pydhsa.h"
            library = library_file(directory)
            if not header.exists() or not library.exists():
                raise ImportError(
                    f"the native pydhsa library is missing from {directory}; reinstall with `pip install .` "
                    f"(or point {LIB_DIR_ENV} at a build directory)")
            ffi.cdef(cdef_from_header(header.read_text()))
            _lib = ffi.dlopen(str(library))
    return _lib
