"""Compatibility shim: the default embedded model now lives in the registry of `pydhsa.models`."""
from __future__ import annotations

from pathlib import Path

from .models import cache_dir, model_path

__all__ = ["cache_dir", "default_model_path"]


def default_model_path(quiet: bool = False) -> Path:
    """Path of the default GGUF (Gemma 3 270M, `pydhsa[model]`), assembling it into the cache on first use."""
    return model_path(None, quiet=quiet)
