"""What every suite hands to the grid: a built ``Prompt`` (text, tokens, expected values) and the lazy
``PromptSpec`` that builds it only when some method still needs it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List


@dataclass
class Prompt:
    """A built prompt: what every method runs on."""
    text: str
    tokens: List[int]
    expected: List[str]            # all of them must be produced
    scoring: str                   # "first_line" (niah.score on the answer line) | "all" (whole continuation)
    max_tokens: int
    info: Dict[str, Any] = field(default_factory=dict)  # extra fields for the records


@dataclass
class PromptSpec:
    """One prompt of a grid, identified by ``fields``; built lazily (only if some method still needs it)."""
    fields: Dict[str, Any]
    weight: float                  # relative cost, for the ETA
    build: Callable[[Any], Prompt]  # build(runner) -> Prompt
