"""Accuracy and speed evaluations of dense attention versus DHSA on GGUF models.

Three suites share one engine (methods, runner, resumable grid, progress bar, reports):

- **NIAH** (``run_niah``): Needle-in-a-Haystack grid, context lengths x needle depths x methods.
  Completion-style prompts from ``pydhsa.niah`` (the needle rotates through ``niah.NEEDLES`` from
  cell to cell), greedy decoding, exact-match scoring (``niah.score``).
- **RULER-style** (``run_ruler``): synthetic tasks generated from a seed and inserted into the same
  haystack: ``multikey`` (several keys, one asked), ``multivalue`` (one key, every value must be
  produced), ``vartrack`` (variable assignment chains; every variable holding the value must be named).
- **Speed/memory** (``run_speed``): prefill tok/s, time to first token, decode tok/s and peak RSS at
  several context lengths, every configuration in a fresh subprocess (peak RSS is process-wide),
  medians of repeats and ratios to dense measured in the same run.

Methods are written ``dense``, ``dhsa:B`` (keysim boundaries, budget B) and ``fixed:B`` (fixed
boundaries every chunk_avg keys: the block-sparse ablation); see ``parse_methods``.

Work order: every prompt is built and tokenized once and all methods run on it before the next
prompt. Finished cases are appended (fsync'ed) to ``cases.jsonl`` in the output directory and skipped
on restart. Greedy generation stops early only once the score can no longer change (the first answer
line is complete, or every expected value has appeared); ``--no-early-stop`` disables that.

The model is ``-m FILE`` or ``--model-name NAME`` (an embedded model, ``pydhsa.models``), its KV cache
``-ctk``/``-ctv`` (llama.cpp's type names). ``--chat`` wraps NIAH/RULER prompts in the model's chat template
(``niah.as_chat``: the question is the user's turn, the answer prefix opens the assistant's); ``auto`` turns
it on for instruct models (``chat_enabled``). Settings that change the arithmetic or the prompt (``-ngl``, the
cache types, the chat template) are part of the model id in the case keys (``model_id``), so a resumed run
never mixes cases of different settings; at their defaults the ids are as they always were.

The model is reached through a *runner* (``ModelRunner``); tests substitute a fake one.

One module per concern, imported in this order (each uses only those above it):

- ``store``: the resumable JSONL result store; ``methods``: methods, lengths, depths and DHSA overrides
  as the command lines write them; ``progress_bar``: the ETA bar; ``prompts``: ``Prompt``/``PromptSpec``;
- ``runner``: the model behind ``ModelRunner``; ``scoring``: scores and the early-stop rule;
  ``grid``: the resumable (prompt, method) grid;
- ``niah_grid`` and ``ruler``: the suites' prompt specs (prompts themselves come from ``pydhsa.niah``);
- ``plots`` (matplotlib, optional), ``summary``: summary.json / summary.md; ``machine``: what a result
  records about where it ran;
- ``suites``: ``pydhsa niah`` / ``pydhsa ruler`` end to end; ``speed``: ``pydhsa bench`` and its worker
  (``python -m pydhsa.evals speed-worker``); ``options``: the flags of all three commands.
"""
from __future__ import annotations

from .grid import case_fields, grid_cases, run_grid
from .machine import collect_meta
from .methods import (DEFAULT_DEPTHS, DEFAULT_LENGTHS, DEFAULT_METHODS, DEFAULT_SPEED_LENGTHS, Method,
                      parse_depths, parse_lengths, parse_methods, parse_overrides)
from .niah_grid import NIAH_MAX_TOKENS, needle_for, niah_specs
from .options import add_niah_arguments, add_ruler_arguments, add_speed_arguments
from .plots import plot_niah_heatmaps, plot_ruler, plot_speed
from .progress_bar import Progress
from .prompts import Prompt, PromptSpec
from .ruler import RULER_TASKS, RulerSample, ruler_sample, ruler_specs
from .runner import CTX_MARGIN, Generation, ModelRunner, chat_enabled, model_id, tokenize_prompt
from .scoring import score_all, score_prompt, stop_rule
from .speed import run_speed, speed_worker, summarize_speed
from .store import ResultStore, case_key
from .suites import default_out_dir, run_niah, run_ruler
from .summary import summarize, summary_markdown, write_summary

__all__ = [
    "Method", "parse_methods", "DEFAULT_METHODS", "parse_lengths", "parse_depths", "parse_overrides",
    "DEFAULT_LENGTHS", "DEFAULT_DEPTHS", "DEFAULT_SPEED_LENGTHS", "NIAH_MAX_TOKENS", "CTX_MARGIN", "Generation",
    "Prompt", "PromptSpec", "ModelRunner", "Progress", "run_grid", "grid_cases", "case_fields", "niah_specs",
    "needle_for", "ruler_specs", "ruler_sample", "RULER_TASKS", "RulerSample", "score_all", "score_prompt",
    "stop_rule", "summarize", "summary_markdown", "write_summary", "plot_niah_heatmaps", "plot_ruler",
    "collect_meta", "run_niah", "run_ruler", "run_speed", "speed_worker", "summarize_speed", "plot_speed",
    "model_id", "chat_enabled", "tokenize_prompt", "default_out_dir", "ResultStore", "case_key",
    "add_niah_arguments", "add_ruler_arguments", "add_speed_arguments",
]
