"""The Needle-in-a-Haystack grid: one prompt spec per context length, needle depth and needle, the needle
rotating through ``niah.NEEDLES`` from cell to cell."""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .. import niah
from .prompts import Prompt, PromptSpec
from .runner import TokenMemo, run_tokens, target_tokens

NIAH_MAX_TOKENS = 24


def needle_for(length: int, depth: float, seed: int = 0, k: int = 0) -> niah.Needle:
    """The needle of a grid cell: consecutive depths take consecutive needles, each length starts at its
    own offset, so a length column uses every needle; stable whatever the rest of the grid is."""
    offset = zlib.crc32(f"{length}:{seed}".encode())
    return niah.NEEDLES[(offset + int(round(depth * 10)) + k) % len(niah.NEEDLES)]


def niah_specs(lengths: Sequence[int], depths: Sequence[float], *, seed: int = 0, needles_per_cell: int = 1,
               max_tokens: int = NIAH_MAX_TOKENS, n_ctx_train: Optional[int] = None,
               haystack_dir: Union[str, Path, None] = None) -> List[PromptSpec]:
    """NIAH prompts, ordered by length (ascending), then depth, then needle."""
    specs = []
    for length in sorted(lengths):
        target = target_tokens(length, max_tokens, n_ctx_train)
        for depth in sorted(depths):
            for k in range(needles_per_cell):
                needle = needle_for(length, depth, seed, k)

                def build(runner, target=target, depth=depth, needle=needle) -> Prompt:
                    memo = TokenMemo(runner.tokenize)
                    p = niah.build_prompt(memo.count, target - runner.chat_overhead, depth, needle, haystack_dir)
                    return Prompt(text=p.text, tokens=run_tokens(runner, memo, p.text), expected=[p.expected],
                                  scoring="first_line", max_tokens=max_tokens,
                                  info={"actual_depth": round(p.actual_depth, 4), "target_tokens": target,
                                        "question": needle.question})

                specs.append(PromptSpec({"suite": "niah", "length": length, "depth": depth, "needle": needle.name,
                                         "max_tokens": max_tokens}, weight=float(target), build=build))
    return specs
