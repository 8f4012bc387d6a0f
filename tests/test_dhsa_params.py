"""DHSA parameter table: defaults, validation rules, CLI flags, precedence, GGUF reading."""
import argparse
import math

import pytest

from pydhsa import dhsa_params as dp
from pydhsa.dhsa_params import (
    PARAMS,
    DhsaConfig,
    DhsaParamError,
    GgufFormatError,
    add_dhsa_arguments,
    cli_values,
    config_from_args,
    config_from_values,
    gguf_key,
    gguf_keys,
    read_gguf_dhsa,
)

gguf = pytest.importorskip("gguf")

EXPECTED_DEFAULTS = {
    "budget": 0.3, "boundary": "keysim", "chunk_min": 16, "chunk_max": 128, "chunk_avg": 32,
    "q_block": 64, "sink_tokens": 128, "local_tokens": 128, "dense_tail": 64,
    "min_context": 2048, "layers": "global", "decode": "dense",
}
EXPECTED_FLAGS = {
    "budget": "--dhsa-budget", "boundary": "--dhsa-boundary", "chunk_min": "--dhsa-chunk-min",
    "chunk_max": "--dhsa-chunk-max", "chunk_avg": "--dhsa-chunk-avg", "q_block": "--dhsa-q-block",
    "sink_tokens": "--dhsa-sink", "local_tokens": "--dhsa-local",
    "dense_tail": "--dhsa-dense-tail", "min_context": "--dhsa-min-context",
    "layers": "--dhsa-layers", "decode": "--dhsa-decode",
}


def parser():
    p = argparse.ArgumentParser(prog="t")
    add_dhsa_arguments(p)
    return p


def parse(*argv):
    return parser().parse_args(list(argv))


def cfg(*argv, file_values=None):
    return config_from_args(parse(*argv), file_values)


def err(*argv, file_values=None) -> str:
    with pytest.raises(DhsaParamError) as ei:
        cfg(*argv, file_values=file_values)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# --- table -------------------------------------------------------------------------------------

def test_table_defaults_flags_keys_types():
    assert dp.PARAM_NAMES == tuple(EXPECTED_DEFAULTS)
    assert DhsaConfig().as_dict() == EXPECTED_DEFAULTS
    assert {p.name: p.default for p in PARAMS} == EXPECTED_DEFAULTS
    assert {p.name: p.flag for p in PARAMS} == EXPECTED_FLAGS
    assert gguf_keys("gemma3") == {n: f"gemma3.dhsa.{n}" for n in EXPECTED_DEFAULTS}
    assert gguf_key("gemma2", "q_block") == "gemma2.dhsa.q_block"
    T = gguf.GGUFValueType
    for p in PARAMS:
        want = {"budget": T.FLOAT32, "boundary": T.STRING, "layers": T.STRING, "decode": T.STRING}.get(p.name, T.UINT32)
        assert dp.gguf_value_type(p.name) == want
        assert p.help
    with pytest.raises(DhsaParamError):
        gguf_key("gemma3", "nope")


def test_flags_default_none_and_help():
    args = parse()
    for p in PARAMS:
        assert getattr(args, p.dest) is None
    assert cli_values(args) == {}
    assert cfg() == DhsaConfig()
    help_text = parser().format_help()
    for flag in EXPECTED_FLAGS.values():
        assert flag in help_text
    assert "not implemented yet" in help_text


def test_flags_parse_and_aliases():
    c = cfg("--dhsa-budget", "0.5", "--dhsa-boundary", "fixed", "--dhsa-chunk-min", "8",
            "--dhsa-chunk-max", "64", "--dhsa-chunk-avg", "16", "--dhsa-q-block", "32",
            "--dhsa-sink", "4", "--dhsa-local", "0", "--dhsa-dense-tail", "0",
            "--dhsa-min-context", "0", "--dhsa-layers", "all", "--dhsa-decode", "sparse")
    assert c.as_dict() == {"budget": 0.5, "boundary": "fixed", "chunk_min": 8, "chunk_max": 64,
                           "chunk_avg": 16, "q_block": 32, "sink_tokens": 4, "local_tokens": 0,
                           "dense_tail": 0, "min_context": 0, "layers": "all", "decode": "sparse"}
    c = cfg("--dhsa-sink-tokens", "7", "--dhsa-local-tokens", "9")
    assert (c.sink_tokens, c.local_tokens) == (7, 9)


