"""Needle-in-a-Haystack (NIAH) prompt construction, scoring and result storage.

The haystack is the set of Paul Graham essays in ``<haystack_dir>/*.txt``,
concatenated in sorted file order (and cycled if a prompt needs more text than
there is).  A single "needle" sentence holding a secret value is inserted at a
requested depth on a sentence boundary, and the prompt ends in a
completion-style tail so that the model only has to continue the answer::

    Read the text below and remember the secret facts it contains.

    <haystack ... needle sentence ... haystack>

    Question: What is the secret passphrase for the blue lighthouse?
    Answer: The secret passphrase for the blue lighthouse is

Tokenisation is injected (``count_tokens``) so the module has no dependency on
the inference engine; tests use a fake word-level tokenizer. ``fit_to_tokens``
sizes any haystack prompt this way (the RULER-style tasks of pydhsa.evals.ruler
insert several sentences with it), and ``contains`` is the whole-word match of
``score``.

Haystack location: ``haystack_dir`` argument, else env var
``PYDHSA_HAYSTACK_DIR``, else ``<repo root>/../shared/data/niah/haystack``
where the repo root is the parent of the ``pydhsa`` package directory.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "Needle",
    "NEEDLES",
    "NiahPrompt",
    "HEADER",
    "default_haystack_dir",
    "load_haystack",
    "insert_sentences",
    "fit_to_tokens",
    "build_prompt",
    "build_inserted_prompt",
    "as_chat",
    "contains",
    "score",
    "answer_span",
]


# --------------------------------------------------------------------------
# Needles
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """A secret fact to hide in the haystack.

    sentence:      the sentence inserted into the haystack.
    question:      the question asked in the prompt tail.
    answer_prefix: completion-style start of the answer; the model continues it.
    expected:      the value the continuation must contain (see ``score``).
    """

    sentence: str
    question: str
    answer_prefix: str
    expected: str

    @property
    def name(self) -> str:
        """Short stable identifier (for case keys / reports)."""
        return re.sub(r"[^a-z0-9]+", "-", self.expected.lower()).strip("-")


NEEDLES: List[Needle] = [
    Needle(
        "The secret passphrase for the blue lighthouse is 'amber-falcon-42'.",
        "What is the secret passphrase for the blue lighthouse?",
        "The secret passphrase for the blue lighthouse is",
        "amber-falcon-42",
    ),
    Needle(
        "The special magic number for the city of Lisbon is 7381924.",
        "What is the special magic number for the city of Lisbon?",
        "The special magic number for the city of Lisbon is",
        "7381924",
    ),
    Needle(
        "The access code for the underground vault is XK-4471.",
        "What is the access code for the underground vault?",
        "The access code for the underground vault is",
        "XK-4471",
    ),
    Needle(
        "The name of Captain Morrow's pet parrot is Biscuit.",
        "What is the name of Captain Morrow's pet parrot?",
        "The name of Captain Morrow's pet parrot is",
        "Biscuit",
    ),
    Needle(
        "The hidden ingredient in grandmother Rosa's soup recipe is smoked paprika.",
        "What is the hidden ingredient in grandmother Rosa's soup recipe?",
        "The hidden ingredient in grandmother Rosa's soup recipe is",
        "smoked paprika",
    ),
    Needle(
        "The serial number engraved on the silver telescope is 58-203-9917.",
        "What is the serial number engraved on the silver telescope?",
        "The serial number engraved on the silver telescope is",
        "58-203-9917",
    ),
    Needle(
        "The wifi password at the Quiet Owl cafe is tangerine88.",
        "What is the wifi password at the Quiet Owl cafe?",
        "The wifi password at the Quiet Owl cafe is",
        "tangerine88",
    ),
    Needle(
        "The founding year of the fictional town of Elmsworth is 1847.",
        "What is the founding year of the fictional town of Elmsworth?",
        "The founding year of the fictional town of Elmsworth is",
        "1847",
    ),
    Needle(
        "The best thing to do in San Francisco is eat a sandwich in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
        "The best thing to do in San Francisco is",
        "eat a sandwich in Dolores Park",
    ),
    Needle(
        "The color of the front door at the old mill house is emerald green.",
        "What is the color of the front door at the old mill house?",
        "The color of the front door at the old mill house is",
        "emerald green",
    ),
]

HEADER = "Read the text below and remember the secret facts it contains.\n\n"


def _tail(needle: Needle) -> str:
    # No trailing space: BPE tokenizers attach the space to the next word.
    return f"\n\nQuestion: {needle.question}\nAnswer: {needle.answer_prefix}"


# --------------------------------------------------------------------------
# Haystack
# --------------------------------------------------------------------------


def default_haystack_dir() -> Path:
    env = os.environ.get("PYDHSA_HAYSTACK_DIR")
    if env:
        return Path(env)
    # A source checkout keeps the data beside the repository; an installed package looks from the
    # working directory (the repository root or its parent).
    relative = Path("shared") / "data" / "niah" / "haystack"
    candidates = [Path(__file__).resolve().parent.parent.parent / relative, Path.cwd().parent / relative,
                  Path.cwd() / relative]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


@functools.lru_cache(maxsize=4)
def _load_haystack_cached(dir_str: str) -> str:
    files = sorted(Path(dir_str).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt haystack files in {dir_str}")
    parts = [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]
    return "\n\n".join(p for p in parts if p)


def load_haystack(haystack_dir: Union[str, Path, None] = None) -> str:
    """All essays concatenated in sorted file order (cached per directory)."""
    d = Path(haystack_dir) if haystack_dir is not None else default_haystack_dir()
    return _load_haystack_cached(str(d.resolve()))


class _Haystack:
    """Cyclic view of the haystack text, cut on whitespace."""

    def __init__(self, base: str):
        self.base = base
        self._text = base

    def prefix(self, n: int, snap: bool = True) -> str:
        """First ~n characters, cut back to a word boundary (if ``snap``), right-stripped."""
        n = max(0, int(n))
        while len(self._text) < n + 1:
            self._text = self._text + "\n\n" + self.base
        s = self._text[:n]
        if snap and n and not self._text[n].isspace():
            k = max(s.rfind(" "), s.rfind("\n"))
            if k > 0 and k >= n - 64:
                s = s[:k]
        return s.rstrip()


_BOUNDARY_RE = re.compile(r"[.!?](?=\s)")


def _sentence_boundaries(text: str) -> List[int]:
    """Insertion offsets: the start, just after every '.', '!' or '?' that is
    followed by whitespace, and the end if the text ends with one of them."""
    pos = [m.end() for m in _BOUNDARY_RE.finditer(text)]
    if text and text[-1] in ".!?":
        pos.append(len(text))
    return [0] + pos


def _insertion_point(bounds: Sequence[int], depth: float, n_chars: int) -> int:
    """The sentence boundary nearest depth*n_chars (the earlier one on a tie); only depth 0 may use the
    artificial start-of-text offset."""
    cands = bounds[1:] if depth > 0.0 and len(bounds) > 1 else bounds
    target = depth * n_chars
    return min(cands, key=lambda b: (abs(b - target), b))


def _insert_needle(hay: str, depth: float, sentence: str):
    """Insert the needle at the sentence boundary nearest depth*len(hay).

    Returns (before, after) haystack parts (whitespace-trimmed at the join);
    the haystack-with-needle is ``before + " " + sentence + " " + after``
    (spaces omitted where a side is empty).
    """
    best = _insertion_point(_sentence_boundaries(hay), depth, len(hay))
    return hay[:best].rstrip(), hay[best:].lstrip()


def _join(before: str, sentence: str, after: str) -> str:
    s = before + (" " if before else "") + sentence
    return s + (" " + after if after else "")


def insert_sentences(hay: str, inserts: Sequence[Tuple[float, str]]) -> Tuple[str, List[str]]:
    """Insert each (depth, sentence) at the sentence boundary nearest its depth, as ``build_prompt`` places
    its needle (inserts at the same boundary keep their order); returns the text and the sentences in text
    order."""
    bounds = _sentence_boundaries(hay)
    placed = sorted((_insertion_point(bounds, depth, len(hay)), i, sentence)
                    for i, (depth, sentence) in enumerate(inserts))
    pieces, pos = [], 0
    for b, _, sentence in placed:
        seg = hay[pos:b].strip()
        if seg:
            pieces.append(seg)
        pieces.append(sentence)
        pos = b
    rest = hay[pos:].strip()
    if rest:
        pieces.append(rest)
    return " ".join(pieces), [s for _, _, s in placed]

# --------------------------------------------------------------------------
# Prompt construction
# --------------------------------------------------------------------------


def fit_to_tokens(
    count_tokens: Callable[[str], int],
    target_tokens: int,
    compose: Callable[[int, bool], Tuple[int, str, object]],
    *,
    tolerance: float = 0.01,
    max_count_calls: int = 20,
) -> Tuple[str, int, object, int, int]:
    """Search the haystack length (in characters) whose prompt has
    ``target_tokens*(1-tolerance) <= n_tokens <= target_tokens`` tokens by ``count_tokens``.

    ``compose(n, snap)`` builds the prompt over the first ~n haystack characters (cut back to a word
    boundary if ``snap``) and returns (characters used, text, anything the caller wants back). Never
    exceeding the target is preferred, so the prompt fits a context sized for it; if the call budget
    (``max_count_calls``) runs out, the closest prompt within +-tolerance is accepted, otherwise
    ValueError. Returns (text, n_tokens, the composer's extra, count calls, haystack characters).
    """
    if target_tokens <= 0:
        raise ValueError("target_tokens must be positive")
    calls = 0
    cache: Dict[int, tuple] = {}  # snapped length -> (n_tokens, text, extra)

    def evaluate(n: int, snap: bool = True):
        nonlocal calls
        n_eff, text, extra = compose(n, snap)
        if n_eff in cache:
            return n_eff, cache[n_eff][0]
        calls += 1
        t = count_tokens(text)
        cache[n_eff] = (t, text, extra)
        return n_eff, t

    lo_ok = target_tokens * (1.0 - tolerance)
    aim = target_tokens * (1.0 - tolerance / 4.0)

    # Overhead (everything but the haystack) and a chars/token estimate.
    n0, overhead = evaluate(0)
    if overhead > target_tokens:
        raise ValueError(
            f"target_tokens={target_tokens} is smaller than the fixed prompt overhead ({overhead})"
        )
    sample_n = int(min(max(4.0 * (target_tokens - overhead), 2000), 40000))
    n1, t1 = evaluate(sample_n)
    cpt = max(n1, 1) / max(t1 - overhead, 1)

    lo = (n0, overhead)  # points with t < aim
    hi: Optional[tuple] = None  # points with t > target
    if t1 <= aim:
        lo = (n1, t1)
    else:
        hi = (n1, t1)

    def accepted(t: int) -> bool:
        return lo_ok <= t <= target_tokens

    found = next((n for n, v in cache.items() if accepted(v[0])), None)
    guess = n0 + (aim - overhead) * cpt
    iters = 0
    while found is None and calls < max_count_calls and iters < 4 * max_count_calls:
        iters += 1
        if hi is None:  # extrapolate upwards
            n = max(int(round(guess)), lo[0] + 16)
        else:  # interpolate inside the bracket, bisect as fallback
            (na, ta), (nb, tb) = lo, hi
            if nb - na <= 1:
                break
            n = int(round(na + (aim - ta) * (nb - na) / max(tb - ta, 1)))
            if n <= na or n >= nb:
                n = (na + nb) // 2
        n_eff, t = evaluate(n)
        stalled = n_eff <= lo[0] or (hi is not None and n_eff >= hi[0])
        if stalled and calls < max_count_calls:
            n_eff, t = evaluate(n, snap=False)  # word snapping stalled: cut mid-word
        if accepted(t):
            found = n_eff
            break
        if t < lo_ok:
            if n_eff <= lo[0]:
                if hi is not None:
                    break  # word-boundary snapping cannot make progress
                guess = lo[0] + 2 * (n - lo[0]) + 64
                continue
            lo = (n_eff, t)
        else:
            if hi is not None and n_eff >= hi[0]:
                break
            hi = (n_eff, t)
        if n_eff > 0 and t > overhead:
            cpt = n_eff / (t - overhead)
            guess = n_eff + (aim - t) * cpt

    if found is None:
        within = [
            (abs(v[0] - target_tokens), n)
            for n, v in cache.items()
            if abs(v[0] - target_tokens) <= tolerance * target_tokens
        ]
        if not within:
            best = min(cache.items(), key=lambda kv: abs(kv[1][0] - target_tokens))
            raise ValueError(
                f"could not reach {target_tokens} tokens within {tolerance:.1%} "
                f"after {calls} count_tokens calls (closest: {best[1][0]})"
            )
        found = min(within)[1]
    n_tok, text, extra = cache[found]
    return text, n_tok, extra, calls, found


@dataclass
class NiahPrompt:
    text: str
    n_tokens: int
    depth: float  # requested depth, 0..1
    actual_depth: float  # needle position / haystack tokens (approx)
    needle: Needle
    expected: str
    target_tokens: int = 0
    needle_char_offset: int = -1  # offset of the needle sentence in ``text``
    haystack_chars: int = 0  # length of the haystack cut (without the needle)
    count_calls: int = 0  # number of count_tokens calls used


def build_prompt(
    count_tokens: Callable[[str], int],
    target_tokens: int,
    depth: float,
    needle: Needle,
    haystack_dir: Union[str, Path, None] = None,
    *,
    tolerance: float = 0.01,
    max_count_calls: int = 20,
    header: str = HEADER,
) -> NiahPrompt:
    """Build a NIAH prompt of ~``target_tokens`` tokens (by ``count_tokens``), sized by ``fit_to_tokens``.

    ``count_tokens`` is called at most ``max_count_calls`` times for the search plus 2 for
    ``actual_depth``. The needle goes on the sentence boundary nearest ``depth`` (fraction of the
    haystack characters, ~ tokens); depth 0 puts it at the very start, depth 1 after the last complete
    sentence.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    hs = _Haystack(load_haystack(haystack_dir))
    tail = _tail(needle)

    def compose(n: int, snap: bool):
        hay = hs.prefix(n, snap)
        before, after = _insert_needle(hay, depth, needle.sentence)
        return len(hay), header + _join(before, needle.sentence, after) + tail, (before, after)

    text, n_tok, (before, after), calls, found = fit_to_tokens(
        count_tokens, target_tokens, compose, tolerance=tolerance, max_count_calls=max_count_calls)
    tb = count_tokens(before) if before else 0
    ta = count_tokens(after) if after else 0
    calls += (1 if before else 0) + (1 if after else 0)
    actual = tb / (tb + ta) if (tb + ta) > 0 else depth
    offset = len(header) + len(before) + (1 if before else 0)
    assert text[offset:offset + len(needle.sentence)] == needle.sentence
    return NiahPrompt(
        text=text,
        n_tokens=n_tok,
        depth=depth,
        actual_depth=actual,
        needle=needle,
        expected=needle.expected,
        target_tokens=target_tokens,
        needle_char_offset=offset,
        haystack_chars=found,
        count_calls=calls,
    )


def build_inserted_prompt(
    count_tokens: Callable[[str], int],
    target_tokens: int,
    header: str,
    tail: str,
    inserts: Sequence[Tuple[float, str]],
    haystack_dir: Union[str, Path, None] = None,
    *,
    tolerance: float = 0.01,
    max_count_calls: int = 24,
) -> Tuple[str, int, List[str], int]:
    """A prompt ``header + haystack-with-inserts + tail`` sized by ``fit_to_tokens``, each (depth, sentence)
    of ``inserts`` placed by ``insert_sentences``. Returns (text, n_tokens, inserts in text order, count
    calls)."""
    hs = _Haystack(load_haystack(haystack_dir))

    def compose(n: int, snap: bool):
        hay = hs.prefix(n, snap)
        body, order = insert_sentences(hay, inserts)
        return len(hay), header + body + tail, order

    text, n_tok, order, calls, _ = fit_to_tokens(count_tokens, target_tokens, compose, tolerance=tolerance,
                                                 max_count_calls=max_count_calls)
    return text, n_tok, order, calls


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

# A "word": alphanumeric runs joined by internal connectors (- _ . ' / :),
# so "amber-falcon-42", "XK-4471", "Morrow's", "3.14" are single tokens while
# surrounding quotes and trailing punctuation fall away.
_WORD_RE = re.compile(r"[0-9a-z]+(?:[-_.'/:][0-9a-z]+)*")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-",
                         "\u2014": "-", "\u00a0": " "})


