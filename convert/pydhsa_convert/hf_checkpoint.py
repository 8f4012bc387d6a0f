"""Reading a Hugging Face checkpoint folder: its JSON files and its safetensors weights (for ``hf_gemma``).

The weights are read with the ``safetensors`` library (the ``convert`` extra: ``pip install "pydhsa[convert]"``),
one tensor at a time, in blocks of whole rows of at most ``CHUNK_BYTES`` of float32 each, so memory holds one
block, not a tensor or the model. The library checks each file when it opens it (header, offsets within the
file and without gaps, sizes that match shapes and dtypes, nothing cut off) and reads F64/F32/F16 rows itself.

Own code remains for BF16 only, the dtype of Gemma's published checkpoints: the library's numpy framework has
no bfloat16 (``get_slice``/``get_tensor`` raise "data type 'bfloat16' not understood"; its torch, flax and
tensorflow frameworks would make the converter depend on one of those) and its Python API does not expose the
tensors' file offsets (llama.cpp's gguf-py parses the header itself for that reason, gguf.utility.SafetensorsLocal,
without the checks). So a BF16 tensor's offset is taken from the header the library has just validated, and
its rows are read as uint16 and widened to float32 (exact: bfloat16 is float32's upper half).

Also here: the converter's error classes and ``require``, the import of its optional libraries.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .gguf_dhsa import ConvertError

CHUNK_BYTES = 64 << 20   # float32 bytes of one block of rows read, converted and written at once
INSTALL_HINT = 'pip install "pydhsa[convert]"'

# safetensors dtypes the converter reads -> numpy dtype of the stored values (BF16: its raw 16 bits)
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class HfConvertError(ConvertError):
    """The Hugging Face checkpoint cannot be converted (bad or inconsistent input)."""


class UnsupportedArchitectureError(HfConvertError):
    """config.json names an architecture (or a feature) this converter does not handle."""


class CheckpointFileError(HfConvertError):
    """A checkpoint file is missing, unreadable or corrupt."""


class TensorShapeError(HfConvertError):
    """A tensor is missing, unexpected, or its shape does not match config.json."""


class MissingLibraryError(HfConvertError):
    """A library of the ``convert`` extra (safetensors, sentencepiece, protobuf) is not installed."""


def require(module: str) -> Any:
    """Import `module`, one of the ``convert`` extra's libraries; MissingLibraryError (one line naming the
    install command) when it or a library it needs is missing or does not import."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or module).split(".")[0]
        if missing == "google":  # sentencepiece's model schema needs protobuf (import name google.protobuf)
            missing = "protobuf"
        raise MissingLibraryError(f"converting a Hugging Face checkpoint needs the {missing!r} package: "
                                  f"{INSTALL_HINT}") from None
    except Exception as e:  # e.g. protobuf's VersionError: sentencepiece's schema needs a newer protobuf
        raise MissingLibraryError(f"cannot import {module} ({type(e).__name__}: {e}): "
                                  f"pip install --upgrade safetensors sentencepiece protobuf") from None


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a directory (the converter then treats it as a Hugging Face checkpoint)."""
    return os.path.isdir(os.fspath(path))


def read_json(path: str, what: str, required: bool = True) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise CheckpointFileError(f"{what} not found: {path}") from None
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointFileError(f"{what} {path} is not valid JSON: {e}") from None


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

@dataclass
class StTensor:
    name: str
    file: str
    dtype: str                      # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int | None = None        # absolute file offset of a BF16 tensor's data (see the module docstring)


def _bf16_offsets(path: str) -> dict[str, int]:
    """{tensor name: absolute offset of its data} from the header of `path`, which safe_open has validated:
    the 8-byte little-endian header length, the JSON header, then the data its ``data_offsets`` index."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {name: 8 + n + int(info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


def read_safetensors_index(path: str) -> dict[str, StTensor]:
    """{name: StTensor} of one safetensors file (CheckpointFileError for a missing, truncated or corrupt one)."""
    safetensors = require("safetensors")
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = StTensor(name, path, sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))
        if any(t.dtype == "BF16" for t in out.values()):
            offsets = _bf16_offsets(path)
            for t in out.values():
                if t.dtype == "BF16":
                    t.start = offsets[t.name]
    except FileNotFoundError:
        raise CheckpointFileError(f"safetensors file not found: {path}") from None
    except OSError as e:
        raise CheckpointFileError(f"cannot read {path}: {e.strerror or e}") from None
    except safetensors.SafetensorError as e:
        raise CheckpointFileError(f"{path}: not a valid safetensors file, truncated or corrupt (a download "
                                  f"cut short?): {e}") from None
    return out