@pytest.mark.parametrize("argv, flag", [
    (["--dhsa-budget", "abc"], "--dhsa-budget"),
    (["--dhsa-chunk-min", "1.5"], "--dhsa-chunk-min"),
    (["--dhsa-q-block", "x"], "--dhsa-q-block"),
    (["--dhsa-boundary", "magic"], "--dhsa-boundary"),
    (["--dhsa-layers", "some"], "--dhsa-layers"),
])
def test_argparse_type_errors_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as ei:
        parse(*argv)
    assert ei.value.code == 2
    assert flag in capsys.readouterr().err


# --- single-field rules -----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-0.1", "1.0001", "2", "nan", "inf", "1e-50"])
def test_budget_rejected(value):
    msg = err("--dhsa-budget", value)
    assert msg.startswith("--dhsa-budget")


@pytest.mark.parametrize("value, expect", [("1", 1.0), ("0.001", 0.001), ("0.3", 0.3)])
def test_budget_accepted(value, expect):
    assert cfg("--dhsa-budget", value).budget == expect


def test_boundary_learned_not_implemented():
    args = parse("--dhsa-boundary", "learned")  # accepted as a name by the parser
    assert args.dhsa_boundary == "learned"
    msg = err("--dhsa-boundary", "learned")
    assert "--dhsa-boundary" in msg and "not implemented yet" in msg
    with pytest.raises(DhsaParamError, match="not implemented yet"):
        DhsaConfig(boundary="learned")


def test_boundary_and_layers_case_insensitive():
    c = cfg("--dhsa-boundary", "FIXED", "--dhsa-layers", "All")
    assert (c.boundary, c.layers) == ("fixed", "all")


@pytest.mark.parametrize("flag", ["--dhsa-sink", "--dhsa-local", "--dhsa-dense-tail",
                                  "--dhsa-min-context"])
@pytest.mark.parametrize("value", ["-1", str((1 << 24) + 1), "99999999999"])
def test_token_counts_rejected(flag, value):
    msg = err(flag, value)
    assert msg.startswith(flag) and "between 0 and 16777216" in msg  # the C table's limit


@pytest.mark.parametrize("flag", ["--dhsa-sink", "--dhsa-local", "--dhsa-dense-tail",
                                  "--dhsa-min-context"])
def test_token_counts_limits_accepted(flag):
    cfg(flag, "0")
    cfg(flag, str(1 << 24))


@pytest.mark.parametrize("value", ["0", "-1", "4097", "100000"])
def test_q_block_rejected(value):
    msg = err("--dhsa-q-block", value)
    assert msg.startswith("--dhsa-q-block") and "between 1 and 4096" in msg


def test_q_block_limits_accepted():
    assert cfg("--dhsa-q-block", "1").q_block == 1
    assert cfg("--dhsa-q-block", "4096").q_block == 4096


def test_chunk_min_at_least_one():
    msg = err("--dhsa-chunk-min", "0")
    assert msg.startswith("--dhsa-chunk-min")


def test_chunk_sizes_absurd():
    assert err("--dhsa-chunk-max", str(1 << 21)).startswith("--dhsa-chunk-max")


# --- cross-field rules --------------------------------------------------------------------------

def test_chunk_min_le_avg():
    msg = err("--dhsa-chunk-min", "40", "--dhsa-chunk-max", "128")
    assert "chunk_min <= chunk_avg" in msg and "--dhsa-chunk-min=40" in msg
    assert "chunk_avg (built-in default)=32" in msg


def test_chunk_avg_le_max():
    msg = err("--dhsa-chunk-avg", "200", "--dhsa-chunk-max", "150")
    assert "chunk_avg <= chunk_max" in msg and "--dhsa-chunk-avg=200" in msg
    assert "--dhsa-chunk-max=150" in msg


def test_chunk_max_ge_twice_min():
    msg = err("--dhsa-chunk-min", "16", "--dhsa-chunk-avg", "20", "--dhsa-chunk-max", "24")
    assert "chunk_max >= 2*chunk_min" in msg and "--dhsa-chunk-max=24" in msg
    c = cfg("--dhsa-chunk-min", "16", "--dhsa-chunk-avg", "32", "--dhsa-chunk-max", "32")
    assert (c.chunk_min, c.chunk_avg, c.chunk_max) == (16, 32, 32)
    c = cfg("--dhsa-chunk-min", "1", "--dhsa-chunk-avg", "1", "--dhsa-chunk-max", "2")
    assert (c.chunk_min, c.chunk_avg, c.chunk_max) == (1, 1, 2)