def as_chat(prompt_text: str, apply_template: Callable[[List[Dict[str, str]]], str]) -> str:
    """A completion-style prompt as one chat turn, for instruct models: everything up to the answer line is
    the user's message, and the assistant's turn starts with the answer prefix, so the model still only
    continues the answer. `apply_template` is the model's chat template (pydhsa.Model.chat_prompt)."""
    cut = prompt_text.rindex("\nAnswer: ")
    user, answer_prefix = prompt_text[:cut], prompt_text[cut + len("\nAnswer: "):]
    return apply_template([{"role": "user", "content": user}]) + answer_prefix


def _words(s: str) -> List[str]:
    return _WORD_RE.findall(s.translate(_QUOTES).lower())


def answer_span(generated_text: str) -> str:
    """First answer span: the continuation from its first non-blank character
    up to the next line break (the model's answer line)."""
    s = generated_text.strip()
    if not s:
        return ""
    return s.split("\n", 1)[0]


def contains(text: str, value: str) -> bool:
    """Whether the words of ``value`` occur, in order and complete, among the words of ``text`` (the
    word rules of ``score``); an empty value is never contained."""
    exp = _words(value)
    got = _words(text)
    k = len(exp)
    return bool(exp) and any(got[i:i + k] == exp for i in range(len(got) - k + 1))


def score(generated_text: str, expected: str) -> bool:
    """Exact-match NIAH scoring.

    Rule: take the first answer span of the continuation (first non-empty
    line), lower-case it and split both it and ``expected`` into words, where a
    word is a run of ASCII letters/digits possibly joined by internal
    ``- _ . ' / :`` (curly quotes/dashes are normalised first).  Whitespace,
    case, surrounding quotes, brackets, markdown and trailing punctuation are
    thereby ignored.  The result is True iff the expected words occur as a
    contiguous whole-word subsequence of the span's words: "42" does not match
    "142" or "42.5", "amber-falcon-42" does not match "amber-falcon-421", a
    multi-word value must appear in order and complete.  Empty output (or an
    empty expected value) scores False.
    """
    return contains(answer_span(generated_text), expected)
