"""pydhsa: Dynamic Hierarchical Sparse Attention for llama.cpp/GGUF models.

The native engine (pinned llama.cpp + our patches) is bound through cffi; see `pydhsa.api` for the
Python API and `pydhsa.cli` for the `pydhsa` command.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Model", "Session", "ModelInfo", "Timings", "DhsaConfig", "PydhsaError", "ModelFileError", "UnsupportedModelError",
           "ContextOverflowError", "__version__"]

from .errors import ContextOverflowError, ModelFileError, PydhsaError, UnsupportedModelError


def __getattr__(name):  # the native library loads on first use, not on `import pydhsa`
    if name in ("Model", "Session", "ModelInfo", "Timings"):
        from . import api
        return getattr(api, name)
    if name == "DhsaConfig":
        from .dhsa_params import DhsaConfig
        return DhsaConfig
    raise AttributeError(name)