def test_dataclass_validates():
    assert DhsaConfig(budget=1) .budget == 1.0
    for bad in [dict(budget=0), dict(chunk_min=0), dict(q_block=5000), dict(layers="x"),
                dict(chunk_avg=8), dict(sink_tokens=-1), dict(budget="0.3"), dict(q_block=True),
                dict(chunk_min=1.5)]:
        with pytest.raises(DhsaParamError):
            DhsaConfig(**bad)
    assert DhsaConfig(chunk_min=8.0).chunk_min == 8  # integral float is fine
    with pytest.raises(ValueError):  # DhsaParamError is a ValueError
        DhsaConfig(budget=2)


def test_config_from_values_unknown_name():
    with pytest.raises(DhsaParamError, match="unknown DHSA parameter"):
        config_from_values({"bugdet": 0.5})


# --- precedence ---------------------------------------------------------------------------------

def test_precedence_cli_over_file_over_default():
    file_values = dp.DhsaFileValues({"budget": 0.5, "q_block": 32, "layers": "all"}, arch="gemma3")
    c = cfg("--dhsa-budget", "0.7", file_values=file_values)
    assert c.budget == 0.7            # CLI beats file
    assert c.q_block == 32            # file beats default
    assert c.layers == "all"
    assert c.chunk_avg == 32          # default
    assert cfg(file_values={"q_block": 8}).q_block == 8  # plain dict works too


def test_file_value_error_names_gguf_key():
    fv = dp.DhsaFileValues({"budget": 3.0}, arch="gemma3", path="/x/m.gguf")
    msg = err(file_values=fv)
    assert msg.startswith("GGUF key gemma3.dhsa.budget in m.gguf")
    # the CLI can fix a bad file value
    assert cfg("--dhsa-budget", "0.2", file_values=fv).budget == 0.2
    # cross-field error mixing file and CLI values names both
    fv = dp.DhsaFileValues({"chunk_max": 40}, arch="gemma3")
    msg = err("--dhsa-chunk-min", "24", "--dhsa-chunk-avg", "30", file_values=fv)
    assert "GGUF key gemma3.dhsa.chunk_max=40" in msg and "--dhsa-chunk-min=24" in msg
    with pytest.raises(DhsaParamError, match="unknown DHSA parameter"):
        cfg(file_values={"nope": 1})


# --- GGUF reading -------------------------------------------------------------------------------

