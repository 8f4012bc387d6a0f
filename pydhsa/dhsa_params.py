"""Python's view of the DHSA parameters, derived from the one definition in C.

The table lives in ``native/dhsa/dhsa-params.c`` (read here through ``pydhsa_dhsa_param_info``; the
specification is native/dhsa/ALGORITHM.md, "Parameters"). Every parameter has a name, a type, a default,
a range or choices and a help text there; from those this module derives the GGUF key
``<arch>.dhsa.<name>``, the CLI flag ``--dhsa-<name with - for _>`` (``sink_tokens`` and ``local_tokens``
use the short flags the table names, ``--dhsa-sink`` / ``--dhsa-local``, with the long spellings as
aliases), ``DhsaConfig`` and the checks with messages that name the flag or key.

Precedence: CLI overrides the GGUF file, the file overrides the built-in defaults.

Public API:
    PARAMS, PARAM_NAMES, PARAMS_BY_NAME      the table
    DhsaConfig                               validated dataclass of all parameters
    DhsaParamError(ValueError)               one-line messages naming the flag / GGUF key
    GgufFormatError(ValueError)              not a GGUF file / truncated / corrupt
    add_dhsa_arguments(parser)               adds every --dhsa-* flag (default None)
    cli_values(args)                         {name: value} of the flags actually given
    config_from_args(args, file_values=None) CLI > file > default, validated
    config_from_values(values)               validated config from a plain {name: value}
    validate_values(values)                  check single-field rules of a partial dict
    gguf_key(arch, name), gguf_keys(arch), gguf_prefix(arch), gguf_value_type(name)
    read_gguf_dhsa(path_or_reader, arch=None) {name: value} of the DHSA keys present
    scan_gguf_kv(buf)                         fast KV-section scanner (used by the converter)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "DhsaParam", "PARAMS", "PARAM_NAMES", "PARAMS_BY_NAME", "DhsaConfig",
    "DhsaParamError", "GgufFormatError", "DhsaFileValues",
    "BOUNDARY_CHOICES", "BOUNDARY_IMPLEMENTED", "DECODE_CHOICES", "LAYERS_CHOICES", "MAX_TOKENS", "MAX_Q_BLOCK",
    "add_dhsa_arguments", "cli_values", "config_from_args", "config_from_values",
    "validate_values", "coerce_gguf_value",
    "gguf_key", "gguf_keys", "gguf_prefix", "gguf_value_type", "gguf_value_type_id",
    "read_gguf_dhsa", "scan_gguf_kv", "GgufKv", "GgufKvSection",
]

class DhsaParamError(ValueError):
    """Invalid DHSA parameter value. The message is one line naming the flag or GGUF key."""


class GgufFormatError(ValueError):
    """The file is not a GGUF file, or it is truncated / corrupt."""


# GGUF value type ids (same numbering as gguf.GGUFValueType; kept here so that reading
# the keys does not require the gguf package).
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL = range(8)
_T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = 8, 9, 10, 11, 12
_TYPE_NAMES = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}
_SCALAR_FMT = {
    _T_UINT8: "B", _T_INT8: "b", _T_UINT16: "H", _T_INT16: "h", _T_UINT32: "I", _T_INT32: "i",
    _T_FLOAT32: "f", _T_BOOL: "?", _T_UINT64: "Q", _T_INT64: "q", _T_FLOAT64: "d",
}
_INT_TYPES = {_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_UINT64, _T_INT64}
_FLOAT_TYPES = {_T_FLOAT32, _T_FLOAT64}


# --------------------------------------------------------------------------------------------
# The table (from C)
# --------------------------------------------------------------------------------------------

_KINDS = {0: "float", 1: "int", 2: "str"}  # pydhsa_param_info.kind


@dataclass(frozen=True)
class DhsaParam:
    name: str
    kind: str                      # "float" | "int" | "str"
    default: Any
    help: str
    flag: str                      # primary CLI flag
    aliases: tuple[str, ...] = ()  # extra CLI spellings
    choices: tuple[str, ...] | None = None
    lo: float | None = None        # inclusive lower bound (ints); exclusive for floats
    hi: float | None = None        # inclusive upper bound
    metavar: str | None = None
    implemented: tuple[str, ...] | None = None  # choices that work (the rest are planned)

    @property
    def dest(self) -> str:
        """argparse attribute name: ``dhsa_<name>``."""
        return "dhsa_" + self.name

    @property
    def gguf_type(self) -> int:
        """GGUF value type id: FLOAT32 for floats, UINT32 for ints, STRING for strings."""
        return {"float": _T_FLOAT32, "int": _T_UINT32, "str": _T_STRING}[self.kind]

    def key(self, arch: str) -> str:
        return gguf_key(arch, self.name)


def _flag(name: str) -> str:
    return "--dhsa-" + name.replace("_", "-")


def _param_from_c(info) -> DhsaParam:
    from ._native import ffi

    def text(p):
        return ffi.string(p).decode() if p != ffi.NULL else None

    name, kind = text(info.name), _KINDS[info.kind]
    long_flag, short_flag = _flag(name), text(info.cli_flag)
    flag, aliases = (short_flag, (long_flag,)) if short_flag else (long_flag, ())
    if kind == "str":
        choices = tuple(text(info.choices).split(","))
        return DhsaParam(name, kind, choices[int(info.default_value)], text(info.help), flag, aliases, choices,
                         None, None, "{" + ",".join(choices) + "}", choices[:info.n_implemented])
    if kind == "int":
        return DhsaParam(name, kind, int(info.default_value), text(info.help), flag, aliases, None,
                         int(info.lo), int(info.hi), "N")
    return DhsaParam(name, kind, float(info.default_value), text(info.help), flag, aliases, None,
                     float(info.lo), float(info.hi), "B" if name == "budget" else "X")


def _load_table() -> tuple[DhsaParam, ...]:
    from ._native import ffi, load
    lib = load()
    info = ffi.new("pydhsa_param_info *")
    params = []
    for i in range(lib.pydhsa_dhsa_param_count()):
        if lib.pydhsa_dhsa_param_info(i, info) != 0:
            raise RuntimeError(f"libpydhsa has no DHSA parameter #{i}")
        params.append(_param_from_c(info))
    return tuple(params)


PARAMS: tuple[DhsaParam, ...] = _load_table()
PARAM_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)
PARAMS_BY_NAME: dict[str, DhsaParam] = {p.name: p for p in PARAMS}

# Facts of the table other modules name.
BOUNDARY_CHOICES = PARAMS_BY_NAME["boundary"].choices
BOUNDARY_IMPLEMENTED = PARAMS_BY_NAME["boundary"].implemented
LAYERS_CHOICES = PARAMS_BY_NAME["layers"].choices
DECODE_CHOICES = PARAMS_BY_NAME["decode"].choices
MAX_TOKENS = PARAMS_BY_NAME["sink_tokens"].hi   # token counts above this are rejected as absurd
MAX_Q_BLOCK = PARAMS_BY_NAME["q_block"].hi
MAX_CHUNK = PARAMS_BY_NAME["chunk_max"].hi       # the engine's key segment (DHSA_SEGMENT)


def gguf_prefix(arch: str) -> str:
    """``<arch>.dhsa.``"""
    if not arch:
        raise DhsaParamError("GGUF architecture name is empty")
    return f"{arch}.dhsa."


def gguf_key(arch: str, name: str) -> str:
    """GGUF metadata key of parameter ``name``: ``<arch>.dhsa.<name>``."""
    if name not in PARAMS_BY_NAME:
        raise DhsaParamError(f"unknown DHSA parameter {name!r}")
    return gguf_prefix(arch) + name


def gguf_keys(arch: str) -> dict[str, str]:
    """{name: GGUF key} for every parameter, in table order."""
    return {p.name: gguf_key(arch, p.name) for p in PARAMS}


def gguf_value_type_id(name: str) -> int:
    """Integer GGUF value type of parameter ``name`` (6 FLOAT32, 4 UINT32, 8 STRING)."""
    return PARAMS_BY_NAME[name].gguf_type


def gguf_value_type(name: str):
    """``gguf.GGUFValueType`` member of parameter ``name`` (needs the gguf package)."""
    from gguf import GGUFValueType  # local import: the package is optional for the rest
    return GGUFValueType(gguf_value_type_id(name))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _label(name: str, sources: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> str:
    """How to name a parameter in an error: flag, GGUF key or plain name."""
    if labels and name in labels:
        return labels[name]
    src = (sources or {}).get(name, "cli")
    p = PARAMS_BY_NAME[name]
    if src == "default":
        return f"{name} (built-in default)"
    return p.flag


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _check_field(name: str, value: Any, label: str) -> Any:
    """Type and single-field range check; returns the normalised value."""
    p = PARAMS_BY_NAME[name]
    if p.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_np_number(value):
            raise DhsaParamError(f"{label}: expected a number, got {_fmt(value)}")
        v = float(value)
        if math.isnan(v) or not (p.lo < v <= p.hi):
            raise DhsaParamError(f"{label}: must be > {p.lo:g} and <= {p.hi:g}, got {_fmt(value)}")
        if struct.unpack("<f", struct.pack("<f", v))[0] <= 0.0:
            raise DhsaParamError(f"{label}: {_fmt(value)} is too small to store (rounds to 0)")
        return v
    if p.kind == "int":
        if isinstance(value, bool):
            raise DhsaParamError(f"{label}: expected an integer, got {_fmt(value)}")
        if isinstance(value, float) or _is_np_float(value):
            if not math.isfinite(value) or value != int(value):
                raise DhsaParamError(f"{label}: expected an integer, got {_fmt(value)}")
            value = int(value)
        try:
            v = int(value) if not isinstance(value, str) else int(value.strip(), 10)
        except (TypeError, ValueError):
            raise DhsaParamError(f"{label}: expected an integer, got {_fmt(value)}") from None
        if v < p.lo or v > p.hi:
            what = "token count" if p.hi == MAX_TOKENS else "value"
            raise DhsaParamError(f"{label}: must be between {p.lo} and {p.hi} ({what}), got {v}")
        return v
    # str
    if not isinstance(value, str):
        raise DhsaParamError(f"{label}: expected one of {', '.join(p.choices)}, got {_fmt(value)}")
    v = value.strip().lower()
    if v not in p.choices:
        raise DhsaParamError(
            f"{label}: invalid value {_fmt(value)}, expected one of {', '.join(p.choices)}")
    if v not in p.implemented:
        raise DhsaParamError(
            f"{label}: {name} {v!r} is not implemented yet (use {' or '.join(p.implemented)})")
    return v


def _is_np_number(v: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, (np.integer, np.floating))


def _is_np_float(v: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, np.floating)


def validate_values(values: Mapping[str, Any], sources: Mapping[str, str] | None = None,
                    labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check the single-field rules of a partial {name: value}; returns normalised values.

    Unknown names raise DhsaParamError. Cross-field rules need the full set: see
    ``config_from_values``.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in PARAMS_BY_NAME:
            lab = (labels or {}).get(name, name)
            raise DhsaParamError(
                f"unknown DHSA parameter {lab!r} (known: {', '.join(PARAM_NAMES)})")
        out[name] = _check_field(name, value, _label(name, sources, labels))
    return out


def _check_cross(v: Mapping[str, Any], sources: Mapping[str, str] | None,
                 labels: Mapping[str, str] | None) -> None:
    def lab(n: str) -> str:
        return f"{_label(n, sources, labels)}={v[n]}"

    if v["chunk_min"] > v["chunk_avg"]:
        raise DhsaParamError(f"chunk sizes: need chunk_min <= chunk_avg, got "
                             f"{lab('chunk_min')} > {lab('chunk_avg')}")
    if v["chunk_avg"] > v["chunk_max"]:
        raise DhsaParamError(f"chunk sizes: need chunk_avg <= chunk_max, got "
                             f"{lab('chunk_avg')} > {lab('chunk_max')}")
    if v["chunk_max"] < 2 * v["chunk_min"]:
        raise DhsaParamError(f"chunk sizes: need chunk_max >= 2*chunk_min, got "
                             f"{lab('chunk_max')} < 2*{v['chunk_min']} ({lab('chunk_min')})")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

class _DhsaConfigMethods:
    """The behaviour of DhsaConfig; its fields (one per parameter, with the table's defaults) are made
    from the table below, so that a parameter added in C appears here with no Python edit."""

    def __post_init__(self) -> None:
        norm = validate_values(self.as_dict())
        for k, v in norm.items():
            object.__setattr__(self, k, v)
        _check_cross(norm, None, None)

    def as_dict(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name) for p in PARAMS}

    def gguf_items(self, arch: str) -> dict[str, Any]:
        """{GGUF key: value} for every parameter."""
        return {gguf_key(arch, k): v for k, v in self.as_dict().items()}

    def replace(self, **changes: Any) -> "DhsaConfig":
        return dataclasses.replace(self, **changes)


_PY_TYPES = {"float": float, "int": int, "str": str}

#: All DHSA parameters, validated on construction: ``DhsaConfig(budget=0.2, boundary="fixed")``.
DhsaConfig = dataclasses.make_dataclass(
    "DhsaConfig", [(p.name, _PY_TYPES[p.kind], dataclasses.field(default=p.default)) for p in PARAMS],
    bases=(_DhsaConfigMethods,), frozen=True)
DhsaConfig.__module__ = __name__  # make_dataclass names the caller only from Python 3.12 on
DhsaConfig.__doc__ = "All DHSA parameters (the table in native/dhsa/dhsa-params.c), validated on construction."


class DhsaFileValues(dict):
    """{name: value} read from a GGUF file; remembers the architecture and path for messages."""

    def __init__(self, values: Mapping[str, Any] = (), arch: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(values)
        self.arch = arch
        self.path = path


def _file_label(name: str, file_values: Mapping[str, Any] | None) -> str:
    arch = getattr(file_values, "arch", None)
    path = getattr(file_values, "path", None)
    key = f"{arch}.dhsa.{name}" if arch else f"<arch>.dhsa.{name}"
    where = f" in {os.path.basename(path)}" if path else ""
    return f"GGUF key {key}{where}"


def config_from_values(values: Mapping[str, Any] | None = None,
                       sources: Mapping[str, str] | None = None,
                       labels: Mapping[str, str] | None = None) -> DhsaConfig:
    """Validated DhsaConfig from built-in defaults overridden by ``values``.

    ``sources`` ({name: "cli"|"file"|"default"}) and ``labels`` ({name: text}) only affect
    how the error message names a parameter.
    """
    values = dict(values or {})
    srcs = {p.name: "default" for p in PARAMS}
    srcs.update({k: (sources or {}).get(k, "cli") for k in values})
    norm = validate_values(values, srcs, labels)
    merged = {p.name: p.default for p in PARAMS}
    merged.update(norm)
    _check_cross(merged, srcs, labels)
    return DhsaConfig(**merged)


# --------------------------------------------------------------------------------------------
# argparse
# --------------------------------------------------------------------------------------------

def _arg_type(p: DhsaParam) -> Callable[[str], Any]:
    if p.kind == "float":
        def parse_float(s: str) -> float:
            try:
                v = float(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
            return v
        parse_float.__name__ = "number"
        return parse_float
    if p.kind == "int":
        def parse_int(s: str) -> int:
            try:
                return int(s.strip(), 10)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        parse_int.__name__ = "integer"
        return parse_int

    def parse_str(s: str) -> str:
        v = s.strip().lower()
        if v not in p.choices:
            raise argparse.ArgumentTypeError(
                f"invalid value {s!r}, expected one of {', '.join(p.choices)}")
        return v
    parse_str.__name__ = "choice"
    return parse_str


def add_dhsa_arguments(parser: argparse.ArgumentParser, title: str = "DHSA parameters"):
    """Add every ``--dhsa-*`` flag to ``parser`` (in an argument group) and return the group.

    All flags default to None, meaning "not given": the value then comes from the GGUF file,
    else the built-in default. Type errors are reported by argparse naming the flag; range and
    cross-field rules are checked by ``config_from_args``.
    """
    group = parser.add_argument_group(
        title, "override the model's GGUF <arch>.dhsa.* keys (CLI > file > built-in default)")
    for p in PARAMS:
        group.add_argument(
            p.flag, *p.aliases, dest=p.dest, type=_arg_type(p), default=None,
            metavar=p.metavar, help=f"{p.help} (default: {p.default})")
    return group


def cli_values(args: Any) -> dict[str, Any]:
    """{name: value} of the --dhsa-* flags that were given (not None) on ``args``."""
    out = {}
    for p in PARAMS:
        v = getattr(args, p.dest, None)
        if v is not None:
            out[p.name] = v
    return out


def config_from_args(args: Any, file_values: Mapping[str, Any] | None = None) -> DhsaConfig:
    """Effective, validated config: CLI flags override ``file_values`` (from
    ``read_gguf_dhsa``), which override the built-in defaults.

    Raises DhsaParamError with one line naming the offending flag or GGUF key.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    labels: dict[str, str] = {}
    for name, v in (file_values or {}).items():
        if name not in PARAMS_BY_NAME:
            raise DhsaParamError(f"unknown DHSA parameter {name!r} in GGUF values "
                                 f"(known: {', '.join(PARAM_NAMES)})")
        values[name] = v
        sources[name] = "file"
        labels[name] = _file_label(name, file_values)
    for name, v in cli_values(args).items():
        values[name] = v
        sources[name] = "cli"
        labels.pop(name, None)
    return config_from_values(values, sources, labels)


# --------------------------------------------------------------------------------------------
# GGUF reading
# --------------------------------------------------------------------------------------------

@dataclass
class GgufKv:
    key: str
    vtype: int               # GGUF value type id
    start: int               # offset of the record (the key's length field)
    end: int                 # offset just past the value
    value: Any = None        # scalars and strings decoded; arrays: None unless decode_arrays
    subtype: int | None = None
    count: int | None = None  # array length


@dataclass
class GgufKvSection:
    version: int
    byteorder: str           # '<' or '>'
    tensor_count: int
    kv_count: int
    kvs: list[GgufKv]
    end: int                 # offset just past the last KV (start of tensor infos)

    def get(self, key: str) -> GgufKv | None:
        for kv in self.kvs:
            if kv.key == key:
                return kv
        return None

    def value(self, key: str, default: Any = None) -> Any:
        kv = self.get(key)
        return default if kv is None else kv.value


_GGUF_MAGIC = b"GGUF"
_MAX_ARRAY_NEST = 8


class _Cursor:
    __slots__ = ("buf", "pos", "n", "bo")

    def __init__(self, buf, pos: int, bo: str) -> None:
        self.buf, self.pos, self.n, self.bo = buf, pos, len(buf), bo

    def need(self, k: int, what: str) -> None:
        if k < 0 or self.pos + k > self.n:
            raise GgufFormatError(
                f"truncated GGUF: {what} at offset {self.pos} needs {k} bytes, "
                f"file has {self.n}")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(self.bo + fmt, self.buf, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def string(self, what: str, decode: bool = True):
        n = self.unpack("Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n]) if decode else None
        self.pos += n
        if not decode:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GgufFormatError(f"corrupt GGUF: {what} at offset {self.pos - n} "
                                  f"is not valid UTF-8") from None


def _read_value(c: _Cursor, vtype: int, decode_arrays: bool, depth: int, key: str):
    """Returns (value, subtype, count)."""
    if vtype == _T_STRING:
        return c.string(f"string value of {key!r}"), None, None
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is not None:
        return c.unpack(fmt, f"value of {key!r}"), None, None
    if vtype == _T_ARRAY:
        if depth >= _MAX_ARRAY_NEST:
            raise GgufFormatError(f"corrupt GGUF: arrays nested too deep in {key!r}")
        sub = c.unpack("I", f"array type of {key!r}")
        count = c.unpack("Q", f"array length of {key!r}")
        sfmt = _SCALAR_FMT.get(sub)
        if sfmt is not None:
            size = struct.calcsize(sfmt) * count
            c.need(size, f"array data of {key!r}")
            val = None
            if decode_arrays:
                val = list(struct.unpack_from(f"{c.bo}{count}{sfmt}", c.buf, c.pos))
            c.pos += size
            return val, sub, count
        if sub not in (_T_STRING, _T_ARRAY):
            raise GgufFormatError(f"corrupt GGUF: unknown array element type {sub} in {key!r}")
        if count > c.n:  # every element takes at least one byte
            raise GgufFormatError(f"truncated GGUF: array {key!r} claims {count} elements")
        vals = [] if decode_arrays else None
        if sub == _T_STRING and not decode_arrays:
            buf, bo, pos, n = c.buf, c.bo + "Q", c.pos, c.n
            unpack_from = struct.unpack_from
            for _ in range(count):  # fast path: skip the strings
                if pos + 8 > n:
                    c.pos = pos
                    c.need(8, f"string length in array {key!r}")
                pos += 8 + unpack_from(bo, buf, pos)[0]
            c.pos = pos
            c.need(0, f"string data in array {key!r}")
            if pos > n:
                raise GgufFormatError(f"truncated GGUF: string data of array {key!r} "
                                      f"runs past the end of the file ({n} bytes)")
            return None, sub, count
        for _ in range(count):
            v, _, _ = _read_value(c, sub, decode_arrays, depth + 1, key)
            if vals is not None:
                vals.append(v)
        return vals, sub, count
    raise GgufFormatError(f"corrupt GGUF: unknown value type {vtype} for key {key!r}")


def scan_gguf_kv(buf, decode_arrays: bool = False) -> GgufKvSection:
    """Parse the header and KV section of GGUF bytes (bytes, memoryview or mmap).

    The one GGUF header reader of the package (``read_gguf_dhsa``, ``pydhsa info`` through
    ``gguf_layout.read_layout``, the key-copying converter). Why not ``gguf.GGUFReader``: it builds
    numpy views for every array element, and on the embedded Gemma 3 270M GGUF (a 262,144-entry
    vocabulary) it took 16.5 s where this scan takes 0.06 s; and the converter needs each record's byte
    range to copy the other keys byte for byte. ``gguf`` still writes our files and names the types.

    Fast (no per-element objects for arrays unless ``decode_arrays``). Raises GgufFormatError
    on a file that is not GGUF, of an unsupported version, truncated or corrupt.
    """
    n = len(buf)
    if n < 4 or bytes(buf[:4]) != _GGUF_MAGIC:
        raise GgufFormatError("not a GGUF file (bad magic)")
    if n < 24:
        raise GgufFormatError(f"truncated GGUF: header needs 24 bytes, file has {n}")
    bo = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:
        bo = ">"
        version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise GgufFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
    c = _Cursor(buf, 8, bo)
    tensor_count = c.unpack("Q", "tensor count")
    kv_count = c.unpack("Q", "KV count")
    if kv_count > n or tensor_count > n:
        raise GgufFormatError(f"corrupt GGUF: implausible counts "
                              f"(tensors {tensor_count}, KVs {kv_count})")
    kvs: list[GgufKv] = []
    seen: set[str] = set()
    for i in range(kv_count):
        start = c.pos
        key = c.string(f"key #{i}")
        if key in seen:
            raise GgufFormatError(f"corrupt GGUF: duplicate key {key!r}")
        seen.add(key)
        vtype = c.unpack("I", f"value type of {key!r}")
        val, sub, count = _read_value(c, vtype, decode_arrays, 0, key)
        kvs.append(GgufKv(key, vtype, start, c.pos, val, sub, count))
    return GgufKvSection(version, bo, tensor_count, kv_count, kvs, c.pos)


def coerce_gguf_value(name: str, vtype: int, value: Any, label: str) -> Any:
    """Convert a GGUF metadata value to the parameter's Python type (no range check).

    Accepts any integer type for ints, any float or integer type for budget and strings for
    string parameters; anything else raises DhsaParamError.
    """
    p = PARAMS_BY_NAME[name]
    tname = _TYPE_NAMES.get(vtype, str(vtype))
    if p.kind == "float":
        if vtype == _T_FLOAT32:
            # shortest decimal that round-trips through float32 (0.3, not 0.30000001192092896)
            v = float(value)
            for digits in range(6, 10):
                cand = float(f"{v:.{digits}g}")
                if struct.unpack("<f", struct.pack("<f", cand))[0] == v:
                    return cand
            return v
        if vtype in _FLOAT_TYPES or vtype in _INT_TYPES:
            return float(value)
    elif p.kind == "int":
        if vtype in _INT_TYPES:
            return int(value)
    else:
        if vtype == _T_STRING:
            return str(value)
    want = {"float": "FLOAT32", "int": "UINT32", "str": "STRING"}[p.kind]
    raise DhsaParamError(f"{label}: has GGUF type {tname}, expected {want}")


def _reader_items(reader: Any) -> Iterable[tuple[str, int, Any]]:
    """(key, type id, decoded scalar/string or None) from a gguf.GGUFReader."""
    for key, field in reader.fields.items():
        if not field.types or key.startswith("GGUF."):
            continue
        vtype = int(field.types[0])
        val = field.contents() if vtype != _T_ARRAY else None
        yield key, vtype, val


def read_gguf_dhsa(path_or_reader: Any, arch: str | None = None) -> DhsaFileValues:
    """{name: value} of the ``<arch>.dhsa.*`` keys present in a GGUF file.

    ``path_or_reader``: a path (read with a fast scanner of the KV section only) or a
    ``gguf.GGUFReader``. ``arch`` defaults to the file's ``general.architecture``. Values are
    converted to the parameter types (float budget, int counts, str boundary/layers) and
    range-checked per field (cross-field rules are checked when building the config). Unknown
    ``<arch>.dhsa.*`` keys are ignored. The result remembers ``.arch`` and ``.path``.

    Raises GgufFormatError (not GGUF / truncated), DhsaParamError (bad value or type),
    OSError (cannot open).
    """
    path = None
    if hasattr(path_or_reader, "fields"):
        items = list(_reader_items(path_or_reader))
    else:
        path = os.fspath(path_or_reader)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GgufFormatError(f"{path}: not a GGUF file (empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                try:
                    sec = scan_gguf_kv(mm)
                except GgufFormatError as e:
                    raise GgufFormatError(f"{path}: {e}") from None
        items = [(kv.key, kv.vtype, kv.value) for kv in sec.kvs]
    if arch is None:
        for key, vtype, val in items:
            if key == "general.architecture":
                if vtype != _T_STRING:
                    raise GgufFormatError("general.architecture is not a string")
                arch = val
        if not arch:
            raise GgufFormatError("GGUF file has no general.architecture key")
    prefix = gguf_prefix(arch)
    out = DhsaFileValues(arch=arch, path=path)
    for key, vtype, val in items:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in PARAMS_BY_NAME:
            continue
        label = _file_label(name, out)
        v = coerce_gguf_value(name, vtype, val, label)
        out[name] = _check_field(name, v, label)
    return out
