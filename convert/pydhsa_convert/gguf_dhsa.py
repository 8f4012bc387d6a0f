"""GGUF -> GGUF with the ``<arch>.dhsa.*`` metadata keys added, changed or removed.

Everything else is copied byte for byte: the header's magic and version, every other KV record
(in its original order and encoding), the tensor-info records and the whole tensor data region
(from the original data offset to the end of the file). Only the KV count, the DHSA records and
the zero padding before the data region (recomputed for the file's ``general.alignment``,
default 32) can differ, so tensor order, relative offsets and alignment are preserved.

The input is only ever opened read-only. The output goes to a temporary file in the output's
directory, is checked, and is renamed over the output path only when complete; on any error the
temporary file is removed and nothing is left behind.

Usage: ``python -m pydhsa_convert gguf IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]``
(the CLI also takes a Hugging Face Gemma 2/3 checkpoint folder as IN, with ``--outtype``; that
conversion is ``pydhsa_convert.hf_gemma``).

Library API:
    convert_gguf(src, dst, set_values=None, remove=False, write_defaults=False, progress=None)
    inspect_gguf(path) -> GgufLayout
    add_convert_arguments(parser), run_convert(args) -> int, main(argv=None) -> int
    ConvertError (bad input, exit 2), ConvertIOError (writing failed, exit 1)
"""
from __future__ import annotations

import argparse
import errno
import os
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, TextIO

from pydhsa.gguf_layout import (
    DEFAULT_ALIGNMENT, GgufInputError, GgufLayout, MappedInput, TensorInfo, align, parse_layout, read_layout,
)
from pydhsa.progress import ByteProgress as _Progress, isatty as _isatty
from pydhsa.tempfiles import make_temp
from pydhsa.dhsa_params import (
    PARAMS,
    PARAMS_BY_NAME,
    DhsaParamError,
    GgufFormatError,
    GgufKv,
    add_dhsa_arguments,
    cli_values,
    coerce_gguf_value,
    config_from_values,
    gguf_key,
    gguf_prefix,
)

__all__ = [
    "ConvertError", "ConvertIOError", "ConvertResult", "GgufLayout", "TensorInfo",
    "inspect_gguf", "convert_gguf", "encode_kv", "add_convert_arguments", "run_convert", "main",
    "DEFAULT_ALIGNMENT",
]


COPY_CHUNK = 8 << 20                 # bytes per read/write while streaming tensor data
AUTO_PROGRESS_MIN_BYTES = 32 << 20   # auto progress only for copies at least this large

_T_UINT32, _T_FLOAT32, _T_STRING = 4, 6, 8


class ConvertError(ValueError):
    """Bad input: missing / not GGUF / truncated file, output == input, bad DHSA values."""


class ConvertIOError(ConvertError):
    """The output could not be written (unwritable directory, disk full, ...)."""


# --------------------------------------------------------------------------------------------
# Shared by both converters: the atomic output, the given DHSA values
# --------------------------------------------------------------------------------------------

def output_temp(dst: str) -> tuple[int, str]:
    """(fd, path) of the temporary file a converter writes before renaming it to `dst` (beside it, with the
    usual file mode; pydhsa.tempfiles); ConvertIOError when it cannot be created."""
    try:
        fd, tmp = make_temp(dst)
    except OSError as e:
        d = os.path.dirname(os.path.abspath(dst))
        raise ConvertIOError(f"cannot create output in {d}: {e.strerror or e}") from e
    return fd, str(tmp)


def write_error(dst: str | os.PathLike[str], e: OSError) -> ConvertIOError:
    """The error for an OSError while writing the output (a full disk named as such)."""
    what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return ConvertIOError(f"cannot write output {dst}: {what}")


