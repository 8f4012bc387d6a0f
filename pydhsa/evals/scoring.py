"""Scoring of a continuation against a prompt's expected values, and the early-stop rule that follows
from it (generation stops once the score can no longer change)."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

from .. import niah
from .prompts import Prompt


def score_all(generated: str, expected: Sequence[str]) -> Tuple[bool, float]:
    """(every expected value appears, fraction that appears) in the whole continuation; whole-word
    matching with niah.score's word rules."""
    if not expected:
        return False, 0.0
    found = sum(1 for e in expected if niah.contains(generated, e))
    return found == len(expected), found / len(expected)


def score_prompt(prompt: Prompt, generated: str) -> Tuple[bool, float]:
    if prompt.scoring == "first_line":
        ok = all(niah.score(generated, e) for e in prompt.expected)
        return ok, 1.0 if ok else 0.0
    return score_all(generated, prompt.expected)


def stop_rule(prompt: Prompt) -> Callable[[str], bool]:
    """When the score can no longer change: the first answer line is complete (first_line), or every
    expected value has appeared (all)."""
    if prompt.scoring == "first_line":
        return lambda text: "\n" in text.lstrip()
    return lambda text: score_all(text, prompt.expected)[0]
