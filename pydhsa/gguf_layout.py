"""Where the parts of a GGUF file lie: the header, the KV records, the tensor-info records and the data region.

The one reader of GGUF layout in the package (over `dhsa_params.scan_gguf_kv`, whose docstring says why it is
not `gguf.GGUFReader`): `pydhsa info` reads a file's facts through it, and the key-copying converter
(convert/pydhsa_convert/gguf_dhsa.py) uses the byte ranges to copy everything but the DHSA keys byte for byte.

    read_layout(path) -> GgufLayout        # raises GgufInputError: missing, not a file, not GGUF, truncated
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from .dhsa_params import GgufFormatError, GgufKvSection, scan_gguf_kv

DEFAULT_ALIGNMENT = 32  # GGUF's, when the file has no general.alignment

_T_UINT32, _T_STRING = 4, 8


class GgufInputError(ValueError):
    """The input is missing, not a regular file, empty, not GGUF, truncated or corrupt."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # GGUF order (ne0 first)
    ggml_type: int
    offset: int                 # relative to the data region
    n_bytes: int | None         # None for a ggml type this gguf package does not know


@dataclass
class GgufLayout:
    path: str
    file_size: int
    kv: GgufKvSection
    tensors: list[TensorInfo]
    ti_start: int               # first tensor-info record (== kv.end)
    ti_end: int                 # just past the last tensor-info record
    alignment: int
    data_offset: int            # start of the tensor data region (aligned ti_end)
    data_size: int              # bytes from data_offset to end of file
    arch: str | None = None

    @property
    def byteorder(self) -> str:
        return self.kv.byteorder


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # pragma: no cover - gguf is a dependency, but be graceful
        return {}
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def parse_layout(buf, path: str) -> GgufLayout:
    """The layout of GGUF bytes (bytes, memoryview or mmap); raises GgufFormatError."""
    size = len(buf)
    kv = scan_gguf_kv(buf)
    bo = kv.byteorder
    pos = kv.end
    tensors: list[TensorInfo] = []
    sizes = _ggml_sizes()
    names: set[str] = set()

    def need(k: int, what: str) -> None:
        if pos + k > size:
            raise GgufFormatError(f"truncated GGUF: {what} at offset {pos} needs {k} bytes, "
                                  f"file has {size}")

    for i in range(kv.tensor_count):
        need(8, f"name length of tensor #{i}")
        nlen = struct.unpack_from(bo + "Q", buf, pos)[0]
        pos += 8
        need(nlen, f"name of tensor #{i}")
        try:
            name = bytes(buf[pos:pos + nlen]).decode("utf-8")
        except UnicodeDecodeError:
            raise GgufFormatError(f"corrupt GGUF: name of tensor #{i} is not UTF-8") from None
        pos += nlen
        if name in names:
            raise GgufFormatError(f"corrupt GGUF: duplicate tensor name {name!r}")
        names.add(name)
        need(4, f"dimension count of tensor {name!r}")
        n_dims = struct.unpack_from(bo + "I", buf, pos)[0]
        pos += 4
        if n_dims > 8:
            raise GgufFormatError(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
        need(8 * n_dims + 12, f"shape/type/offset of tensor {name!r}")
        shape = struct.unpack_from(f"{bo}{n_dims}Q", buf, pos)
        pos += 8 * n_dims
        ggml_type, offset = struct.unpack_from(bo + "IQ", buf, pos)
        pos += 12
        n_bytes = None
        if ggml_type in sizes:
            block, type_size = sizes[ggml_type]
            n_el = 1
            for d in shape:
                n_el *= d
            n_bytes = n_el * type_size // block
        tensors.append(TensorInfo(name, tuple(shape), ggml_type, offset, n_bytes))
    ti_end = pos

    alignment = DEFAULT_ALIGNMENT
    al = kv.get("general.alignment")
    if al is not None:
        if al.vtype != _T_UINT32:
            raise GgufFormatError("corrupt GGUF: general.alignment is not UINT32")
        alignment = al.value
        if alignment == 0 or alignment & (alignment - 1):
            raise GgufFormatError(f"corrupt GGUF: general.alignment {alignment} "
                                  f"is not a power of two")
    data_offset = align(ti_end, alignment)
    if data_offset > size:
        if tensors:
            raise GgufFormatError(f"truncated GGUF: data region starts at {data_offset}, "
                                  f"file has {size} bytes")
        data_offset = size  # metadata-only file without trailing padding
    data_size = size - data_offset
    for t in tensors:
        end = t.offset + (t.n_bytes or 0)
        if end > data_size:
            raise GgufFormatError(
                f"truncated GGUF: tensor {t.name!r} ends at {data_offset + end}, "
                f"file has {size} bytes")
    arch_kv = kv.get("general.architecture")
    arch = arch_kv.value if arch_kv is not None and arch_kv.vtype == _T_STRING else None
    return GgufLayout(path, size, kv, tensors, kv.end, ti_end, alignment, data_offset,
                      data_size, arch)


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class MappedInput:
    """Read-only view of the input file (mmap; never writable)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise GgufInputError(f"input file not found: {path}") from None
        except IsADirectoryError:
            raise GgufInputError(f"input is a directory, not a GGUF file: {path}") from None
        except OSError as e:
            raise GgufInputError(f"cannot open input {path}: {e.strerror or e}") from None
        self.mm = None
        try:
            st = os.fstat(self.f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise GgufInputError(f"input is not a regular file: {path}")
            self.size = st.st_size
            if self.size == 0:
                raise GgufInputError(f"{path} is not a GGUF file (empty file)")
            self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.f.close()
            raise

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.f.close()

    def __enter__(self) -> "MappedInput":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_layout(path: str | os.PathLike[str]) -> GgufLayout:
    """Parse the header, KV section and tensor infos of a GGUF file (fast, read-only)."""
    path = os.fspath(path)
    with MappedInput(path) as inp:
        try:
            return parse_layout(inp.mm, path)
        except GgufFormatError as e:
            raise GgufInputError(f"{path}: {e}") from None
