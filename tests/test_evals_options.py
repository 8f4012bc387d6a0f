"""The eval commands' model, KV cache and chat-template options (pydhsa.evals): --model-name, -ctk/-ctv and
--chat, with a fake engine Model (no weights are loaded)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pydhsa import evals, niah
from pydhsa.evals import Method
from pydhsa.evals.speed import new_run_id
from pydhsa.evals.suites import resolve_model

HAYSTACK = Path(os.environ.get("PYDHSA_HAYSTACK_DIR") or
                Path(__file__).resolve().parents[2] / "shared" / "data" / "niah" / "haystack")

TEMPLATE = "{% chatml %}"


class FakeModel:
    """Stands in for pydhsa.api.Model: word tokens (BOS "<s>" added by add_special unless the text starts with it
    already: then a doubled BOS, as the engine would), a ChatML-like chat template, sessions that record their
    keyword arguments and answer with a fixed text."""

    sessions: list = []   # kwargs of every session opened, across instances
    prompts: list = []    # the text of every prompt generated from (tokens mapped back to words)
    metadata = {"general.name": "Tiny Chat Instruct", "tokenizer.chat_template": TEMPLATE}

    def __init__(self, path, n_gpu_layers=0):
        self.path = Path(path)
        self.info = SimpleNamespace(n_ctx_train=None, architecture="fake", description="fake", n_params=1,
                                    n_layer=1, n_swa=0)
        self.vocab: dict = {}
        self.chat_calls = []

    def meta(self, key):
        return self.metadata.get(key)

    def dhsa_file_values(self):
        return {}

    def tokenize(self, text, add_special=True):
        toks = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return ([self.vocab.setdefault("<s>", len(self.vocab))] if add_special else []) + toks

    def chat_prompt(self, messages, add_assistant=True):
        self.chat_calls.append(messages)
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"

    def session(self, **kwargs):
        FakeModel.sessions.append(kwargs)
        return FakeSession(self)

    def close(self):
        pass


class FakeSession:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def generate(self, tokens, **kwargs):
        words = {i: w for w, i in self.model.vocab.items()}
        FakeModel.prompts.append(" ".join(words.get(t, "?") for t in tokens))
        yield from (" the", " answer.\n")

    def timings(self):
        return SimpleNamespace(t_prefill_ms=1.0, t_generate_ms=1.0, n_generate=2, n_prefill=8, peak_rss_bytes=1,
                               prefill_tok_s=8e3, generate_tok_s=2e3)

    def dhsa_density(self):
        return None


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A GGUF-looking file whose Model is FakeModel."""
    import pydhsa.api
    monkeypatch.setattr(pydhsa.api, "Model", FakeModel)
    monkeypatch.setattr(FakeModel, "sessions", [])
    monkeypatch.setattr(FakeModel, "prompts", [])
    path = tmp_path / "tiny-chat-instruct.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 28)
    return path


def _niah_args(*argv):
    p = argparse.ArgumentParser()
    evals.add_niah_arguments(p)
    return p.parse_args(list(argv))


# ------------------------------------------------------------------------------------------------
# --model-name


