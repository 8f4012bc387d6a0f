"""Malformed GGUF files made from a valid one: the corpus the reliability tests run every tool against.

    from gguf_corpus import GgufLayoutMap, malformed_cases
    base = GgufLayoutMap.read(path)          # where every structural field of the valid file lies
    for case in malformed_cases(base, seed=0, random_cases=20):
        case.name, case.kind                 # "truncate@kv[3].key", "flip@1234", ...
        case.write(out_path)                 # the malformed bytes (the valid file's data region appended)

Kinds of damage (each case has exactly one):
  truncate   the file cut at every structural boundary (header fields, each KV record and its key, each
             tensor-info record, the data region and each tensor's data) and at seeded random offsets
  flip       one byte of the header (header, KVs, tensor infos) XOR-ed with a seeded random value
  random     eight seeded random bytes over the header
  absurd     counts, lengths, dimensions, types, offsets and the alignment set to impossible values
  type       a well-known key stored with the wrong GGUF value type, or a value out of its range
  duplicate  a key or a tensor name that occurs twice
  utf8       invalid UTF-8 in a key, a string value, a tensor name, a token
  dhsa       `<arch>.dhsa.*` keys of the wrong type, out of range, unknown or inconsistent

The map of the valid file is read here with plain `struct` on purpose: the corpus must not depend on the
parsers it tests (pydhsa's scan, upstream's gguf.cpp). KV records added or replaced are encoded here too,
for the same reason. A case that changes the header's length re-pads it, so the data region stays aligned
and the case has only the damage its name says.
"""
from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

# GGUF value types (gguf.GGUFValueType, spelled out so that the corpus reads without the package)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FORMAT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
                  U64: "Q", I64: "q", F64: "d"}
U64_MAX = (1 << 64) - 1


@dataclass
class KvRecord:
    key: str
    vtype: int
    start: int          # offset of the key's length field
    key_end: int        # just past the key's bytes (the value type follows)
    end: int            # just past the value
    value: object = None  # scalars and strings; None for arrays
    subtype: Optional[int] = None
    count: Optional[int] = None
    value_start: int = 0  # the value's first byte (after the type; arrays: after subtype and count)


@dataclass
class TensorRecord:
    name: str
    start: int          # offset of the name's length field
    dims_at: int        # offset of the dimension count
    type_at: int        # offset of the ggml type (the data offset follows, 4 bytes later)
    end: int
    n_dims: int
    offset: int         # relative to the data region


