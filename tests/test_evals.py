"""The evaluation suites (pydhsa.evals): methods, case order, resumption, summaries, plots, the RULER
generators and the speed summary, with a fake model runner (no engine); one tiny real-model run."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path

import pytest

from pydhsa import evals, niah
from pydhsa.evals import Generation, Method, parse_methods

_TOK_RE = re.compile(r"\w+|[^\w\s]")


def fake_count(text: str) -> int:
    return len(_TOK_RE.findall(text))


HAYSTACK = Path(os.environ.get("PYDHSA_HAYSTACK_DIR") or
                Path(__file__).resolve().parents[2] / "shared" / "data" / "niah" / "haystack")


class FakeRunner:
    """Word-level tokenizer and an 'oracle' model: it answers a NIAH question by finding the needle
    sentence in the prompt; methods listed in ``miss`` always answer wrongly."""

    model_id = "fake.gguf:1"
    model_path = Path("fake.gguf")
    n_ctx_train = None
    n_threads = 1
    n_gpu_layers = 0
    type_k = type_v = "f16"
    chat = False
    chat_overhead = 0
    overrides: dict = {}

    def __init__(self, miss=(), fail_after=None, fail_with=KeyboardInterrupt, errors_on=()):
        self.calls = []            # (prompt text, method label) per generate call
        self.token_lists = []      # the token list objects generate received
        self.tokenize_calls = 0
        self.texts = {}
        self.miss = set(miss)
        self.fail_after, self.fail_with = fail_after, fail_with
        self.errors_on = set(errors_on)

    def tokenize(self, text):
        self.tokenize_calls += 1
        toks = [hash(w) & 0xFFFF for w in _TOK_RE.findall(text)]
        self.texts[tuple(toks)] = text
        return toks

    def generate(self, tokens, method, max_tokens, stop=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise self.fail_with("simulated interruption")
        text = self.texts[tuple(tokens)]
        self.calls.append((text, method.label))
        self.token_lists.append(tokens)
        if method.label in self.errors_on:
            raise RuntimeError("simulated engine error")
        answer = " I do not know.\nQuestion:"
        prefix = text.rsplit("Answer: ", 1)[-1]
        m = re.search(re.escape(prefix) + r"\s*(.*?)\.(\s|$)", text[:-len(prefix)])
        if m and method.label not in self.miss:
            answer = " " + m.group(1) + ".\nQuestion: more"
        if stop is not None:  # emulate streaming with the early stop
            out = ""
            for piece in re.findall(r"\n|[^\S\n]*\S+|[^\S\n]+", answer):
                out += piece
                if stop(out):
                    break
            answer = out
        return Generation(text=answer, n_prompt=len(tokens), t_prefill_ms=len(tokens) / 10.0, t_generate_ms=5.0,
                          n_generate=3, ttft_ms=1.0, wall_ms=2.0, peak_rss_bytes=1 << 20,
                          density=None if method.kind == "dense" else method.budget)


# ------------------------------------------------------------------------------------------------
# methods, lengths, depths, overrides


def test_parse_methods_forms_and_order():
    ms = parse_methods("dense, dhsa:0.3,fixed@0.1, keysim:0.5 ,block:0.2,dhsa,DHSA:0.30")
    assert [m.label for m in ms] == ["dense", "dhsa@0.3", "fixed@0.1", "dhsa@0.5", "fixed@0.2"]
    assert ms[1] == Method("dhsa", 0.3) and ms[1].boundary == "keysim" and ms[2].boundary == "fixed"
    assert parse_methods(["dense"]) == [Method("dense")]
    default = parse_methods("default")
    assert [m.label for m in default] == ["dense", "dhsa@0.1", "dhsa@0.2", "dhsa@0.3", "dhsa@0.5",
                                          "fixed@0.1", "fixed@0.2", "fixed@0.3", "fixed@0.5"]
    assert parse_methods(evals.DEFAULT_METHODS) == default


@pytest.mark.parametrize("bad", ["foo", "dhsa:0", "dhsa:1.5", "dhsa:x", "dense:0.3", "", " , ", "dhsa:nan"])
def test_parse_methods_rejects(bad):
    with pytest.raises(ValueError):
        parse_methods(bad)


def test_method_config_and_ids():
    from pydhsa.dhsa_params import DhsaConfig
    assert Method("dense").config({"budget": 0.5}, {"min_context": 0}) is None
    cfg = Method("fixed", 0.2).config({"budget": 0.9, "chunk_avg": 64}, {"min_context": 0})
    assert isinstance(cfg, DhsaConfig)
    assert (cfg.budget, cfg.boundary, cfg.chunk_avg, cfg.min_context) == (0.2, "fixed", 64, 0)
    assert Method("dhsa", 0.3).config().boundary == "keysim"
    assert Method("dhsa", 0.3).method_id({"min_context": 0}) == "dhsa@0.3[min_context=0]"
    assert Method("dense").method_id({"min_context": 0}) == "dense"
    assert Method("dhsa", 0.3).method_id({}) == "dhsa@0.3"


def test_parse_lengths_depths_overrides():
    assert evals.parse_lengths("4k, 2048,2k,32K") == [2048, 4096, 32768]
    assert evals.parse_depths("0,50%,0.1,1") == [0.0, 0.1, 0.5, 1.0]
    assert evals.parse_depths(",".join(f"{d:g}" for d in evals.DEFAULT_DEPTHS)) == list(evals.DEFAULT_DEPTHS)
    for bad in ("1.5", "x", ""):
        with pytest.raises(ValueError):
            evals.parse_depths(bad)
    for bad in ("2x", "10", ""):
        with pytest.raises(ValueError):
            evals.parse_lengths(bad)
    assert evals.parse_overrides(0, ["chunk_avg=64", "layers=all"]) == {"min_context": 0, "chunk_avg": 64,
                                                                       "layers": "all"}
    for bad in (["budget=0.3"], ["nope=1"], ["chunk_avg"], ["chunk_avg=x"]):
        with pytest.raises(ValueError):
            evals.parse_overrides(None, bad)


# ------------------------------------------------------------------------------------------------
# case enumeration and order


def test_niah_case_order_and_needle_rotation():
    specs = evals.niah_specs([4096, 2048], [0.5, 0.0, 1.0], needles_per_cell=1)
    assert [(s.fields["length"], s.fields["depth"]) for s in specs] == [
        (2048, 0.0), (2048, 0.5), (2048, 1.0), (4096, 0.0), (4096, 0.5), (4096, 1.0)]
    methods = parse_methods("dense,dhsa:0.3,fixed:0.3")
    cases = evals.grid_cases(specs, methods)
    assert len(cases) == 18
    # every prompt with all methods before the next prompt
    assert [c[0] for c in cases] == [s for s in specs for _ in methods]
    assert [c[1] for c in cases[:3]] == methods
    # the needle of a cell does not depend on the rest of the grid
    alone = evals.niah_specs([4096], [0.5])[0]
    assert alone.fields["needle"] == specs[4].fields["needle"]
    # a length column of the default grid uses (nearly) every needle; lengths start at different needles
    full = evals.niah_specs(evals.DEFAULT_LENGTHS, evals.DEFAULT_DEPTHS)
    for L in evals.DEFAULT_LENGTHS:
        assert len({s.fields["needle"] for s in full if s.fields["length"] == L}) == len(niah.NEEDLES)
    assert len({s.fields["needle"] for s in full if s.fields["depth"] == 0.5}) >= 3
    assert len(evals.niah_specs([2048], [0.5], needles_per_cell=3)) == 3


def test_target_is_clamped_to_the_training_context():
    spec = evals.niah_specs([32768], [0.5], n_ctx_train=32768)[0]
    assert spec.weight == 32768 - evals.NIAH_MAX_TOKENS - evals.CTX_MARGIN
    assert evals.niah_specs([4096], [0.5], n_ctx_train=32768)[0].weight == 4096


def test_ruler_case_order():
    specs = evals.ruler_specs(["vartrack", "multikey"], [2048, 1024], 2)
    assert [(s.fields["length"], s.fields["task"], s.fields["sample"]) for s in specs] == [
        (1024, "vartrack", 0), (1024, "vartrack", 1), (1024, "multikey", 0), (1024, "multikey", 1),
        (2048, "vartrack", 0), (2048, "vartrack", 1), (2048, "multikey", 0), (2048, "multikey", 1)]
    with pytest.raises(ValueError):
        evals.ruler_specs(["nope"], [1024], 1)


# ------------------------------------------------------------------------------------------------
# the grid runner: build once, resume, errors


def _counting_specs(specs):
    builds = []
    for s in specs:
        inner = s.build

        def build(runner, inner=inner, s=s):
            builds.append(s.fields)
            return inner(runner)
        s.build = build
    return specs, builds


def test_run_grid_builds_each_prompt_once_and_scores(tmp_path):
    specs, builds = _counting_specs(evals.niah_specs([400, 600], [0.0, 0.5, 1.0], haystack_dir=HAYSTACK))
    methods = parse_methods("dense,dhsa:0.3,fixed:0.3")
    runner = FakeRunner(miss={"fixed@0.3"})
    store = evals.ResultStore(tmp_path / "cases.jsonl")
    counts = evals.run_grid(specs, methods, runner, store, progress=False)
    assert counts == {"run": 18, "skipped": 0, "errors": 0, "total": 18}
    assert len(builds) == 6
    # methods ran in order on one token list per prompt (tokenized once, not per method)
    assert [c[1] for c in runner.calls] == [m.label for _ in specs for m in methods]
    for i in range(0, 18, 3):
        assert runner.token_lists[i] is runner.token_lists[i + 1] is runner.token_lists[i + 2]
    recs = store.records()
    assert len(recs) == 18
    by_method = {m.label: [r for r in recs if r["method"] == m.label] for m in methods}
    assert all(r["correct"] for r in by_method["dense"] + by_method["dhsa@0.3"])
    assert not any(r["correct"] for r in by_method["fixed@0.3"])
    r = by_method["dense"][0]
    assert r["n_prompt"] <= r["length"] and r["n_prompt"] >= 0.99 * r["length"]
    assert r["answer"] and "\n" not in r["generated"].strip()  # the early stop ended the answer line
    assert r["expected"] == [niah.NEEDLES[[n.name for n in niah.NEEDLES].index(r["needle"])].expected]


def test_resume_after_interruption_skips_finished_cases(tmp_path):
    path = tmp_path / "cases.jsonl"
    methods = parse_methods("dense,dhsa:0.3")
    make = lambda: evals.niah_specs([300, 500], [0.2, 0.8], haystack_dir=HAYSTACK)  # noqa: E731

    first = FakeRunner(fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        evals.run_grid(make(), methods, first, evals.ResultStore(path), progress=False)
    assert len(first.calls) == 5 and len(evals.ResultStore(path).records()) == 5

    second = FakeRunner()
    specs, builds = _counting_specs(make())
    counts = evals.run_grid(specs, methods, second, evals.ResultStore(path), progress=False)
    assert len(second.calls) == 3 and counts["run"] == 3 and counts["skipped"] == 5
    assert len(builds) == 2  # the prompt of the interrupted pair (one method left) and the last one
    assert set(second.calls) & set(first.calls) == set()

    third = FakeRunner()
    specs, builds = _counting_specs(make())
    counts = evals.run_grid(specs, methods, third, evals.ResultStore(path), progress=False)
    assert third.calls == [] and builds == [] and counts["skipped"] == 8
    assert len(evals.ResultStore(path).records()) == 8

    # other overrides are other cases (the dense ones are shared)
    fourth = FakeRunner()
    evals.run_grid(make(), methods, fourth, evals.ResultStore(path), overrides={"min_context": 0}, progress=False)
    assert [c[1] for c in fourth.calls] == ["dhsa@0.3"] * 4


def test_failed_cases_are_recorded_and_retried(tmp_path):
    path = tmp_path / "cases.jsonl"
    methods = parse_methods("dense,fixed:0.5")
    specs = evals.niah_specs([300], [0.5], haystack_dir=HAYSTACK)
    counts = evals.run_grid(specs, methods, FakeRunner(errors_on={"fixed@0.5"}), evals.ResultStore(path),
                            progress=False)
    assert counts["errors"] == 1 and counts["run"] == 1
    assert [r for r in evals.ResultStore(path).records() if r.get("error")]
    retry = FakeRunner()
    counts = evals.run_grid(specs, methods, retry, evals.ResultStore(path), progress=False)
    assert [c[1] for c in retry.calls] == ["fixed@0.5"] and counts["errors"] == 0
    assert not any(r.get("error") for r in evals.ResultStore(path).records())


def test_progress_bar_eta():
    now = [100.0]
    out = io.StringIO()
    bar = evals.Progress(4, 400.0, title="t", stream=out, clock=lambda: now[0])
    assert bar.eta() is None
    now[0] += 10.0
    bar.advance(100.0, "first")
    assert bar.eta() == pytest.approx(30.0)   # 10 s per 100 units, 300 left
    now[0] += 30.0
    bar.advance(200.0)
    assert bar.eta() == pytest.approx(100 / 300 * 40)
    text = out.getvalue()
    assert "1/4" in text and "2/4" in text and "ETA 00:30" in text and "first" in text
    bar.close()


# ------------------------------------------------------------------------------------------------
# summaries and plots


def _rec(method, length, depth, correct, kind=None, budget=None, error=None):
    kind = kind or ("dense" if method == "dense" else method.split("@")[0])
    r = {"method": method, "kind": kind, "budget": budget, "length": length, "depth": depth, "correct": correct,
         "recall": 1.0 if correct else 0.0, "n_prompt": length, "t_prefill_ms": length / 2.0,
         "density": None if kind == "dense" else 0.4}
    if error:
        r = {**r, "error": error}
    return r


def _fake_records():
    recs = []
    for L in (1024, 2048):
        for d in (0.0, 0.5, 1.0):
            recs.append(_rec("dense", L, d, True))
            recs.append(_rec("dhsa@0.3", L, d, not (L == 2048 and d == 0.5), budget=0.3))
            recs.append(_rec("fixed@0.3", L, d, d == 0.0, budget=0.3))
    recs.append(_rec("fixed@0.3", 2048, 0.5, False, budget=0.3, error="RuntimeError('x')"))
    return recs


def test_summary_arithmetic():
    s = evals.summarize(_fake_records(), row_field="depth")
    assert s["methods"] == ["dense", "dhsa@0.3", "fixed@0.3"]
    assert s["lengths"] == [1024, 2048]
    assert s["errors"] == 1 and s["n_cases"] == 18
    assert s["accuracy"]["dense"] == {"1024": 1.0, "2048": 1.0}
    assert s["accuracy"]["dhsa@0.3"]["2048"] == pytest.approx(2 / 3)
    assert s["correct"]["dhsa@0.3"]["2048"] == 2 and s["count"]["dhsa@0.3"]["2048"] == 3
    assert s["overall"]["dhsa@0.3"] == pytest.approx(5 / 6)
    assert s["overall"]["fixed@0.3"] == pytest.approx(2 / 6)
    assert s["grid"]["dhsa@0.3"]["0.5"] == {"1024": 1.0, "2048": 0.0}
    assert s["prefill_tok_s"]["dense"]["1024"] == pytest.approx(2000.0)
    assert s["density"]["dense"]["1024"] is None and s["density"]["fixed@0.3"]["2048"] == pytest.approx(0.4)
    md = evals.summary_markdown(s, "t")
    assert "| dhsa@0.3 | 100.0 (3/3) | 66.7 (2/3) | 83.3 |" in md
    assert "| fixed@0.3 | 33.3 (1/3) | 33.3 (1/3) | 33.3 |" in md


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmaps_written(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs it: a missing plotter is a failure)
    meta = {"model": {"file": "fake.gguf"}}
    s = evals.write_summary(tmp_path, _fake_records(), meta, "niah")
    for name in ("heatmap-dense.png", "heatmap-dhsa_0.3.png", "heatmap-fixed_0.3.png", "heatmaps.png"):
        assert _png(tmp_path / name), name
    assert set(s["plots"]) >= {"heatmaps.png", "heatmap-dense.png"}
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["accuracy"]["fixed@0.3"]["1024"] == pytest.approx(1 / 3)
    assert "| dense | 100.0 (3/3) | 100.0 (3/3) | 100.0 |" in (tmp_path / "summary.md").read_text()


def test_ruler_plots_written(tmp_path):
    import matplotlib  # noqa: F401  (the test extra installs it: a missing plotter is a failure)
    recs = [{**_rec(m, L, None, ok, budget=b), "task": t}
            for t in ("multikey", "vartrack") for L in (1024, 2048)
            for m, b, ok in (("dense", None, True), ("dhsa@0.3[min_context=0]", 0.3, L == 1024))]
    s = evals.write_summary(tmp_path, recs, {}, "ruler")
    assert s["grid"]["dhsa@0.3[min_context=0]"]["vartrack"] == {"1024": 1.0, "2048": 0.0}
    assert s["recall_grid"]["dense"]["multikey"] == {"1024": 1.0, "2048": 1.0}
    assert _png(tmp_path / "ruler-accuracy.png") and _png(tmp_path / "ruler-dense.png")
    assert _png(tmp_path / "ruler-dhsa_0.3_min_context_0.png")
    assert "| vartrack | dense | 100.0 | 100.0 |" in (tmp_path / "summary.md").read_text()


# ------------------------------------------------------------------------------------------------
# RULER generators


@pytest.mark.parametrize("task", evals.RULER_TASKS)
def test_ruler_generator_deterministic_and_length(task):
    a = evals.ruler_sample(task, fake_count, 2000, seed=7, sample=1, haystack_dir=HAYSTACK)
    b = evals.ruler_sample(task, fake_count, 2000, seed=7, sample=1, haystack_dir=HAYSTACK)
    c = evals.ruler_sample(task, fake_count, 2000, seed=8, sample=1, haystack_dir=HAYSTACK)
    d = evals.ruler_sample(task, fake_count, 2000, seed=7, sample=2, haystack_dir=HAYSTACK)
    assert a == b
    assert a.expected != c.expected and a.expected != d.expected
    for target in (500, 2000, 9000):
        s = evals.ruler_sample(task, fake_count, target, seed=3, haystack_dir=HAYSTACK)
        assert 0.99 * target <= s.n_tokens <= target, (target, s.n_tokens)
        assert fake_count(s.text) == s.n_tokens
        for sentence in s.inserts:
            assert s.text.count(sentence) == 1


def test_ruler_multikey_answer():
    s = evals.ruler_sample("multikey", fake_count, 1500, seed=1, haystack_dir=HAYSTACK, n_keys=5)
    pairs = dict(re.match(r"One of the special magic numbers for (\S+) is: (\d+)\.$", x).groups() for x in s.inserts)
    assert len(pairs) == 5 and len(set(pairs.values())) == 5
    asked = re.search(r"special magic number for (\S+) mentioned in the provided text\?", s.text).group(1)
    assert s.expected == [pairs[asked]] and s.scoring == "first_line"
    assert s.text.endswith(f"Answer: The special magic number for {asked} mentioned in the provided text is")


def test_ruler_multivalue_answer():
    s = evals.ruler_sample("multivalue", fake_count, 1500, seed=2, haystack_dir=HAYSTACK, n_values=3)
    found = [re.match(r"One of the special magic numbers for (\S+) is: (\d+)\.$", x).groups() for x in s.inserts]
    assert len({k for k, _ in found}) == 1 and len(found) == 3
    assert sorted(s.expected) == sorted(v for _, v in found) and s.scoring == "all"
    assert f"all the special magic numbers for {found[0][0]}" in s.text


def test_ruler_vartrack_answer_and_chain_order():
    s = evals.ruler_sample("vartrack", fake_count, 3000, seed=5, haystack_dir=HAYSTACK, n_hops=3, n_chains=2)
    assert len(s.inserts) == 8
    value = re.search(r"assigned the value (\d+) in the text above", s.text).group(1)
    # follow the assignments in text order
    holds = {}
    for x in s.inserts:
        m = re.match(r"VAR (\w+) = (?:VAR (\w+)|(\d+))\.$", x)
        holds[m.group(1)] = holds[m.group(2)] if m.group(2) else m.group(3)
    assert sorted(k for k, v in holds.items() if v == value) == sorted(s.expected)
    assert len(s.expected) == 4
    positions = [s.text.index(f"VAR {name} =") for name in s.expected]
    assert positions == sorted(positions)  # each chain reads in order
    assert "4 variables are assigned the value" in s.text


def test_scoring_helpers():
    assert evals.score_all(" 123, 456 and\n789", ["123", "789", "456"]) == (True, 1.0)
    ok, frac = evals.score_all("1234, 456", ["123", "456"])
    assert not ok and frac == 0.5
    p = evals.Prompt("", [], ["42"], "first_line", 8)
    assert evals.score_prompt(p, " 42.\nQuestion") == (True, 1.0)
    assert evals.score_prompt(p, "\n\n43\n42") == (False, 0.0)
    stop = evals.stop_rule(p)
    assert not stop("\n\n 42") and stop(" 42.\n")
    stop_all = evals.stop_rule(evals.Prompt("", [], ["AB", "CD"], "all", 8))
    assert not stop_all(" AB,\n") and stop_all(" AB,\nCD")


# ------------------------------------------------------------------------------------------------
# speed


def _speed_args(tmp_path, *argv):
    p = argparse.ArgumentParser()
    evals.add_speed_arguments(p)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 28)
    return p.parse_args(["-m", str(model), "--out", str(tmp_path / "out"), "-t", "2", "-q", *argv])


def _fake_spawn(calls):
    def spawn(cfg):
        calls.append((cfg["length"], cfg["method"]))
        L, dense = cfg["length"], cfg["method"] == "dense"
        prefill = L / (100.0 if dense else 150.0) * 1e3
        return {"length": L, "method": cfg["method"], "n_prompt": L - 80, "t_prefill_ms": prefill,
                "prefill_tok_s": L / prefill * 1e3, "ttft_ms": prefill + 10, "decode_tok_s": 20.0 if dense else 25.0,
                "peak_rss_bytes": (400 if dense else 380) << 20, "density": None if dense else 0.35,
                "t_generate_ms": 100.0, "n_generate": 2}
    return spawn


def test_speed_suite_with_a_fake_worker(tmp_path):
    calls = []
    args = _speed_args(tmp_path, "--lengths", "2048,1024", "--methods", "dhsa:0.3", "--repeats", "2")
    assert evals.run_speed(args, spawn=_fake_spawn(calls)) == 0
    # dense is added for the ratios; methods interleave inside each repeat; lengths ascend
    assert calls == [(1024, "dense"), (1024, "dhsa@0.3")] * 2 + [(2048, "dense"), (2048, "dhsa@0.3")] * 2
    out = tmp_path / "out"
    data = json.loads((out / "speed.json").read_text())
    row = next(r for r in data["rows"] if r["method"] == "dhsa@0.3" and r["length"] == 2048)
    assert row["prefill_speedup"] == pytest.approx(1.5)
    assert row["decode_speedup"] == pytest.approx(1.25)
    assert row["rss_ratio"] == pytest.approx(380 / 400)
    assert row["repeats"] == 2
    assert data["meta"]["threads"] == 2 and "system_info" in data["meta"] and "machine" in data["meta"]
    assert "| 2048 | dhsa@0.3 |" in (out / "speed.md").read_text()
    assert _png(out / "speed.png")
    # --resume continues the same run: nothing left to do
    more = []
    evals.run_speed(_speed_args(tmp_path, "--lengths", "2048,1024", "--methods", "dhsa:0.3", "--repeats", "2",
                                "--resume"), spawn=_fake_spawn(more))
    assert more == []



def test_speed_summary_medians():
    runs = [{"length": 4096, "method": m, "n_prompt": 4000, "t_prefill_ms": t, "prefill_tok_s": 4000 / t * 1e3,
             "ttft_ms": t + 5, "decode_tok_s": d, "peak_rss_bytes": 100}
            for m, t, d in (("dense", 10.0, 10.0), ("dense", 30.0, 12.0), ("dense", 20.0, 11.0),
                            ("dhsa@0.3", 5.0, 20.0), ("dhsa@0.3", 50.0, 22.0), ("dhsa@0.3", 10.0, 21.0))]
    rows = evals.summarize_speed(runs, ["dense", "dhsa@0.3"], [4096])
    d = next(r for r in rows if r["method"] == "dhsa@0.3")
    assert d["t_prefill_ms"] == 10.0 and d["prefill_speedup"] == pytest.approx(2.0)
    assert d["decode_speedup"] == pytest.approx(21.0 / 11.0)
    assert "prefill_speedup" not in next(r for r in rows if r["method"] == "dense")


@pytest.mark.parametrize("suite", ["niah", "ruler"])
def test_suite_driver_quick_with_a_fake_runner(tmp_path, suite):
    p = argparse.ArgumentParser()
    (evals.add_niah_arguments if suite == "niah" else evals.add_ruler_arguments)(p)
    args = p.parse_args(["--quick", "--out", str(tmp_path), "-q", "--no-plots", "--lengths", "300,600",
                         "--haystack-dir", str(HAYSTACK)])
    run = evals.run_niah if suite == "niah" else evals.run_ruler
    runner = FakeRunner()
    assert run(args, runner=runner) == 0
    n = 2 * 3 * 2  # lengths x (depths | tasks) x methods of --quick (the explicit --lengths wins)
    assert len(runner.calls) == n and args.methods == "dense,dhsa:0.3"
    assert len(evals.ResultStore(tmp_path / "cases.jsonl").records()) == n
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lengths"] == [300, 600] and summary["n_cases"] == n
    assert (tmp_path / "summary.md").exists() and (tmp_path / "meta.json").exists()
    if suite == "niah":
        assert summary["overall"]["dense"] == 1.0 and summary["rows"]["values"] == [0.1, 0.5, 0.9]
    again = FakeRunner()
    assert run(args, runner=again) == 0 and again.calls == []


# ------------------------------------------------------------------------------------------------
# command line


def test_cli_has_the_eval_commands():
    from pydhsa.cli import build_parser, main
    parser = build_parser()
    args = parser.parse_args(["niah", "--methods", "dense,dhsa:0.3", "--lengths", "1024", "--depths", "0.5"])
    assert args.handler is evals.run_niah
    assert parser.parse_args(["bench", "--repeats", "5"]).repeats == 5
    assert parser.parse_args(["ruler", "--tasks", "multikey"]).handler is evals.run_ruler
    assert main(["niah", "--methods", "nope"]) == 2
    assert main(["bench", "--lengths", "1x"]) == 2


@pytest.mark.model
def test_tiny_real_niah_run(model_path, tmp_path):
    """A 200-token NIAH grid on the real model, dense and DHSA (min_context 0 so that it engages)."""
    p = argparse.ArgumentParser()
    evals.add_niah_arguments(p)
    args = p.parse_args(["-m", str(model_path), "--lengths", "200", "--depths", "0.5", "--methods",
                         "dense,dhsa:0.5", "--dhsa-min-context", "0", "--out", str(tmp_path), "-q", "--no-plots",
                         "-t", "2"])
    assert evals.run_niah(args) in (0, 1)
    recs = evals.ResultStore(tmp_path / "cases.jsonl").records()
    assert sorted(r["method"] for r in recs) == ["dense", "dhsa@0.5[min_context=0]"]
    assert all(not r.get("error") and r["n_prompt"] <= 200 for r in recs)
    dhsa = next(r for r in recs if r["kind"] == "dhsa")
    assert dhsa["dhsa_config"]["min_context"] == 0 and dhsa["dhsa_config"]["budget"] == 0.5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["meta"]["model"]["file"] == Path(model_path).name and summary["meta"]["system_info"]
