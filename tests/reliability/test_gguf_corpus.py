"""The malformed-GGUF corpus, CI's share: every tool refuses a damaged file with one `pydhsa: error:` line and
exit status 2 (or accepts it), never a signal, a traceback or a changed input. The full corpus (all truncation
points, more random cases, Gemma's whole header) is `python tests/reliability/run_corpus.py`."""
from __future__ import annotations

from collections import Counter

import pytest

from gguf_corpus import GgufLayoutMap, malformed_cases
from harness import judge, run_corpus, run_forked

KINDS = {"truncate", "flip", "random", "absurd", "type", "duplicate", "utf8", "dhsa"}


def defects_report(outcomes) -> str:
    return "\n".join(f"{o.case} / {o.tool}: {o.verdict} ({o.detail})" for o in outcomes if o.defect)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from random_gguf import write_random_model
    path = write_random_model(tmp_path_factory.mktemp("corpus") / "tiny-qwen2.gguf", "qwen2", n_layer=2, n_head=4,
                              n_head_kv=2, head_dim=32, n_ff=64, n_vocab=320)
    return GgufLayoutMap.read(path)


def test_tiny_model_corpus(tiny_base, tmp_path):
    cases = list(malformed_cases(tiny_base, seed=1, random_cases=5, boundaries=40))
    assert {c.kind for c in cases} == KINDS
    outcomes = run_corpus(cases, tmp_path)
    assert not defects_report(outcomes), defects_report(outcomes)
    verdicts = Counter(o.verdict for o in outcomes)
    # most damage is refused: a corpus that the tools all accepted would test nothing
    assert verdicts["refused"] > 0.7 * len(outcomes), verdicts


@pytest.mark.model
def test_gemma_header_corpus(model_path, tmp_path):
    """Damage to the real model's header, through the tools that load all of it (a subset: each case copies
    the 253 MB file)."""
    base = GgufLayoutMap.read(model_path)
    wanted = ("truncate@kv[", "truncate@tensor-info[0]", "truncate@data", "absurd:array-count", "absurd:n_dims=5",
              "absurd:tensors-overlap", "type:gemma3.block_count", "type:gemma3.attention.head_count=u32:7",
              "type:tokenizer.ggml.tokens", "utf8:token", "dhsa:budget=nan", "dhsa:boundary=bogus")
    cases = [c for c in malformed_cases(base, random_cases=0) if c.name.startswith(wanted)]
    cases = cases[::max(1, len(cases) // 8)]  # about 8 files, 2-3 s each with 4 tools on a 2-core machine
    outcomes = run_corpus(cases, tmp_path)
    assert not defects_report(outcomes), defects_report(outcomes)


@pytest.mark.parametrize("key, value, needle", [
    ("block_count", 0, "block_count is 0, must be between 1 and 512"),
    ("block_count", 1 << 31, "block_count is 2147483648"),
    ("attention.head_count", 7, "head_count_kv is 2, which does not divide the 7 query heads"),
])
def test_hyperparameters_llama_cpp_asserts_on(tiny_base, tmp_path, key, value, needle):
    """Regression cases the corpus found: llama.cpp aborted the process (GGML_ASSERT in load_hparams, and
    ggml_reshape's when the first graph is built); our loader refuses them first."""
    name = f"type:qwen2.{key}=u32:{value}"
    case = next(c for c in malformed_cases(tiny_base, random_cases=0) if c.name == name)
    path = case.write(tmp_path / "bad.gguf")
    for tool in ("run", "Model"):
        outcome = judge(case.name, tool, path, tmp_path)
        assert outcome.verdict == "refused", outcome
        assert needle in outcome.detail, outcome.detail
    # `pydhsa info` shows what the header holds, and says why the engine would not load it
    from pydhsa.cli import main
    how, out, _ = run_forked(lambda: main(["info", str(path)]))
    assert how == "exit 0" and "dhsa plan: unavailable" in out and needle in out, (how, out)