@dataclass
class GgufLayoutMap:
    """Where the fields of a valid little-endian GGUF (version 3) lie."""
    path: Path
    header: bytes       # magic .. the last tensor-info record (no padding)
    kvs: list[KvRecord]
    tensors: list[TensorRecord]
    alignment: int
    data_offset: int
    file_size: int

    @classmethod
    def read(cls, path: Path) -> "GgufLayoutMap":
        path = Path(path)
        with path.open("rb") as f:
            head = f.read(64 << 20)  # the header of any model we test is far smaller
        if head[:4] != b"GGUF" or struct.unpack_from("<I", head, 4)[0] != 3:
            raise ValueError(f"{path}: not a little-endian GGUF v3 file")
        n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
        pos = 24
        kvs = []

        def string(at: int) -> tuple[str, int]:
            n = struct.unpack_from("<Q", head, at)[0]
            return head[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def skip_value(vtype: int, at: int) -> int:
            if vtype == STRING:
                return string(at)[1]
            if vtype == ARRAY:
                sub, count = struct.unpack_from("<IQ", head, at)
                at += 12
                if sub == STRING:
                    for _ in range(count):
                        at += 8 + struct.unpack_from("<Q", head, at)[0]
                    return at
                return at + count * struct.calcsize("<" + _SCALAR_FORMAT[sub])
            return at + struct.calcsize("<" + _SCALAR_FORMAT[vtype])

        for _ in range(n_kv):
            start = pos
            key, pos = string(pos)
            key_end = pos
            vtype = struct.unpack_from("<I", head, pos)[0]
            pos += 4
            value = subtype = count = None
            value_start = pos
            if vtype == ARRAY:
                subtype, count = struct.unpack_from("<IQ", head, pos)
                value_start = pos + 12
            elif vtype == STRING:
                value = string(pos)[0]
            else:
                value = struct.unpack_from("<" + _SCALAR_FORMAT[vtype], head, pos)[0]
            pos = skip_value(vtype, pos)
            kvs.append(KvRecord(key, vtype, start, key_end, pos, value, subtype, count, value_start))
        tensors = []
        for _ in range(n_tensors):
            start = pos
            name, pos = string(pos)
            dims_at = pos
            n_dims = struct.unpack_from("<I", head, pos)[0]
            type_at = pos + 4 + 8 * n_dims
            offset = struct.unpack_from("<Q", head, type_at + 4)[0]
            pos = type_at + 12
            tensors.append(TensorRecord(name, start, dims_at, type_at, pos, n_dims, offset))
        alignment = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
        data_offset = (pos + alignment - 1) // alignment * alignment
        return cls(path, head[:pos], kvs, tensors, alignment, data_offset, path.stat().st_size)

    def kv(self, key: str) -> KvRecord:
        for kv in self.kvs:
            if kv.key == key:
                return kv
        raise KeyError(key)

    @property
    def arch(self) -> str:
        return str(self.kv("general.architecture").value)


@dataclass
class Case:
    """One malformed file: `write(dst)` puts its bytes at dst."""
    name: str
    kind: str
    _write: Callable[[Path], None] = field(repr=False)

    def write(self, dst: Path) -> Path:
        self._write(Path(dst))
        return Path(dst)


def encode_string(s: bytes | str) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: bytes | str, vtype: int, value, subtype: Optional[int] = None) -> bytes:
    """One KV record; `value` is raw bytes for STRING when it must not be valid UTF-8, a list for ARRAY."""
    out = encode_string(key) + struct.pack("<I", vtype)
    if vtype == STRING:
        return out + encode_string(value)
    if vtype == ARRAY:
        out += struct.pack("<IQ", subtype, len(value))
        for v in value:
            out += encode_string(v) if subtype == STRING else struct.pack("<" + _SCALAR_FORMAT[subtype], v)
        return out
    return out + struct.pack("<" + _SCALAR_FORMAT[vtype], value)


def _copy_data(base: GgufLayoutMap, f, start: int, stop: Optional[int] = None) -> None:
    with base.path.open("rb") as src:
        src.seek(start)
        if stop is None:
            shutil.copyfileobj(src, f, 8 << 20)
        else:
            remaining = stop - start
            while remaining > 0:
                chunk = src.read(min(remaining, 8 << 20))
                if not chunk:
                    break
                f.write(chunk)
                remaining -= len(chunk)


def _truncated(base: GgufLayoutMap, n: int) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        with dst.open("wb") as f:
            _copy_data(base, f, 0, n)
    return write


def _with_header(base: GgufLayoutMap, header: bytes) -> Callable[[Path], None]:
    """The file with another header (magic .. tensor infos), padded to the alignment, then the data region."""
    def write(dst: Path) -> None:
        pad = -len(header) % base.alignment
        with dst.open("wb") as f:
            f.write(header + b"\0" * pad)
            _copy_data(base, f, base.data_offset)
    return write


def _patched(base: GgufLayoutMap, at: int, new: bytes) -> bytes:
    h = base.header
    return h[:at] + new + h[at + len(new):]


def _spliced(base: GgufLayoutMap, start: int, end: int, new: bytes, kv_delta: int = 0) -> bytes:
    h = base.header[:start] + new + base.header[end:]
    if kv_delta:
        n_kv = struct.unpack_from("<Q", h, 16)[0] + kv_delta
        h = h[:16] + struct.pack("<Q", n_kv) + h[24:]
    return h


def _replace_kv(base: GgufLayoutMap, key: str, record: bytes) -> bytes:
    kv = base.kv(key)
    return _spliced(base, kv.start, kv.end, record)


def _add_kv(base: GgufLayoutMap, record: bytes) -> bytes:
    """`record` appended after the last KV (the KV count one higher)."""
    end = base.kvs[-1].end
    return _spliced(base, end, end, record, kv_delta=1)


