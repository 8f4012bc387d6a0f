"""What a result file records about where it was measured: machine, pydhsa version and git commit, the
engine's build flags, the native library and the model file."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_info() -> Dict[str, Any]:
    roots = [Path(__file__).resolve().parent.parent.parent, Path.cwd()]
    for root in roots:
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            if commit.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip()),
                    "git_root": str(root)}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"git_commit": None, "git_dirty": None}


def _system_info() -> Optional[str]:
    try:
        from .. import _native
        return _native.ffi.string(_native.load().pydhsa_system_info()).decode("utf-8", "replace")
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unavailable ({e})"


def collect_meta(runner=None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from .. import __version__
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    meta = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "pydhsa_version": __version__,
            **_git_info(), "system_info": _system_info(),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
                        "hostname": platform.node()},
            "lib_dir": _lib_dir()}
    if runner is not None and hasattr(runner, "describe"):
        meta["model"] = runner.describe()
    meta.update(extra or {})
    return meta


def _lib_dir() -> Optional[str]:
    try:
        from .. import _native
        return str(_native.lib_dir())
    except Exception:  # noqa: BLE001
        return None


def model_file_meta(path: Path, threads: int) -> Dict[str, Any]:
    from ..gguf_info import read_gguf_info
    d: Dict[str, Any] = {"path": str(path), "file": path.name, "size_bytes": path.stat().st_size, "threads": threads}
    try:
        info = read_gguf_info(path)
        d.update(architecture=info.architecture, name=info.metadata.get("general.name"),
                 n_ctx_train=info.arch_value("context_length"), dhsa_keys=dict(info.dhsa_keys))
    except Exception as e:  # noqa: BLE001
        d["info_error"] = str(e)
    return d
