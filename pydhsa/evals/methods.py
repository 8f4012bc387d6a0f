"""What the command lines name: attention methods (``dense``, ``dhsa:B``, ``fixed:B``), context lengths,
needle depths and DHSA parameter overrides, parsed into values with one clear error per bad item."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

DEFAULT_METHODS = "dense,dhsa:0.1,dhsa:0.2,dhsa:0.3,dhsa:0.5,fixed:0.1,fixed:0.2,fixed:0.3,fixed:0.5"
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 24576, 32768)
DEFAULT_DEPTHS = tuple(round(i / 10, 1) for i in range(11))
DEFAULT_SPEED_LENGTHS = (4096, 8192, 16384, 24576, 32768)

_KIND_ALIASES = {"dense": "dense", "dhsa": "dhsa", "keysim": "dhsa", "fixed": "fixed", "block": "fixed"}
KIND_ORDER = {"dense": 0, "dhsa": 1, "fixed": 2}


@dataclass(frozen=True)
class Method:
    """An attention method: ``dense``, or DHSA with a budget and a boundary method."""
    kind: str                       # dense | dhsa (keysim boundaries) | fixed (fixed boundaries)
    budget: Optional[float] = None  # None for dense

    @property
    def label(self) -> str:
        return "dense" if self.kind == "dense" else f"{self.kind}@{self.budget:g}"

    @property
    def boundary(self) -> Optional[str]:
        return {"dense": None, "dhsa": "keysim", "fixed": "fixed"}[self.kind]

    def method_id(self, overrides: Optional[Dict[str, Any]] = None) -> str:
        """The label plus the DHSA parameter overrides (dense ignores them): the name used in keys and
        reports, so runs with different settings never mix."""
        if self.kind == "dense" or not overrides:
            return self.label
        return self.label + "[" + ",".join(f"{k}={overrides[k]}" for k in sorted(overrides)) + "]"

    def config(self, file_values: Optional[Dict[str, Any]] = None, overrides: Optional[Dict[str, Any]] = None):
        """The DhsaConfig of this method (None for dense): built-in defaults < the model file's DHSA keys <
        ``overrides`` < this method's budget and boundary."""
        if self.kind == "dense":
            return None
        from ..dhsa_params import config_from_values
        values = dict(file_values or {})
        values.update(overrides or {})
        values.update(budget=self.budget, boundary=self.boundary)
        return config_from_values(values)

    def sort_key(self):
        return (KIND_ORDER.get(self.kind, 9), self.budget or 0.0)


def parse_methods(spec: Union[str, Sequence[str]]) -> List[Method]:
    """``"dense,dhsa:0.3,fixed@0.1"`` -> methods, in the given order, duplicates dropped.

    Accepted items: ``dense``; ``dhsa[:B]`` or ``keysim[:B]`` (keysim boundaries); ``fixed[:B]`` or
    ``block[:B]`` (fixed boundaries); ``:`` or ``@`` before the budget; B in (0, 1], default 0.3;
    ``default``/``all`` expands to DEFAULT_METHODS. Raises ValueError naming the bad item.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[Method] = []
    for raw in items:
        item = raw.strip().lower()
        if not item:
            continue
        if item in ("default", "all"):
            for m in parse_methods(DEFAULT_METHODS):
                if m not in out:
                    out.append(m)
            continue
        name, sep, budget_text = item.replace("@", ":").partition(":")
        kind = _KIND_ALIASES.get(name.strip())
        if kind is None:
            raise ValueError(f"unknown method {raw.strip()!r} (use dense, dhsa:B or fixed:B, e.g. dhsa:0.3)")
        if kind == "dense":
            if sep:
                raise ValueError(f"method {raw.strip()!r}: dense takes no budget")
            m = Method("dense")
        else:
            budget = 0.3
            if sep:
                try:
                    budget = float(budget_text)
                except ValueError:
                    raise ValueError(f"method {raw.strip()!r}: budget {budget_text!r} is not a number") from None
            if not (0.0 < budget <= 1.0):  # also rejects nan
                raise ValueError(f"method {raw.strip()!r}: budget must be > 0 and <= 1")
            m = Method(kind, budget)
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no methods given")
    return out


def _parse_sorted(spec, parse_item: Callable[[str], Any], what: str) -> list:
    """Comma-separated items (or a sequence) -> sorted unique values of ``parse_item`` (which raises
    ValueError naming the item); empty items are skipped, no items at all is an error."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = {parse_item(text) for text in (str(raw).strip() for raw in items) if text}
    if not out:
        raise ValueError(f"no {what} given")
    return sorted(out)


def _length(text: str) -> int:
    number, mult = (text[:-1], 1024) if text.lower().endswith("k") else (text, 1)
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise ValueError(f"bad length {text!r} (use tokens, e.g. 2048 or 2k)") from None
    if value < 64:
        raise ValueError(f"length {value} is too small (>= 64 tokens)")
    return value


def _depth(text: str) -> float:
    number, scale = (text[:-1], 0.01) if text.endswith("%") else (text, 1.0)
    try:
        value = round(float(number) * scale, 6)
    except ValueError:
        raise ValueError(f"bad depth {text!r} (a fraction 0..1 or a percentage)") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"depth {text} is outside 0..1")
    return value


def parse_lengths(spec: Union[str, Sequence[int]]) -> List[int]:
    """``"2048,4k,32K"`` -> [2048, 4096, 32768] (k = 1024), sorted, unique."""
    return _parse_sorted(spec, _length, "lengths")


def parse_depths(spec: Union[str, Sequence[float]]) -> List[float]:
    """``"0,0.1,0.5"`` or ``"0%,50%,100%"`` -> sorted unique depths in [0, 1]."""
    return _parse_sorted(spec, _depth, "depths")


def parse_overrides(min_context: Optional[int] = None, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """DHSA parameter overrides from ``--dhsa-min-context`` and ``--dhsa-opt NAME=VALUE`` items."""
    from ..dhsa_params import PARAMS_BY_NAME, validate_values
    values: Dict[str, Any] = {}
    for item in opts or ():
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--dhsa-opt {item!r}: expected NAME=VALUE, e.g. chunk_avg=64")
        if name in ("budget", "boundary"):
            raise ValueError(f"--dhsa-opt {item!r}: budget and boundary come from --methods")
        if name not in PARAMS_BY_NAME:
            raise ValueError(f"--dhsa-opt {item!r}: unknown DHSA parameter {name!r}")
        kind = PARAMS_BY_NAME[name].kind
        values[name] = int(value) if kind == "int" and value.strip().lstrip("-").isdigit() else value.strip()
    if min_context is not None:
        values["min_context"] = int(min_context)
    return validate_values(values, labels={k: f"DHSA override {k}" for k in values})