def fsync_directory(d: str | os.PathLike[str]) -> None:
    """Make a rename inside `d` durable; not fatal where a directory cannot be fsynced."""
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@contextmanager
def atomic_output(dst: str, prog: _Progress) -> Iterator[tuple[int, str]]:
    """Write a converter's output atomically: yields (fd, path) of a temporary file beside `dst` for the body to
    write in full (and fsync); when the body returns, the file is renamed over `dst` and the rename made durable.
    On any error `dst` is untouched, the temporary file removed and `prog`'s line ended; an OSError becomes
    ConvertIOError (a full disk named as such). The body closes `fd` (or writes through it)."""
    fd, tmp = output_temp(dst)
    ok = False
    try:
        try:
            yield fd, tmp
            os.replace(tmp, dst)
            ok = True
        except ConvertError:
            raise
        except OSError as e:
            raise write_error(dst, e) from e
    finally:
        if not ok:
            prog.abort()
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_directory(os.path.dirname(os.path.abspath(dst)))


def given_dhsa_values(set_values: Mapping[str, Any] | None) -> dict[str, Any]:
    """The DHSA values a caller gave ({name: value}), every name checked (ConvertError for an unknown one)."""
    given = dict(set_values or {})
    for name in given:
        if name not in PARAMS_BY_NAME:
            raise ConvertError(f"unknown DHSA parameter {name!r}")
    return given


# --------------------------------------------------------------------------------------------
# Layout of an input file
# --------------------------------------------------------------------------------------------

def inspect_gguf(path: str | os.PathLike[str]) -> GgufLayout:
    """Parse the header, KV section and tensor infos of a GGUF file (fast, read-only).

    Raises ConvertError for a missing file, a file that is not GGUF, truncated or corrupt.
    """
    try:
        return read_layout(path)
    except GgufInputError as e:
        raise ConvertError(str(e)) from None


# --------------------------------------------------------------------------------------------
# Encoding (same bytes as gguf.GGUFWriter)
# --------------------------------------------------------------------------------------------

def encode_kv(key: str, vtype: int, value: Any, byteorder: str = "<") -> bytes:
    """One KV record as GGUFWriter writes it: key string, uint32 type, value.

    Supports the types DHSA uses: FLOAT32, UINT32 and STRING.
    """
    kb = key.encode("utf-8")
    out = struct.pack(byteorder + "Q", len(kb)) + kb + struct.pack(byteorder + "I", vtype)
    if vtype == _T_FLOAT32:
        out += struct.pack(byteorder + "f", float(value))
    elif vtype == _T_UINT32:
        out += struct.pack(byteorder + "I", int(value))
    elif vtype == _T_STRING:
        vb = str(value).encode("utf-8")
        out += struct.pack(byteorder + "Q", len(vb)) + vb
    else:
        raise ValueError(f"unsupported GGUF value type {vtype} for {key}")
    return out


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

@dataclass
class ConvertResult:
    src: str
    dst: str
    arch: str
    written: dict[str, Any]            # {name: value} of the DHSA keys in the output
    removed: list[str]                 # GGUF keys dropped
    changed: dict[str, tuple[Any, Any]]  # {name: (old, new)} for keys whose value changed
    added: list[str]                   # names newly added
    config: Any                        # effective DhsaConfig (file keys + defaults)
    kv_count: int
    data_offset: int
    data_size: int
    notes: list[str] = field(default_factory=list)


def _check_paths(src: str, dst: str) -> None:
    if not os.path.exists(src):
        if os.path.islink(src):
            raise ConvertError(f"input file not found (dangling symlink): {src}")
        raise ConvertError(f"input file not found: {src}")
    if os.path.isdir(src):
        raise ConvertError(f"input is a directory, not a GGUF file: {src}")
    if os.path.isdir(dst):
        raise ConvertError(f"output path is a directory: {dst}")
    if os.path.exists(dst):
        try:
            same = os.path.samefile(src, dst)
        except OSError:
            same = False
        if same:
            raise ConvertError(f"output is the same file as the input: {dst} "
                               f"(the input is never modified; choose another output path)")
    elif os.path.realpath(dst) == os.path.realpath(src):
        raise ConvertError(f"output is the same file as the input: {dst}")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.exists(parent):
        raise ConvertIOError(f"output directory does not exist: {parent}")
    if not os.path.isdir(parent):
        raise ConvertIOError(f"output directory is not a directory: {parent}")