def truncation_points(base: GgufLayoutMap) -> dict[str, int]:
    """Name -> length of the truncated file, at every structural boundary of the valid file."""
    points = {"empty": 0, "magic": 4, "version": 8, "tensor-count": 16, "kv-count": 24}
    for i, kv in enumerate(base.kvs):
        points[f"kv[{i}]"] = kv.start
        points[f"kv[{i}].key"] = kv.start + 8 + (kv.key_end - kv.start - 8) // 2
        points[f"kv[{i}].type"] = kv.key_end
        points[f"kv[{i}].value"] = kv.key_end + 4 + (kv.end - kv.key_end - 4) // 2
    for i, t in enumerate(base.tensors):
        points[f"tensor-info[{i}]"] = t.start
        points[f"tensor-info[{i}].dims"] = t.dims_at
        points[f"tensor-info[{i}].type"] = t.type_at
        points[f"tensor-info[{i}].offset"] = t.type_at + 4
    points["padding"] = len(base.header)
    points["data"] = base.data_offset
    for i, t in enumerate(base.tensors):
        if t.offset:
            points[f"tensor-data[{i}]"] = base.data_offset + t.offset
    points["last-byte"] = base.file_size - 1
    return points


def malformed_cases(base: GgufLayoutMap, seed: int = 0, random_cases: int = 20,
                    boundaries: Optional[int] = None) -> Iterator[Case]:
    """Every kind of damage to `base`. `random_cases`: how many seeded random truncations, flips and
    random-byte cases each; `boundaries`: at most this many truncation points (evenly spread), all when None."""
    rng = random.Random(seed)
    yield from _truncations(base, rng, random_cases, boundaries)
    yield from _flips(base, rng, random_cases)
    yield from _absurd(base)
    yield from _wrong_types(base)
    yield from _duplicates(base)
    yield from _bad_utf8(base)
    yield from _dhsa_values(base)


def _truncations(base, rng, n_random, boundaries) -> Iterator[Case]:
    points = sorted(set(truncation_points(base).items()), key=lambda kv: kv[1])
    if boundaries is not None and len(points) > boundaries:
        step = len(points) / boundaries
        points = [points[int(i * step)] for i in range(boundaries)]
    for name, n in points:
        yield Case(f"truncate@{name}", "truncate", _truncated(base, n))
    for _ in range(n_random):
        n = rng.randrange(1, base.file_size)
        yield Case(f"truncate@{n}", "truncate", _truncated(base, n))


def _flips(base, rng, n) -> Iterator[Case]:
    for _ in range(n):
        at = rng.randrange(len(base.header))
        byte = bytes([base.header[at] ^ rng.randrange(1, 256)])
        yield Case(f"flip@{at}", "flip", _with_header(base, _patched(base, at, byte)))
    for _ in range(n):
        at = rng.randrange(len(base.header) - 8)
        yield Case(f"random@{at}", "random", _with_header(base, _patched(base, at, rng.randbytes(8))))