def write_gguf(path, kvs, arch="gemma3"):
    """kvs: {key: (value, GGUFValueType)}"""
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    for k, (v, t) in kvs.items():
        w.add_key_value(k, v, t)
    w.add_tensor("t", np.arange(6, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_read_gguf_dhsa_path_and_reader(tmp_path):
    T = gguf.GGUFValueType
    p = write_gguf(tmp_path / "m.gguf", {
        "gemma3.dhsa.budget": (0.3, T.FLOAT32),
        "gemma3.dhsa.boundary": ("fixed", T.STRING),
        "gemma3.dhsa.q_block": (32, T.UINT32),
        "gemma3.dhsa.sink_tokens": (4, T.INT64),        # other integer types accepted
        "gemma3.dhsa.unknown_future_key": (1, T.UINT32),  # ignored
        "llama.dhsa.budget": (0.9, T.FLOAT32),           # other arch: ignored
        "gemma3.context_length": (1024, T.UINT32),
    })
    want = {"budget": 0.3, "boundary": "fixed", "q_block": 32, "sink_tokens": 4}
    got = read_gguf_dhsa(p)
    assert got == want and got.arch == "gemma3" and got.path == str(p)
    assert isinstance(got["budget"], float) and got["budget"] == 0.3  # float32 -> 0.3 exactly
    assert read_gguf_dhsa(gguf.GGUFReader(p)) == want
    assert read_gguf_dhsa(p, arch="llama") == {"budget": 0.9}
    c = config_from_args(parse("--dhsa-q-block", "16"), got)
    assert (c.budget, c.boundary, c.q_block, c.sink_tokens, c.chunk_min) == (0.3, "fixed", 16, 4, 16)


def test_read_gguf_dhsa_no_keys(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", {})
    assert read_gguf_dhsa(p) == {}
    assert cfg(file_values=read_gguf_dhsa(p)) == DhsaConfig()


@pytest.mark.parametrize("key, value, vtype, match", [
    ("gemma3.dhsa.chunk_min", "16", "STRING", "has GGUF type STRING, expected UINT32"),
    ("gemma3.dhsa.budget", "0.3", "STRING", "has GGUF type STRING, expected FLOAT32"),
    ("gemma3.dhsa.layers", 1, "UINT32", "expected STRING"),
    ("gemma3.dhsa.budget", 1.5, "FLOAT32", "must be > 0 and <= 1"),
    ("gemma3.dhsa.q_block", 0, "UINT32", "between 1 and 4096"),
    ("gemma3.dhsa.boundary", "learned", "STRING", "not implemented yet"),
])
def test_read_gguf_dhsa_bad_values(tmp_path, key, value, vtype, match):
    p = write_gguf(tmp_path / "m.gguf", {key: (value, gguf.GGUFValueType[vtype])})
    with pytest.raises(DhsaParamError, match=match) as ei:
        read_gguf_dhsa(p)
    assert str(ei.value).startswith(f"GGUF key {key} in m.gguf")


def test_read_gguf_dhsa_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a gguf file")
    with pytest.raises(GgufFormatError, match="not a GGUF file"):
        read_gguf_dhsa(p)
    p.write_bytes(b"")
    with pytest.raises(GgufFormatError, match="empty"):
        read_gguf_dhsa(p)
    good = write_gguf(tmp_path / "g.gguf", {"gemma3.dhsa.budget": (0.5, gguf.GGUFValueType.FLOAT32)})
    data = good.read_bytes()
    p.write_bytes(data[:60])
    with pytest.raises(GgufFormatError, match="truncated"):
        read_gguf_dhsa(p)
    with pytest.raises(FileNotFoundError):
        read_gguf_dhsa(tmp_path / "missing.gguf")


def test_float32_round_trip_values():
    for v in [0.3, 0.1, 0.25, 1.0, 0.123456, 1e-7]:
        import struct
        f32 = struct.unpack("<f", struct.pack("<f", v))[0]
        assert dp.coerce_gguf_value("budget", 6, f32, "x") == v
    assert math.isclose(dp.coerce_gguf_value("budget", 12, 0.3, "x"), 0.3)


def test_python_view_is_the_c_table():
    """Every Python fact about a parameter comes from native/dhsa/dhsa-params.c, read through the C API."""
    from pydhsa._native import ffi, load
    lib = load()
    info = ffi.new("pydhsa_param_info *")
    assert lib.pydhsa_dhsa_param_count() == len(dp.PARAMS)
    for i, p in enumerate(dp.PARAMS):
        assert lib.pydhsa_dhsa_param_info(i, info) == 0
        assert ffi.string(info.name).decode() == p.name and ffi.string(info.help).decode() == p.help
        if p.kind == "str":
            choices = ffi.string(info.choices).decode().split(",")
            assert (list(p.choices), p.default) == (choices, choices[int(info.default_value)])
            assert list(p.implemented) == choices[:info.n_implemented]
        else:
            assert (p.default, p.lo, p.hi) == (info.default_value, info.lo, info.hi)
    assert lib.pydhsa_dhsa_param_info(len(dp.PARAMS), info) != 0


def test_c_api_defaults_are_the_table_defaults():
    from pydhsa._native import ffi, load
    params = ffi.new("pydhsa_session_params *")
    load().pydhsa_session_default_params(params)
    d, c = params.dhsa, DhsaConfig()
    assert not d.enabled
    assert (d.budget, dp.BOUNDARY_CHOICES[d.boundary]) == (pytest.approx(c.budget), c.boundary)
    assert (d.chunk_min, d.chunk_max, d.chunk_avg, d.q_block) == (c.chunk_min, c.chunk_max, c.chunk_avg, c.q_block)
    assert (d.sink_tokens, d.local_tokens, d.dense_tail, d.min_context) == \
        (c.sink_tokens, c.local_tokens, c.dense_tail, c.min_context)
    assert (d.all_layers, d.sparse_decode) == (c.layers == "all", c.decode == "sparse")


def test_reference_defaults_are_the_table_defaults():
    from pydhsa.reference import DhsaParams
    r, c = DhsaParams(), DhsaConfig()
    assert all(getattr(r, n) == getattr(c, n) for n in ("budget", "boundary", "chunk_min", "chunk_max", "chunk_avg",
                                                        "q_block", "sink_tokens", "local_tokens", "dense_tail"))


def test_python_copies_of_the_engine_constants_match_it():
    """Python keeps a few of the engine's fixed constants (the oracle mirrors the engine's segmenting, the op
    runner sizes buffers); they must equal the C definitions (ggml-dhsa.h, dhsa-select.h)."""
    from pydhsa import _native, op, reference
    lib = _native.load()
    assert lib.pydhsa_engine_constant(b"segment") == op.DHSA_SEGMENT == reference.ENGINE_SEGMENT
    assert lib.pydhsa_engine_constant(b"keysim_window") == reference.DhsaParams().window
    assert lib.pydhsa_engine_constant(b"no such constant") == -1
