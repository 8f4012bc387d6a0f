import json
import os
import re
from pathlib import Path

import pytest

from pydhsa import niah
from pydhsa.evals.store import ResultStore, case_key
from pydhsa.niah import NEEDLES, build_prompt, score

_TOK_RE = re.compile(r"\w+|[^\w\s]")
_CALLS = {"n": 0}


def fake_count(s: str) -> int:
    _CALLS["n"] += 1
    return len(_TOK_RE.findall(s))


def _haystack_dir() -> Path:
    env = os.environ.get("PYDHSA_HAYSTACK_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "niah" / "haystack"


HAYSTACK = _haystack_dir()


def test_the_haystack_is_there():
    """The project's data, as the models are: a missing haystack fails (it does not skip the NIAH tests)."""
    assert len(list(HAYSTACK.glob("*.txt"))) >= 10, f"no haystack essays at {HAYSTACK}"


def test_default_dir_follows_the_environment_then_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("PYDHSA_HAYSTACK_DIR", str(tmp_path))
    assert niah.default_haystack_dir().resolve() == tmp_path.resolve()
    monkeypatch.delenv("PYDHSA_HAYSTACK_DIR")
    expected = Path(__file__).resolve().parents[2] / "shared" / "data" / "niah" / "haystack"
    assert niah.default_haystack_dir().resolve() == expected.resolve()


def test_needles_well_formed():
    assert len(NEEDLES) >= 8
    assert len({n.expected for n in NEEDLES}) == len(NEEDLES)
    for n in NEEDLES:
        assert n.expected in n.sentence
        assert n.sentence.startswith(n.answer_prefix)
        assert n.sentence.isascii() and n.expected.isascii()
        assert n.question.endswith("?")
        # the needle sentence itself scores as correct when echoed after the prefix
        assert score(n.sentence[len(n.answer_prefix):], n.expected)


def _check_boundary(p):
    text, off, sent = p.text, p.needle_char_offset, p.needle.sentence
    assert text[off:off + len(sent)] == sent
    assert text.count(sent) == 1
    hay_start = len(niah.HEADER)
    if off == hay_start:  # very start of the haystack
        return
    before = text[hay_start:off]
    assert before.endswith(" "), repr(before[-40:])
    assert before.rstrip()[-1] in ".!?", repr(before[-40:])


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_depth_on_sentence_boundary(depth):
    needle = NEEDLES[0]
    p = build_prompt(fake_count, 4000, depth, needle)
    _check_boundary(p)
    assert p.depth == depth
    assert abs(p.actual_depth - depth) < 0.03, p.actual_depth
    if depth == 0.0:
        assert p.needle_char_offset == len(niah.HEADER)
        assert p.actual_depth == 0.0
    # token-based check of the needle position
    hay_start = len(niah.HEADER)
    end_hay = p.text.rindex("\n\nQuestion:")
    before = p.text[hay_start:p.needle_char_offset]
    after = p.text[p.needle_char_offset + len(needle.sentence):end_hay]
    tb, ta = len(_TOK_RE.findall(before)), len(_TOK_RE.findall(after))
    assert abs(tb / (tb + ta) - depth) < 0.03


def test_depth_one_is_last_boundary():
    p = build_prompt(fake_count, 1000, 1.0, NEEDLES[1])
    _check_boundary(p)
    end_hay = p.text.rindex("\n\nQuestion:")
    after = p.text[p.needle_char_offset + len(p.needle.sentence):end_hay]
    # no sentence boundary left after the needle
    assert not re.search(r"[.!?]\s", after)
    assert p.actual_depth > 0.95


@pytest.mark.parametrize("target", [1000, 4000, 16000])
@pytest.mark.parametrize("needle_idx", [0, 4, 8])
def test_prompt_length_within_1pct(target, needle_idx):
    needle = NEEDLES[needle_idx]
    _CALLS["n"] = 0
    p = build_prompt(fake_count, target, 0.5, needle)
    assert p.n_tokens == fake_count(p.text)
    assert abs(p.n_tokens - target) <= 0.01 * target
    assert p.n_tokens <= target  # prefers not to exceed the target
    assert p.target_tokens == target
    assert _CALLS["n"] <= 22 + 1  # <= 20 search calls + 2 for actual_depth (+1 above)
    assert p.count_calls <= 22
    assert p.expected == needle.expected


def test_prompt_structure():
    needle = NEEDLES[3]
    p = build_prompt(fake_count, 1000, 0.5, needle)
    assert p.text.startswith(niah.HEADER)
    assert p.text.endswith("\nAnswer: " + needle.answer_prefix)
    assert not p.text.endswith(" ")
    assert f"\n\nQuestion: {needle.question}\n" in p.text
    # haystack starts with the first essay in sorted order
    first = sorted(HAYSTACK.glob("*.txt"))[0].read_text(encoding="utf-8").strip()
    assert p.text[len(niah.HEADER):].startswith(first[:200])


def test_prompt_cycles_haystack():
    total = len(niah.load_haystack())
    # ~1.3x the whole haystack in tokens forces cycling
    hay_tokens = fake_count(niah.load_haystack())
    target = int(hay_tokens * 1.3)
    p = build_prompt(fake_count, target, 0.5, NEEDLES[2])
    assert abs(p.n_tokens - target) <= 0.01 * target
    assert p.haystack_chars > total


def test_bad_args():
    with pytest.raises(ValueError):
        build_prompt(fake_count, 1000, 1.5, NEEDLES[0])
    with pytest.raises(ValueError):
        build_prompt(fake_count, 10, 0.5, NEEDLES[0])


def test_env_haystack_dir(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("Second file. It has words! Does it?\n" * 50)
    (tmp_path / "a.txt").write_text("First file starts here. More text follows.\n" * 50)
    monkeypatch.setenv("PYDHSA_HAYSTACK_DIR", str(tmp_path))
    assert niah.default_haystack_dir() == tmp_path
    p = build_prompt(fake_count, 600, 0.5, NEEDLES[0])
    assert p.text[len(niah.HEADER):].startswith("First file starts here.")
    assert abs(p.n_tokens - 600) <= 6
    _check_boundary(p)


# ----------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "gen,expected,ok",
    [
        (" amber-falcon-42.", "amber-falcon-42", True),
        (" 'amber-falcon-42'.\n\nQuestion: something", "amber-falcon-42", True),
        (' "AMBER-FALCON-42"', "amber-falcon-42", True),
        (" \u2018amber-falcon-42\u2019!", "amber-falcon-42", True),
        ("  **XK-4471**", "XK-4471", True),
        (" xk-4471", "XK-4471", True),
        (" 7381924.", "7381924", True),
        (" 7381924, as stated in the text.", "7381924", True),
        (" Biscuit!", "Biscuit", True),
        (" smoked   paprika.", "smoked paprika", True),
        (" Smoked\tPaprika", "smoked paprika", True),
        (" 1847", "1847", True),
        # partial / longer numbers and words must fail
        (" 142", "42", False),
        (" 18470", "1847", False),
        (" 1847.5", "1847", False),
        (" 738192", "7381924", False),
        (" amber-falcon-421", "amber-falcon-42", False),
        (" amber-falcon", "amber-falcon-42", False),
        (" Biscuits", "Biscuit", False),
        (" paprika", "smoked paprika", False),
        (" paprika smoked", "smoked paprika", False),
        # wrong value
        (" amber-falcon-24", "amber-falcon-42", False),
        (" XK-4472", "XK-4471", False),
        (" Cracker.", "Biscuit", False),
        # empty output
        ("", "Biscuit", False),
        ("   \n  ", "Biscuit", False),
        # only the first answer span counts
        (" I don't know.\nBiscuit", "Biscuit", False),
        ("\n\n Biscuit\nother", "Biscuit", True),
        # empty expected never matches
        (" anything", "", False),
    ],
)
def test_score(gen, expected, ok):
    assert score(gen, expected) is ok


def test_score_all_needles():
    for n in NEEDLES:
        assert score(" " + n.expected + ".", n.expected)
        assert score(f' "{n.expected.upper()}"', n.expected)
        assert not score(" " + n.expected + "7", n.expected)
        assert not score(" nothing useful here", n.expected)


# ----------------------------------------------------------------- store


def test_case_key_stable():
    a = case_key({"depth": 0.1, "ctx": 4000, "needle": "x"})
    b = case_key({"needle": "x", "ctx": 4000, "depth": 0.1000000001})
    assert a == b
    assert a != case_key({"depth": 0.2, "ctx": 4000, "needle": "x"})


def test_result_store_resume(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    st = ResultStore(path, key_fields=["ctx", "depth", "needle"])
    cases = [
        {"ctx": c, "depth": d, "needle": "n0", "correct": bool(i % 2), "gen": "x"}
        for i, (c, d) in enumerate([(1000, 0.0), (1000, 0.5), (4000, 0.0), (4000, 0.5)])
    ]
    keys = [st.add(c) for c in cases[:3]]
    assert all(st.done(k) for k in keys)
    assert st.done({"ctx": 1000, "depth": 0.5, "needle": "n0"})
    assert not st.done(cases[3])

    # simulate an interruption in the middle of writing the 4th record
    line = json.dumps({**cases[3], "key": st.key_of(cases[3])})
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])

    st2 = ResultStore(path, key_fields=["ctx", "depth", "needle"])
    recs = st2.load()
    assert len(recs) == 3
    assert all(st2.done(k) for k in keys)
    assert not st2.done(cases[3])
    assert {r["ctx"] for r in recs} == {1000, 4000}
    # the torn line was removed; appending keeps the file well-formed
    st2.add(cases[3])
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    assert all(json.loads(l)["key"] for l in lines)
    st3 = ResultStore(path, key_fields=["ctx", "depth", "needle"])
    assert len(st3) == 4 and st3.done(cases[3])
    assert st3.get(cases[1])["correct"] is True


def test_result_store_missing_newline_and_garbage(tmp_path):
    path = tmp_path / "r.jsonl"
    st = ResultStore(path)
    k = st.add({"key": "a", "v": 1})
    assert k == "a"
    # complete last record lacking its newline is kept
    with open(path, "a") as f:
        f.write(json.dumps({"key": "b", "v": 2}))
    st2 = ResultStore(path)
    assert st2.done("a") and st2.done("b")
    assert path.read_text().endswith("\n")
    # last record wins for duplicate keys
    st2.add({"key": "a", "v": 3})
    assert ResultStore(path).get("a")["v"] == 3
    # empty file / missing file
    assert ResultStore(tmp_path / "none.jsonl").load() == []
    # a file holding only a torn line
    p2 = tmp_path / "torn.jsonl"
    p2.write_text('{"key": "x", "v"')
    st4 = ResultStore(p2)
    assert len(st4) == 0 and p2.read_text() == ""
    st4.add({"key": "y"})
    assert ResultStore(p2).done("y")