def _absurd(base: GgufLayoutMap) -> Iterator[Case]:
    h = lambda at, fmt, v: _with_header(base, _patched(base, at, struct.pack("<" + fmt, v)))  # noqa: E731
    n_tensors, n_kv = len(base.tensors), len(base.kvs)
    for v in (1, 4, 0xFFFFFFFF):
        yield Case(f"absurd:version={v}", "absurd", h(4, "I", v))
    for v in (U64_MAX, 1 << 62, n_tensors + 1, n_tensors - 1, 0):
        yield Case(f"absurd:tensor-count={v}", "absurd", h(8, "Q", v))
    for v in (U64_MAX, 1 << 62, n_kv + 1, n_kv - 1, 0):
        yield Case(f"absurd:kv-count={v}", "absurd", h(16, "Q", v))
    first = base.kvs[0]
    for v in (U64_MAX, 1 << 63, base.file_size):
        yield Case(f"absurd:key-length={v}", "absurd", h(first.start, "Q", v))
    for v in (99, ARRAY + 100, 0xFFFFFFFF):
        yield Case(f"absurd:value-type={v}", "absurd", h(first.key_end, "I", v))
    arch = base.kv("general.architecture")
    for v in (U64_MAX, 1 << 40):
        yield Case(f"absurd:string-length={v}", "absurd", h(arch.key_end + 4, "Q", v))
    arrays = [kv for kv in base.kvs if kv.vtype == ARRAY]
    if arrays:
        a = max(arrays, key=lambda kv: kv.count)
        for v in (U64_MAX, 1 << 61, a.count + 1):
            yield Case(f"absurd:array-count={v}", "absurd", h(a.key_end + 8, "Q", v))
        for v in (99, ARRAY):
            yield Case(f"absurd:array-type={v}", "absurd", h(a.key_end + 4, "I", v))
    t0, t1 = base.tensors[0], base.tensors[-1]
    for v in (0, 5, 0xFFFFFFFF):
        yield Case(f"absurd:n_dims={v}", "absurd", h(t0.dims_at, "I", v))
    for v in (0, 1 << 62, U64_MAX):
        yield Case(f"absurd:dim={v}", "absurd", h(t0.dims_at + 4, "Q", v))
    if t0.n_dims >= 2:  # each dimension fits int64, their product does not
        both = struct.pack("<QQ", 1 << 40, 1 << 40)
        yield Case("absurd:dims-product-overflow", "absurd", _with_header(base, _patched(base, t0.dims_at + 4, both)))
    for v in (4, 99, 0xFFFFFFFF):  # 4: Q4_2, removed from ggml
        yield Case(f"absurd:tensor-type={v}", "absurd", h(t0.type_at, "I", v))
    for v in (U64_MAX, 1 << 50, base.file_size - base.data_offset):
        yield Case(f"absurd:tensor-offset={v}", "absurd", h(t1.type_at + 4, "Q", v))
    yield Case("absurd:tensor-offset-misaligned", "absurd", h(t1.type_at + 4, "Q", t1.offset + 1))
    if len(base.tensors) > 1:
        yield Case("absurd:tensors-overlap", "absurd", h(t1.type_at + 4, "Q", t0.offset))
    for v in (0, 3, 1 << 31):
        record = encode_kv("general.alignment", U32, v)
        header = (_replace_kv(base, "general.alignment", record) if any(k.key == "general.alignment" for k in base.kvs)
                  else _add_kv(base, record))
        yield Case(f"absurd:alignment={v}", "absurd", _with_header(base, header))


def _wrong_types(base: GgufLayoutMap) -> Iterator[Case]:
    arch = base.arch
    cases = {
        "general.architecture": [(U32, 7), (ARRAY, ([arch], STRING))],
        f"{arch}.block_count": [(STRING, "18"), (F32, 18.0), (U32, 0), (U32, 1 << 31)],
        f"{arch}.context_length": [(F32, 1024.0), (U32, 0)],
        f"{arch}.embedding_length": [(I8, -1), (BOOL, True), (U32, 0)],
        f"{arch}.attention.head_count": [(ARRAY, ([4, 4], U32)), (U32, 0), (U32, 7)],
        f"{arch}.attention.head_count_kv": [(U32, 0), (U32, 3)],
        "tokenizer.ggml.bos_token_id": [(U32, 0xFFFFFFF0), (STRING, "1")],
        "tokenizer.ggml.model": [(U32, 1), (STRING, "no-such-tokenizer")],
    }
    for key, variants in cases.items():
        if not any(kv.key == key for kv in base.kvs):
            continue
        for vtype, value in variants:
            if vtype == ARRAY:
                value, sub = value
                record = encode_kv(key, ARRAY, value, sub)
            else:
                record = encode_kv(key, vtype, value)
            label = {U32: "u32", F32: "f32", STRING: "str", I8: "i8", BOOL: "bool", ARRAY: "array"}[vtype]
            yield Case(f"type:{key}={label}:{value!r}"[:120], "type", _with_header(base, _replace_kv(base, key, record)))
    tokens = base.kv("tokenizer.ggml.tokens")
    # the vocabulary as an array of numbers, and one token fewer than the output matrix has rows
    yield Case("type:tokenizer.ggml.tokens=array-of-i32", "type",
               _with_header(base, _replace_kv(base, tokens.key, encode_kv(tokens.key, ARRAY, [1, 2, 3], I32))))
    scores = [kv for kv in base.kvs if kv.key == "tokenizer.ggml.scores"]
    if scores:
        yield Case("type:tokenizer.ggml.scores=3-entries", "type",
                   _with_header(base, _replace_kv(base, scores[0].key, encode_kv(scores[0].key, ARRAY, [0.0] * 3, F32))))


