"""RULER-style synthetic tasks generated from a seed and inserted into the NIAH haystack: ``multikey``
(several keys, one asked), ``multivalue`` (one key, every value must be produced), ``vartrack`` (variable
assignment chains; every variable holding the value must be named)."""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from .. import niah
from .prompts import Prompt, PromptSpec
from .runner import TokenMemo, run_tokens, target_tokens

RULER_TASKS = ("multikey", "multivalue", "vartrack")
RULER_MAX_TOKENS = {"multikey": 24, "multivalue": 64, "vartrack": 64}

_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
               "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid", "shiny", "tidy", "upbeat", "vivid",
               "witty", "young", "zesty", "bold", "crisp", "dapper", "elegant", "frosty")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quiver", "ribbon", "saddle", "tunnel",
          "umbrella", "violin", "walnut", "yacht", "zeppelin", "beacon", "compass", "drum", "feather", "glacier")

_MK_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")
_VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


@dataclass
class RulerSample:
    task: str
    text: str
    n_tokens: int
    expected: List[str]
    inserts: List[str]            # the inserted statements, in text order
    depths: List[float]           # requested depth of each insert
    scoring: str
    max_tokens: int
    target_tokens: int
    count_calls: int = 0


def _distinct(rng: random.Random, n: int, make: Callable[[], str]) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        v = make()
        if v not in out:
            out.append(v)
    return out


def _ruler_task(task: str, rng: random.Random, n_keys: int, n_values: int, n_hops: int, n_chains: int):
    """(header, inserts [(depth, sentence)], tail, expected, scoring) of one sample."""
    number = lambda: str(rng.randint(1_000_000, 9_999_999))  # noqa: E731
    if task == "multikey":
        keys = _distinct(rng, n_keys, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}")
        values = _distinct(rng, n_keys, number)
        inserts = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in zip(keys, values)]
        i = rng.randrange(n_keys)
        tail = (f"\n\nQuestion: What is the special magic number for {keys[i]} mentioned in the provided text?\n"
                f"Answer: The special magic number for {keys[i]} mentioned in the provided text is")
        return _MK_HEADER, inserts, tail, [values[i]], "first_line"
    if task == "multivalue":
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        values = _distinct(rng, n_values, number)
        inserts = [(rng.random(), f"One of the special magic numbers for {key} is: {v}.") for v in values]
        tail = (f"\n\nQuestion: What are all the special magic numbers for {key} mentioned in the provided text?\n"
                f"Answer: The special magic numbers for {key} mentioned in the provided text are")
        return _MK_HEADER, inserts, tail, values, "all"
    if task == "vartrack":
        names = _distinct(rng, n_chains * (n_hops + 1), lambda: "".join(rng.choice(string.ascii_uppercase)
                                                                       for _ in range(5)))
        values = _distinct(rng, n_chains, lambda: str(rng.randint(10_000, 99_999)))
        inserts = []
        for c in range(n_chains):
            chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
            depths = sorted(rng.random() for _ in chain)  # a chain reads in order
            inserts.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
            for j in range(1, len(chain)):
                inserts.append((depths[j], f"VAR {chain[j]} = VAR {chain[j - 1]}."))
        q = rng.randrange(n_chains)
        tail = (f"\n\nQuestion: Find all variables that are assigned the value {values[q]} in the text above.\n"
                f"Answer: According to the chain(s) of variable assignment in the text above, {n_hops + 1} "
                f"variables are assigned the value {values[q]}, they are:")
        return _VT_HEADER, inserts, tail, names[q * (n_hops + 1):(q + 1) * (n_hops + 1)], "all"
    raise ValueError(f"unknown RULER task {task!r} (known: {', '.join(RULER_TASKS)})")


def ruler_sample(task: str, count_tokens: Callable[[str], int], target_tokens: int, seed: int = 0, sample: int = 0,
                 haystack_dir: Union[str, Path, None] = None, *, n_keys: int = 4, n_values: int = 4, n_hops: int = 4,
                 n_chains: int = 1, tolerance: float = 0.01, reserve: int = 0) -> RulerSample:
    """One RULER-style sample; the same (task, target_tokens, seed, sample) always gives the same keys,
    values, depths and text (for the same tokenizer). The text is fitted to ``target_tokens - reserve``
    (the room a chat template takes), with the same keys and values."""
    rng = random.Random(f"ruler:{task}:{target_tokens}:{seed}:{sample}")
    header, inserts, tail, expected, scoring = _ruler_task(task, rng, n_keys, n_values, n_hops, n_chains)
    text, n_tok, order, calls = niah.build_inserted_prompt(count_tokens, target_tokens - reserve, header, tail, inserts,
                                                      haystack_dir, tolerance=tolerance)
    return RulerSample(task=task, text=text, n_tokens=n_tok, expected=list(expected), inserts=order,
                       depths=[d for d, _ in inserts], scoring=scoring, max_tokens=RULER_MAX_TOKENS[task],
                       target_tokens=target_tokens, count_calls=calls)


def ruler_specs(tasks: Sequence[str], lengths: Sequence[int], samples: int, *, seed: int = 0,
                n_ctx_train: Optional[int] = None, haystack_dir: Union[str, Path, None] = None,
                task_args: Optional[Dict[str, int]] = None) -> List[PromptSpec]:
    """RULER prompts, ordered by length, then task, then sample."""
    task_args = dict(task_args or {})
    for t in tasks:
        if t not in RULER_TASKS:
            raise ValueError(f"unknown RULER task {t!r} (known: {', '.join(RULER_TASKS)})")
    specs = []
    for length in sorted(lengths):
        for task in tasks:
            max_tokens = RULER_MAX_TOKENS[task]
            target = target_tokens(length, max_tokens, n_ctx_train)
            for s in range(samples):
                def build(runner, task=task, target=target, s=s) -> Prompt:
                    memo = TokenMemo(runner.tokenize)
                    r = ruler_sample(task, memo.count, target, seed, s, haystack_dir, reserve=runner.chat_overhead,
                                     **task_args)
                    return Prompt(text=r.text, tokens=run_tokens(runner, memo, r.text), expected=r.expected,
                                  scoring=r.scoring, max_tokens=r.max_tokens,
                                  info={"target_tokens": target, "inserts": r.inserts})

                specs.append(PromptSpec({"suite": "ruler", "task": task, "length": length, "sample": s, "seed": seed,
                                         "max_tokens": max_tokens, **task_args}, weight=float(target), build=build))
    return specs