def test_model_name_flag_and_file_plus_name_is_a_usage_error(capsys):
    from pydhsa.cli import build_parser, main
    parser = build_parser()
    for cmd in ("niah", "ruler", "bench"):
        args = parser.parse_args([cmd, "--model-name", "qwen2.5-coder-0.5b"])
        assert args.model_name == "qwen2.5-coder-0.5b" and args.model is None
        assert (args.cache_type_k, args.cache_type_v) == ("f16", "f16")
    assert parser.parse_args(["niah"]).chat == "auto"
    assert main(["niah", "--model-name", "nope"]) == 2
    capsys.readouterr()
    assert main(["niah", "-m", "x.gguf", "--model-name", "gemma3-270m", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not both" in err
    assert main(["bench", "-m", "x.gguf", "--model-name", "gemma3-270m", "-q"]) == 2
    assert main(["ruler", "-m", "x.gguf", "--model-name", "gemma3-270m", "-q"]) == 2


def test_model_name_resolves_through_the_registry(monkeypatch, fake_model):
    import pydhsa.models
    asked = []
    monkeypatch.setattr(pydhsa.models, "model_path", lambda name=None, quiet=False: asked.append(name) or fake_model)
    assert resolve_model(_niah_args("--model-name", "qwen2.5-coder-0.5b")) == (fake_model,
                                                                                      "qwen2.5-coder-0.5b")
    assert resolve_model(_niah_args()) == (fake_model, "gemma3-270m")  # the default embedded model
    assert resolve_model(_niah_args("-m", str(fake_model))) == (fake_model, None)
    assert asked == ["qwen2.5-coder-0.5b", "gemma3-270m"]


def test_bad_cache_type_fails_before_loading(fake_model, capsys):
    from pydhsa.cli import main
    assert main(["niah", "-m", str(fake_model), "-ctk", "q9_9", "-q"]) == 2
    assert "unknown KV cache type 'q9_9'" in capsys.readouterr().err
    assert FakeModel.sessions == []


# ------------------------------------------------------------------------------------------------
# -ctk / -ctv


def test_cache_types_reach_every_session_and_the_case_key(fake_model):
    size = fake_model.stat().st_size
    plain = evals.ModelRunner(fake_model, n_threads=1, chat="off")
    assert plain.model_id == f"{fake_model.name}:{size}"  # default ids stay as they were
    q8 = evals.ModelRunner(fake_model, n_threads=1, type_k="q8_0", type_v="q4_0", chat="off")
    assert q8.model_id == f"{fake_model.name}:{size}:ctk=q8_0,ctv=q4_0"
    q8.generate([1, 2, 3], Method("dense"), 4)
    assert FakeModel.sessions[-1]["type_k"] == "q8_0" and FakeModel.sessions[-1]["type_v"] == "q4_0"
    assert q8.describe()["type_k"] == "q8_0" and q8.describe()["chat_template"] is False
    assert evals.model_id(fake_model, 2, "q8_0", "f16", True) == \
        f"{fake_model.name}:{size}:ngl=2:ctk=q8_0,ctv=f16:chat"
    spec = evals.PromptSpec({"suite": "niah", "length": 100}, 1.0, build=None)
    store = evals.ResultStore(fake_model.parent / "c.jsonl")
    keys = {store.key_of(evals.case_fields(spec, Method("dense"), {}, r.model_id)) for r in (plain, q8)}
    assert len(keys) == 2


def test_speed_worker_sessions_get_the_cache_types(fake_model, monkeypatch):
    import pydhsa.niah
    monkeypatch.setattr(pydhsa.niah, "build_prompt", lambda count, target, depth, needle, hay:
                        SimpleNamespace(text="a b c d e f g h"))
    evals.speed_worker({"model_path": str(fake_model), "length": 128, "method": "dense", "n_gen": 2, "threads": 1,
                        "type_k": "q8_0", "type_v": "q8_0"})
    assert len(FakeModel.sessions) == 2  # the warm-up and the measured one
    assert all((s["type_k"], s["type_v"]) == ("q8_0", "q8_0") for s in FakeModel.sessions)


def test_speed_setup_keys_the_cache_types(tmp_path):
    from test_evals import _fake_spawn, _speed_args
    calls = []
    assert evals.run_speed(_speed_args(tmp_path, "--lengths", "1024", "--repeats", "1", "-ctk", "q8_0"),
                           spawn=_fake_spawn(calls)) == 0
    data = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert data["runs"][0]["setup"]["model"].endswith(":ctk=q8_0,ctv=f16")
    assert (data["meta"]["type_k"], data["meta"]["type_v"]) == ("q8_0", "f16")
    more = []  # f16 is another run, not a resumed one
    evals.run_speed(_speed_args(tmp_path, "--lengths", "1024", "--repeats", "1", "--resume"), spawn=_fake_spawn(more))
    assert len(more) == 2


# ------------------------------------------------------------------------------------------------
# --chat


@pytest.mark.parametrize("choice, name, file, meta, expected", [
    ("auto", "qwen2.5-coder-0.5b", "x.gguf", {}, True),           # the registry decides for embedded models
    ("auto", "gemma3-270m", "x.gguf", {"tokenizer.chat_template": TEMPLATE}, False),
    ("auto", None, "Qwen2.5-0.5B-Instruct-Q4.gguf", {"tokenizer.chat_template": TEMPLATE}, True),
    ("auto", None, "m.gguf", {"tokenizer.chat_template": TEMPLATE, "general.name": "Llama 3 8B Chat"}, True),
    ("auto", None, "m.gguf", {"tokenizer.chat_template": TEMPLATE, "general.name": "Gemma 3 270m"}, False),
    ("auto", None, "phi-instruct.gguf", {"general.name": "Phi Instruct"}, False),  # no template
    ("on", None, "base.gguf", {"tokenizer.chat_template": TEMPLATE}, True),
    ("off", "qwen2.5-coder-0.5b", "x.gguf", {"tokenizer.chat_template": TEMPLATE}, False),
])
def test_chat_auto_detection(choice, name, file, meta, expected):
    assert evals.chat_enabled(choice, name, file, meta.get) is expected


def test_chat_on_needs_a_template():
    with pytest.raises(ValueError, match="no chat template"):
        evals.chat_enabled("on", None, "base.gguf", {}.get)


def test_tokenize_prompt_wraps_with_as_chat_and_keeps_one_bos(fake_model):
    model = FakeModel(fake_model)
    text = "Some haystack.\n\nQuestion: What is it?\nAnswer: It is"
    assert evals.tokenize_prompt(model, text, chat=False) == model.tokenize(text)
    wrapped = niah.as_chat(text, model.chat_prompt)
    assert wrapped.endswith("<|im_start|>assistant\nIt is")
    assert model.chat_calls[-1] == [{"role": "user", "content": "Some haystack.\n\nQuestion: What is it?"}]
    assert evals.tokenize_prompt(model, text, chat=True) == model.tokenize(wrapped, add_special=True)
    # a template that writes the BOS itself is not given a second one
    model.chat_prompt = lambda messages: "<s> " + FakeModel.chat_prompt(model, messages)
    toks = evals.tokenize_prompt(model, text, chat=True)
    assert toks == model.tokenize(niah.as_chat(text, model.chat_prompt), add_special=False)
    assert toks.count(model.vocab["<s>"]) == 1


@pytest.mark.parametrize("suite", ["niah", "ruler"])
def test_chat_runs_are_recorded_and_stored_apart(fake_model, tmp_path, suite):
    out = tmp_path / "out"
    common = ["-m", str(fake_model), "--lengths", "300", "--methods", "dense", "--out", str(out), "-q", "--no-plots",
              "--haystack-dir", str(HAYSTACK), "-t", "1"]
    extra = ["--depths", "0.5"] if suite == "niah" else ["--tasks", "multikey", "--samples", "1"]
    parse = evals.add_niah_arguments if suite == "niah" else evals.add_ruler_arguments
    run = evals.run_niah if suite == "niah" else evals.run_ruler

    def go(*argv):
        p = argparse.ArgumentParser()
        parse(p)
        return run(p.parse_args(common + extra + list(argv)))

    go()  # auto: the file has a template and says instruct/chat
    recs = evals.ResultStore(out / "cases.jsonl").records()
    assert len(recs) == 1 and recs[0]["chat_template"] is True and recs[0]["model"].endswith(":chat")
    assert recs[0]["type_k"] == "f16" and 0.98 * 300 <= recs[0]["n_prompt"] <= 301  # the wrapped prompt fits
    # the user turn ends with the question, the assistant's turn starts with the answer prefix
    assert FakeModel.prompts[-1].startswith("<s> <|im_start|>user")
    assert "?<|im_end|> <|im_start|>assistant The" in FakeModel.prompts[-1]
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["model"]["chat_template"] is True and meta["args"]["chat"] == "auto"
    assert "chat template on" in (out / "summary.md").read_text()
    n_sessions = len(FakeModel.sessions)
    go("--chat", "on")  # same cases: resumed, nothing runs
    assert len(FakeModel.sessions) == n_sessions
    go("--chat", "off", "-ctk", "q8_0", "-ctv", "q8_0")  # other cases: they run, apart
    recs = evals.ResultStore(out / "cases.jsonl").records()
    assert len(recs) == 2 and FakeModel.sessions[-1]["type_k"] == "q8_0"
    off = next(r for r in recs if not r["chat_template"])
    assert off["model"].endswith(":ctk=q8_0,ctv=q8_0") and 0.98 * 300 <= off["n_prompt"] <= 300
    assert "<|im_start|>" not in FakeModel.prompts[-1] and "Answer: The" in FakeModel.prompts[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["meta"]["model"]["chat_template"] is False  # this run's cases only


def test_new_run_ids_never_reuse_one_in_the_store():
    first = new_run_id(set())
    second = new_run_id({first})
    assert second != first and second.startswith(first[:8])
    assert new_run_id({first, second}) not in {first, second}