def check_dtype(t: StTensor) -> None:
    if t.dtype not in _ST_DTYPES:
        raise CheckpointFileError(f"{t.file}: tensor {t.name!r} has unsupported dtype {t.dtype} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")


def read_chunks(t: StTensor, max_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The tensor (1-D or more) as float32, in blocks of whole rows (first dimension) of at most about
    ``max_bytes`` (default ``CHUNK_BYTES``) of float32 each, so that even a large embedding is never in memory
    whole."""
    check_dtype(t)
    safetensors = require("safetensors")
    rows, row_shape = t.shape[0], t.shape[1:]
    row_elems = int(np.prod(row_shape, dtype=np.int64))
    limit = CHUNK_BYTES if max_bytes is None else max_bytes
    per_chunk = max(1, limit // max(1, 4 * row_elems))
    try:
        if t.dtype == "BF16":
            yield from _bf16_chunks(t, rows, row_shape, row_elems, per_chunk)
            return
        with safetensors.safe_open(t.file, framework="numpy") as f:
            rows_of = f.get_slice(t.name)
            for r in range(0, rows, per_chunk):
                yield rows_of[r:min(r + per_chunk, rows)].astype(np.float32)   # (it does not clip a slice)
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointFileError(f"cannot read {t.file}: {getattr(e, 'strerror', None) or e}") from None


def _bf16_chunks(t: StTensor, rows: int, row_shape: tuple[int, ...], row_elems: int,
                 per_chunk: int) -> Iterator[np.ndarray]:
    """read_chunks for BF16 (no numpy bfloat16 in safetensors: see the module docstring)."""
    with open(t.file, "rb") as f:
        f.seek(t.start)
        for r in range(0, rows, per_chunk):
            n = min(per_chunk, rows - r)
            raw = f.read(n * row_elems * 2)
            if len(raw) != n * row_elems * 2:   # the file changed since safe_open checked it
                raise CheckpointFileError(f"{t.file}: tensor {t.name!r} is truncated")
            a = np.frombuffer(raw, dtype=np.dtype("<u2"))
            yield (a.astype(np.uint32) << 16).view(np.float32).reshape((n,) + row_shape)


def index_checkpoint(src_dir: str) -> dict[str, StTensor]:
    """{tensor name: location} over every safetensors file of the checkpoint (one file, or the shards that
    ``model.safetensors.index.json`` lists)."""
    index_path = os.path.join(src_dir, "model.safetensors.index.json")
    files: list[str]
    weight_map: dict[str, str] | None = None
    if os.path.exists(index_path):
        idx = read_json(index_path, "safetensors index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointFileError(f"{index_path}: no valid 'weight_map'")
        weight_map = wm
        files = sorted(set(wm.values()))
        for fn in files:
            if os.path.basename(fn) != fn:
                raise CheckpointFileError(f"{index_path}: shard name {fn!r} is not a plain file name")
            if not os.path.isfile(os.path.join(src_dir, fn)):
                raise CheckpointFileError(f"missing safetensors shard {fn} (listed in "
                                          f"model.safetensors.index.json) in {src_dir}")
    else:
        files = sorted(f for f in os.listdir(src_dir) if f.endswith(".safetensors"))
        if not files:
            bins = [f for f in os.listdir(src_dir) if f.endswith(".bin") or f.endswith(".pth")]
            hint = (" (PyTorch .bin checkpoints are not supported: re-save with "
                    "save_pretrained(..., safe_serialization=True))") if bins else ""
            raise CheckpointFileError(f"no *.safetensors files in {src_dir}{hint}")
    tensors: dict[str, StTensor] = {}
    for fn in files:
        for name, t in read_safetensors_index(os.path.join(src_dir, fn)).items():
            if name in tensors:
                raise CheckpointFileError(f"tensor {name!r} appears in both "
                                          f"{os.path.basename(tensors[name].file)} and {fn}")
            if weight_map is not None and weight_map.get(name) != fn:
                if name not in weight_map:
                    continue  # not part of the model according to the index
                raise CheckpointFileError(f"tensor {name!r} is in {fn}, but the index lists "
                                          f"{weight_map[name]}")
            tensors[name] = t
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointFileError(f"tensor {missing[0]!r} is listed in the index but not in "
                                      f"{weight_map[missing[0]]}")
    return tensors