def _existing_dhsa(layout: GgufLayout, arch: str, overridden: set[str]
                   ) -> tuple[dict[str, Any], list[GgufKv]]:
    """Known DHSA values in the file and the unknown ``<arch>.dhsa.*`` records.

    A key of the wrong GGUF type is an error unless it is being overridden (then it is
    simply replaced).
    """
    prefix = gguf_prefix(arch)
    values: dict[str, Any] = {}
    unknown: list[GgufKv] = []
    for kv in layout.kv.kvs:
        if not kv.key.startswith(prefix):
            continue
        name = kv.key[len(prefix):]
        if name in PARAMS_BY_NAME:
            label = f"GGUF key {kv.key} in {os.path.basename(layout.path)}"
            try:
                values[name] = coerce_gguf_value(name, kv.vtype, kv.value, label)
            except DhsaParamError:
                if name not in overridden:
                    raise
                values[name] = None  # replaced below; never equal to the new value
        else:
            unknown.append(kv)
    return values, unknown


def convert_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    set_values: Mapping[str, Any] | None = None,
    remove: bool = False,
    write_defaults: bool = False,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
) -> ConvertResult:
    """Write ``dst``: a copy of GGUF ``src`` with ``<arch>.dhsa.*`` keys changed.

    ``set_values``: {name: value} to set (validated; merged with the DHSA keys already in the
    file). ``remove``: drop every ``<arch>.dhsa.*`` key of the input first (with
    ``set_values`` this replaces the whole DHSA set). ``write_defaults``: write every parameter
    explicitly (the effective value: given > file > built-in default). ``progress``: True/False,
    or None for "only when the stream is a TTY and the copy is large".

    Existing keys keep their position (re-encoded with the canonical type only if their value
    or type changes); new keys are appended after the existing KVs in table order.

    Raises ConvertError (bad input, including DHSA value errors) or ConvertIOError (could not
    write the output); in both cases no output or temporary file is left behind.
    """
    src = os.fspath(src)
    dst = os.fspath(dst)
    stream = progress_stream if progress_stream is not None else sys.stderr
    _check_paths(src, dst)
    given = given_dhsa_values(set_values)

    try:
        inp = MappedInput(src)
    except GgufInputError as e:
        raise ConvertError(str(e)) from None
    with inp:
        try:
            layout = parse_layout(inp.mm, src)
        except GgufFormatError as e:
            raise ConvertError(f"{src}: {e}") from None
        arch = layout.arch
        if not arch:
            raise ConvertError(f"{src}: GGUF has no string general.architecture key; "
                               f"cannot name the <arch>.dhsa.* keys")
        try:
            if remove:
                file_values: dict[str, Any] = {}
                unknown_recs: list[GgufKv] = []
                prefix = gguf_prefix(arch)
                drop = [kv for kv in layout.kv.kvs if kv.key.startswith(prefix)]
                old_values: dict[str, Any] = {}
            else:
                file_values, unknown_recs = _existing_dhsa(layout, arch, set(given))
                drop = []
                old_values = dict(file_values)
            # validate: CLI/given values override file values override built-in defaults
            merged = dict(file_values)
            merged.update(given)
            sources = {k: "file" for k in file_values}
            sources.update({k: "cli" for k in given})
            labels = {k: f"GGUF key {gguf_key(arch, k)} in {os.path.basename(src)}"
                      for k in file_values if k not in given}
            config = config_from_values(merged, sources, labels)
        except DhsaParamError as e:
            raise ConvertError(str(e)) from None
        eff = config.as_dict()
        to_write = {k: eff[k] for k in (PARAMS_BY_NAME if write_defaults else merged)}
        # keep table order
        to_write = {p.name: to_write[p.name] for p in PARAMS if p.name in to_write}

        bo = layout.byteorder
        prefix = gguf_prefix(arch)
        drop_keys = {kv.key for kv in drop}
        kv_parts: list[bytes | tuple[int, int]] = []   # bytes or (start, end) ranges of src
        emitted: set[str] = set()
        removed: list[str] = []
        for kv in layout.kv.kvs:
            if kv.key in drop_keys:
                removed.append(kv.key)
                continue
            if kv.key.startswith(prefix) and kv.key[len(prefix):] in PARAMS_BY_NAME:
                name = kv.key[len(prefix):]
                p = PARAMS_BY_NAME[name]
                new = to_write[name]  # present: merged includes every file value
                emitted.add(name)
                if kv.vtype == p.gguf_type and old_values.get(name) == new:
                    kv_parts.append((kv.start, kv.end))       # unchanged: copy verbatim
                else:
                    kv_parts.append(encode_kv(kv.key, p.gguf_type, new, bo))
                continue
            kv_parts.append((kv.start, kv.end))
        added = []
        for name, v in to_write.items():
            if name not in emitted:
                kv_parts.append(encode_kv(gguf_key(arch, name), PARAMS_BY_NAME[name].gguf_type, v, bo))
                added.append(name)
        changed = {k: (old_values[k], to_write[k]) for k in to_write
                   if k in old_values and old_values[k] != to_write[k]}
        kv_count = len(kv_parts)

        mm = inp.mm
        header = bytes(mm[0:8]) + struct.pack(bo + "QQ", layout.kv.tensor_count, kv_count)
        meta = bytearray(header)
        for part in kv_parts:
            meta += part if isinstance(part, bytes) else mm[part[0]:part[1]]
        meta += mm[layout.ti_start:layout.ti_end]
        has_data_region = layout.data_offset > layout.ti_end or layout.data_size > 0 \
            or layout.kv.tensor_count > 0
        new_data_offset = align(len(meta), layout.alignment) if has_data_region else len(meta)
        meta += b"\x00" * (new_data_offset - len(meta))

        show = progress
        if show is None:
            show = _isatty(stream) and layout.data_size >= AUTO_PROGRESS_MIN_BYTES
        prog = _Progress(layout.data_size, bool(show), stream,
                         f"copying tensor data to {os.path.basename(dst)}")
        _write_atomically(dst, meta, mm, layout.data_offset, layout.data_size, prog)

    return ConvertResult(
        src=src, dst=dst, arch=arch, written=to_write, removed=removed, changed=changed,
        added=added, config=config, kv_count=kv_count, data_offset=new_data_offset,
        data_size=layout.data_size,
        notes=[f"kept unknown key {kv.key}" for kv in unknown_recs])


