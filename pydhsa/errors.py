"""Exceptions of the pydhsa API. C failures arrive as a status code plus a one-line message."""
from __future__ import annotations


class PydhsaError(RuntimeError):
    """A failure reported by the engine or a rejected input; `code` is the C status (0 if none)."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class ModelFileError(PydhsaError):
    """The model file is missing, unreadable, not GGUF or truncated."""


class UnsupportedModelError(PydhsaError):
    """The file is GGUF but the engine cannot run it (e.g. an unknown architecture)."""


class ContextOverflowError(PydhsaError):
    """The tokens do not fit in the session's context."""


# C status codes (pydhsa.h) to the exception raised for them.
_BY_CODE = {2: ModelFileError, 3: UnsupportedModelError, 5: ContextOverflowError}


def error_for(code: int, message: str) -> PydhsaError:
    return _BY_CODE.get(code, PydhsaError)(message, code)
