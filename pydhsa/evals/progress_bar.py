"""A one-line progress bar with an ETA for the long suites (the converters' byte progress is
pydhsa.progress)."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional


def _fmt_dur(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress bar with ETA on stderr (a line per step when stderr is not a terminal).

    The ETA weighs steps by their cost (``weight``, e.g. prompt tokens): remaining weight times the
    measured seconds per unit of weight.
    """

    def __init__(self, total: int, total_weight: float, title: str = "", stream=None, enabled: bool = True,
                 width: int = 24, clock: Callable[[], float] = time.monotonic):
        self.total, self.total_weight = total, float(total_weight)
        self.done, self.done_weight = 0, 0.0
        self.title, self.stream, self.enabled, self.width = title, stream or sys.stderr, enabled, width
        self.clock = clock
        self.start = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0

    def eta(self) -> Optional[float]:
        if self.done_weight <= 0:
            return None
        rate = (self.clock() - self.start) / self.done_weight
        return rate * max(self.total_weight - self.done_weight, 0.0)

    def line(self, msg: str = "") -> str:
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        head = f"{self.title} " if self.title else ""
        return (f"{head}[{bar}] {self.done}/{self.total} {frac:4.0%} | {_fmt_dur(self.clock() - self.start)} "
                f"elapsed | ETA {_fmt_dur(self.eta())}" + (f" | {msg}" if msg else ""))

    def _write(self, text: str, newline: bool) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad + ("\n" if newline else ""))
            self._last_len = 0 if newline else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def show(self, msg: str = "") -> None:
        """Redraw the bar (terminals only: a log gets one line per finished step)."""
        if self.tty:
            self._write(self.line(msg), newline=False)

    def note(self, msg: str) -> None:
        """A message above the bar."""
        if self.tty:
            self._write(msg, newline=True)
            self.show()
        else:
            self._write(msg, newline=False)

    def advance(self, weight: float = 1.0, msg: str = "") -> None:
        self.done += 1
        self.done_weight += weight
        self._write(self.line(msg), newline=not self.tty)

    def close(self) -> None:
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
