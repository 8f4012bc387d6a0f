"""Progress of long copies (the converters, the model cache's assembly): one line per 5%, `\\r`-rewritten on a
terminal, one line per step in a log."""
from __future__ import annotations

import time
from typing import Any, TextIO

PROGRESS_STEP = 5  # percent between progress reports


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class ByteProgress:
    """`label: 45% (12.0/26.7 MiB, 0.4 s)` as `update(done)` passes each step; silent unless `enabled`."""

    def __init__(self, total: int, enabled: bool, stream: TextIO, label: str) -> None:
        self.total, self.enabled, self.stream, self.label = total, enabled, stream, label
        self.tty = enabled and isatty(stream)
        self.next_pct = PROGRESS_STEP
        self.t0 = time.monotonic()

    def update(self, done: int) -> None:
        if not self.enabled or self.total <= 0:
            return
        pct = done * 100 // self.total
        if pct < self.next_pct and done < self.total:
            return
        while self.next_pct <= pct:
            self.next_pct += PROGRESS_STEP
        mib = 1 << 20
        line = (f"{self.label}: {pct:3d}% ({done / mib:.1f}/{self.total / mib:.1f} MiB, "
                f"{time.monotonic() - self.t0:.1f} s)")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def abort(self) -> None:
        """End a half-drawn terminal line (the copy failed or was interrupted)."""
        if self.tty and self.next_pct > PROGRESS_STEP and self.next_pct <= 100:
            self.stream.write("\n")
            self.stream.flush()
