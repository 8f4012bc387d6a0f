"""Reading a GGUF file's header without loading weights: validation and the facts `pydhsa info` shows.

The checks here run before the engine sees a file, so that the usual mistakes (wrong path, not GGUF,
a download cut short) get a precise one-line error instead of the engine's generic load failure.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"

# llama.cpp hard-codes the sliding-window layer pattern for these architectures when the file has no
# `<arch>.attention.sliding_window_pattern` key: every n-th layer is global, the others use the window.
DEFAULT_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


@dataclass
class GgufInfo:
    path: Path
    architecture: str
    metadata: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    n_tensors: int = 0
    data_bytes: int = 0

    def arch_value(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    @property
    def dhsa_keys(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if ".dhsa." in k}


def check_model_path(path: str | os.PathLike) -> Path:
    """Raise ModelFileError unless `path` is an existing, readable file that starts like GGUF."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"model path is not a file: {p}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {p}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic): {p}")
    return p


def read_gguf_info(path: str | os.PathLike) -> GgufInfo:
    """Parse the header and tensor table (not the weights; large arrays such as the vocabulary are
    skipped, not decoded); raise ModelFileError if the file is not a complete GGUF."""
    import gguf
    from .gguf_layout import GgufInputError, read_layout

    p = check_model_path(path)
    try:
        layout = read_layout(p)
    except GgufInputError as e:
        raise ModelFileError(str(e)) from None
    metadata: dict[str, Any] = {}
    for kv in layout.kv.kvs:
        metadata[kv.key] = f"[array of {kv.count}]" if kv.count is not None else kv.value
    types: dict[str, int] = {}
    for t in layout.tensors:
        try:
            name = gguf.GGMLQuantizationType(t.ggml_type).name
        except ValueError:
            name = f"type{t.ggml_type}"
        types[name] = types.get(name, 0) + 1
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"GGUF file has no general.architecture: {p}")
    return GgufInfo(path=p, architecture=arch, metadata=metadata, tensor_types=types, n_tensors=len(layout.tensors),
                    data_bytes=sum(t.n_bytes or 0 for t in layout.tensors))


def file_type_name(info: GgufInfo) -> str:
    """The quantisation, as llama.cpp names it (general.file_type), else the dominant tensor type."""
    import gguf

    ft = info.metadata.get("general.file_type")
    if isinstance(ft, int):
        try:
            return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    if info.tensor_types:
        return max(info.tensor_types.items(), key=lambda kv: kv[1])[0]
    return "unknown"


def swa_pattern(info: GgufInfo) -> int:
    """Every n-th layer is global (0 when the model has no sliding-window layers)."""
    if not info.arch_value("attention.sliding_window"):
        return 0
    explicit = info.arch_value("attention.sliding_window_pattern")
    if isinstance(explicit, int):
        return explicit
    return DEFAULT_SWA_PATTERN.get(info.architecture, 0)