def _duplicates(base: GgufLayoutMap) -> Iterator[Case]:
    yield Case("duplicate:general.architecture", "duplicate",
               _with_header(base, _add_kv(base, encode_kv("general.architecture", STRING, "llama"))))
    yield Case(f"duplicate:{base.arch}.block_count", "duplicate",
               _with_header(base, _add_kv(base, encode_kv(f"{base.arch}.block_count", U32, 1))))
    if len(base.tensors) > 1:
        t0, t1 = base.tensors[0], base.tensors[1]
        header = _spliced(base, t1.start, t1.dims_at, encode_string(t0.name))
        yield Case("duplicate:tensor-name", "duplicate", _with_header(base, header))


def _bad_utf8(base: GgufLayoutMap) -> Iterator[Case]:
    bad = b"\xff\xfe\xc3("
    arch = base.kv("general.architecture")
    yield Case("utf8:architecture-value", "utf8",
               _with_header(base, _replace_kv(base, arch.key, encode_kv(arch.key, STRING, bad))))
    name = base.kvs[-1]
    record = base.header[name.start:name.end]
    klen = struct.unpack_from("<Q", record)[0]
    yield Case("utf8:key", "utf8", _with_header(base, _patched(base, name.start + 8, bad[:min(4, klen)])))
    t0 = base.tensors[0]
    yield Case("utf8:tensor-name", "utf8", _with_header(base, _patched(base, t0.start + 8, bad[:2])))
    tokens = base.kv("tokenizer.ggml.tokens")  # the first token's bytes (its length field is 8 bytes in)
    first_len = struct.unpack_from("<Q", base.header, tokens.value_start)[0]
    if first_len >= 2:
        yield Case("utf8:token", "utf8", _with_header(base, _patched(base, tokens.value_start + 8, b"\xff\xfe")))
    for kv in base.kvs:
        if kv.vtype == STRING and kv.key.startswith("general.") and kv.key != arch.key:
            yield Case(f"utf8:{kv.key}", "utf8",
                       _with_header(base, _replace_kv(base, kv.key, encode_kv(kv.key, STRING, bad))))
            break


def _dhsa_values(base: GgufLayoutMap) -> Iterator[Case]:
    p = f"{base.arch}.dhsa."
    records = {
        "budget=str": encode_kv(p + "budget", STRING, "0.3"),
        "budget=-1": encode_kv(p + "budget", F32, -1.0),
        "budget=1.5": encode_kv(p + "budget", F32, 1.5),
        "budget=nan": encode_kv(p + "budget", F32, float("nan")),
        "budget=inf": encode_kv(p + "budget", F32, float("inf")),
        "boundary=bogus": encode_kv(p + "boundary", STRING, "bogus"),
        "boundary=u32": encode_kv(p + "boundary", U32, 1),
        "boundary=bad-utf8": encode_kv(p + "boundary", STRING, b"\xff\xfe"),
        "q_block=0": encode_kv(p + "q_block", U32, 0),
        "q_block=u32-max": encode_kv(p + "q_block", U32, 0xFFFFFFFF),
        "chunk_min=-5": encode_kv(p + "chunk_min", I32, -5),
        "chunk_max=f64": encode_kv(p + "chunk_max", F64, 64.0),
        "unknown-key": encode_kv(p + "no_such_parameter", U32, 1),
        "layers=array": encode_kv(p + "layers", ARRAY, ["global"], STRING),
    }
    for label, record in records.items():
        yield Case(f"dhsa:{label}", "dhsa", _with_header(base, _add_kv(base, record)))
    both = encode_kv(p + "chunk_min", U32, 200) + encode_kv(p + "chunk_max", U32, 100)
    yield Case("dhsa:chunk_min>chunk_max", "dhsa", _with_header(base, _spliced(
        base, base.kvs[-1].end, base.kvs[-1].end, both, kv_delta=2)))