def _copy_region(out, mm, start: int, size: int, prog: _Progress) -> None:
    """Stream ``mm[start:start+size]`` into ``out`` (tests patch this to simulate failures)."""
    done = 0
    view = memoryview(mm)
    try:
        while done < size:
            n = min(COPY_CHUNK, size - done)
            out.write(view[start + done:start + done + n])
            done += n
            prog.update(done)
    finally:
        view.release()


def _write_atomically(dst: str, meta: bytes, mm, data_start: int, data_size: int,
                      prog: _Progress) -> None:
    with atomic_output(dst, prog) as (fd, tmp):
        with os.fdopen(fd, "wb") as out:
            out.write(meta)
            _copy_region(out, mm, data_start, data_size, prog)
            out.flush()
            os.fsync(out.fileno())
        expect = len(meta) + data_size
        got = os.path.getsize(tmp)
        if got != expect:
            raise ConvertIOError(f"short write to {tmp}: {got} of {expect} bytes")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the converter's arguments (positional IN OUT, --outtype, --dhsa-*, options).

    IN is a GGUF file (copied with DHSA keys changed) or a Hugging Face Gemma 2/3 checkpoint
    folder (converted by ``pydhsa_convert.hf_gemma``).
    """
    parser.add_argument("input", metavar="IN",
                        help="input GGUF file, or Hugging Face Gemma2ForCausalLM / "
                             "Gemma3ForCausalLM checkpoint folder (never modified)")
    parser.add_argument("output", metavar="OUT.gguf",
                        help="output GGUF file (must differ from the input; written atomically)")
    parser.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                        help="weight type when converting a Hugging Face folder (default f16; "
                             "1-D tensors stay f32); not allowed for GGUF input")
    parser.add_argument("--remove-dhsa", action="store_true",
                        help="remove every <arch>.dhsa.* key of the input (with --dhsa-* flags: "
                             "replace the whole set by the given values)")
    parser.add_argument("--write-defaults", action="store_true",
                        help="write every DHSA parameter explicitly (effective values: "
                             "flags > file > built-in defaults)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show copy progress on stderr (default: only on a terminal, large files)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="never show progress")
    parser.add_argument("-q", "--quiet", action="store_true", help="print no summary")
    add_dhsa_arguments(parser)
    return parser


def _fmt_val(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_convert(args: argparse.Namespace, stdout: TextIO | None = None,
                stderr: TextIO | None = None, error_prefix: str = "error: ") -> int:
    """Run the conversion described by parsed ``args``; returns the exit status.

    0 on success (one summary line on stdout unless --quiet), 2 with one ``error: ...`` line
    on stderr for bad input, 1 with one ``error: ...`` line when the output cannot be written.
    ``error_prefix``: how that line starts (``pydhsa convert`` says ``pydhsa: error: ``, as its other
    subcommands do).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if os.path.isdir(args.input):
        return _run_convert_hf(args, out, err, error_prefix)
    if getattr(args, "outtype", None) is not None:
        err.write(f"{error_prefix}--outtype applies only to a Hugging Face checkpoint folder; a GGUF "
                  "input keeps its tensor types\n")
        return 2
    res, status = _reporting_errors(err, lambda: convert_gguf(
        args.input, args.output, set_values=cli_values(args), remove=getattr(args, "remove_dhsa", False),
        write_defaults=getattr(args, "write_defaults", False), progress=getattr(args, "progress", None),
        progress_stream=err), error_prefix)
    if res is None:
        return status
    if not getattr(args, "quiet", False):
        parts = []
        if res.written:
            parts.append("set " + ", ".join(f"{res.arch}.dhsa.{k}={_fmt_val(v)}"
                                           for k, v in res.written.items()))
        if res.removed:
            parts.append(f"removed {len(res.removed)} key(s)")
        if not parts:
            parts.append("no DHSA keys")
        out.write(f"wrote {res.dst}: {'; '.join(parts)}\n")
        out.flush()
    return 0


