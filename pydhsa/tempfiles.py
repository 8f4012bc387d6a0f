"""Temporary files beside the file they become, named after the process that writes them.

Every file pydhsa writes (the converters' GGUFs, the embedded model assembled into the cache) is written to a
temporary file in the target's folder and renamed over the target only when complete, so the target is
either absent, the old file, or the whole new one. A writer killed with SIGKILL, or a machine that lost
power, leaves its temporary file behind: the name carries the writer's process id, so the next writer of the
same target removes the ones whose process is gone (a model's temporary file is as large as the model) and
leaves those of writers still running.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def make_temp(target: str | os.PathLike) -> tuple[int, Path]:
    """(fd, path) of a new temporary file beside `target`: `.NAME.PID.RANDOM.tmp`, with the mode a plain
    open() would give (0666 less the umask; mkstemp's own is 0600). Temporary files of `target` left by
    writers that died are removed first."""
    target = Path(target)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    if hasattr(os, "fchmod"):
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
    return fd, Path(tmp)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of `target` left by writers that died; return what was removed."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.tmp$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
