"""The random-weight llama / qwen2 GGUFs of tests/random_gguf.py load and run in the engine."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from random_gguf import CHATML_TEMPLATE, build_vocab, write_random_model  # noqa: E402  (tests/ is on sys.path)

SHAPES = {"h14-2-d64": (14, 2, 64), "h32-8-d128": (32, 8, 128)}  # Qwen2.5 0.5B's attention, Llama's


@pytest.fixture(scope="module", params=[(a, s) for a in ("llama", "qwen2") for s in SHAPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def random_model(request, tmp_path_factory):
    from pydhsa import Model
    arch, shape = request.param
    n_head, n_head_kv, head_dim = SHAPES[shape]
    path = write_random_model(tmp_path_factory.mktemp("rg") / f"{arch}-{shape}.gguf", arch,
                              n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim)
    with Model(path) as m:
        yield arch, (n_head, n_head_kv, head_dim), m


def test_info(random_model):
    arch, (n_head, n_head_kv, head_dim), m = random_model
    i = m.info
    assert (i.architecture, i.n_head, i.n_head_kv, i.head_dim, i.n_layer) == (arch, n_head, n_head_kv, head_dim, 2)
    assert (i.n_embd, i.n_vocab, i.n_ctx_train, i.n_swa) == (n_head * head_dim, 512, 8192, 0)
    assert i.add_bos == (arch == "llama")
    assert m.meta("general.file_type") == "1"  # MOSTLY_F16
    assert m.meta("tokenizer.chat_template") == (CHATML_TEMPLATE if arch == "qwen2" else None)


def test_tokenizer(random_model):
    arch, _, m = random_model
    ids = m.tokenize("hello world")
    tokens, _, _, special = build_vocab(arch, 512)
    assert ids[0] == special["bos"] if arch == "llama" else ids[0] != special["bos"]
    assert m.detokenize(m.tokenize("hello world", add_special=False)) == "hello world"
    assert len(m.tokenize("hello world", add_special=False)) < len("hello world")  # merges apply
    assert m.detokenize(m.tokenize("héllo ✓\n", add_special=False)) == "héllo ✓\n"  # byte fallback
    if arch == "qwen2":
        assert m.tokenize("<|im_start|>user", add_special=False)[0] == tokens.index("<|im_start|>")


def test_prefill_generate(random_model):
    _, _, m = random_model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 500, 96).tolist() for _ in range(2)]
    prompts[1][-1] = prompts[0][-1]  # same last token, different context
    logits, texts = [], []
    for p in prompts:
        with m.session(n_ctx=256, n_threads=2) as s:
            s.prefill(p)
            lg = s.logits()
            assert lg.shape == (512,) and np.isfinite(lg).all() and 0.3 < lg.std() < 5
            texts.append("".join(s.generate(max_tokens=8, temperature=0)))
            t = s.timings()
            assert (t.n_generate, t.n_past) == (8, 104)  # no early EOS
        logits.append(lg)
    assert np.abs(logits[0] - logits[1]).max() > 0.05  # the context matters, not only the last token
    assert texts[0] and texts[0].isascii() and texts[0] != texts[1]
    assert len(set(texts[0])) > 1  # greedy decoding is not one repeated token


def test_generate_text_prompt(random_model):
    _, _, m = random_model
    with m.session(n_ctx=128, n_threads=2) as s:
        assert "".join(s.generate("hello", max_tokens=4, temperature=0))


def test_deterministic_and_options(tmp_path):
    a = write_random_model(tmp_path / "a.gguf", "qwen2", n_head=4, n_head_kv=2, head_dim=32, seed=3)
    b = write_random_model(tmp_path / "b.gguf", "qwen2", n_head=4, n_head_kv=2, head_dim=32, seed=3)
    c = write_random_model(tmp_path / "c.gguf", "qwen2", n_head=4, n_head_kv=2, head_dim=32, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    r = gguf.GGUFReader(a)
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with pytest.raises(ValueError, match="n_vocab"):
        write_random_model(tmp_path / "d.gguf", "llama", n_vocab=200)
    with pytest.raises(ValueError, match="qwen2 needs n_embd"):
        write_random_model(tmp_path / "e.gguf", "qwen2", n_embd=256)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0"])
def test_other_dtypes_and_narrow_llama(tmp_path, dtype):
    from pydhsa import Model
    # llama may have n_embd != n_head * head_dim (key_length carries the head size)
    p = write_random_model(tmp_path / "m.gguf", "llama", n_head=32, n_head_kv=8, head_dim=128, n_embd=256,
                           dtype=dtype)
    with Model(p) as m:
        assert (m.info.n_embd, m.info.head_dim, m.info.n_head) == (256, 128, 32)
        with m.session(n_ctx=128, n_threads=2) as s:
            s.prefill(list(range(1, 40)))
            assert np.isfinite(s.logits()).all()
            assert "".join(s.generate(max_tokens=4, temperature=0))