def _reporting_errors(err: TextIO, convert: Any, error_prefix: str) -> tuple[Any, int]:
    """Run one conversion; on failure write one ``error: ...`` line and give the exit status:
    2 for bad input, 1 when the output could not be written."""
    try:
        return convert(), 0
    except (ConvertError, DhsaParamError, GgufFormatError, OSError) as e:
        bad_input = isinstance(e, (ConvertError, DhsaParamError, GgufFormatError)) \
            and not isinstance(e, ConvertIOError)
        err.write(f"{error_prefix}{e}\n")
        return None, 2 if bad_input else 1


def _run_convert_hf(args: argparse.Namespace, out: TextIO, err: TextIO, error_prefix: str) -> int:
    """``run_convert`` for a Hugging Face checkpoint folder (see pydhsa_convert.hf_gemma)."""
    from .hf_gemma import DEFAULT_OUTTYPE, convert_hf
    res, status = _reporting_errors(err, lambda: convert_hf(
        args.input, args.output, outtype=getattr(args, "outtype", None) or DEFAULT_OUTTYPE,
        set_values=cli_values(args), write_defaults=getattr(args, "write_defaults", False),
        progress=getattr(args, "progress", None), progress_stream=err), error_prefix)
    if res is None:
        return status
    if not getattr(args, "quiet", False):
        parts = [f"{res.arch}, {res.n_tensors} tensors ({res.outtype}), {res.n_vocab} tokens"]
        if res.dhsa:
            parts.append("set " + ", ".join(f"{res.arch}.dhsa.{k}={_fmt_val(v)}"
                                           for k, v in res.dhsa.items()))
        out.write(f"wrote {res.dst}: {'; '.join(parts)}\n")
        for note in res.notes:
            out.write(f"note: {note}\n")
        out.flush()
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error: ...`` line and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(prog: str = "python -m pydhsa_convert") -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description="Model file converters for pydhsa.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("gguf", help="GGUF -> GGUF with <arch>.dhsa.* keys added/changed/removed",
                       description="Copy a GGUF file, adding, changing (--dhsa-*) or removing "
                                   "(--remove-dhsa) its <arch>.dhsa.* metadata keys. All other "
                                   "metadata and the tensor data are copied byte for byte.")
    add_convert_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pydhsa_convert gguf IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]``"""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command == "gguf":
        return run_convert(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2
