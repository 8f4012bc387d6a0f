"""The arrows between our Python packages run one way: `convert` (the converters) uses `pydhsa`, and no module
of `pydhsa` imports `convert` when it is imported (only the CLI's `convert` subcommand calls into it)."""
from __future__ import annotations

import subprocess
import sys

IMPORT_ALL = """
import importlib, pkgutil, sys
import {package}
for m in pkgutil.walk_packages({package}.__path__, "{package}."):
    if m.name.endswith("__main__"):
        continue
    importlib.import_module(m.name)
print(" ".join(sorted(name for name in sys.modules if name.split(".")[0] in ("pydhsa", "convert"))))
"""


def imported_by(package: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL.format(package=package)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_pydhsa_does_not_import_convert():
    modules = imported_by("pydhsa")
    assert "pydhsa.cli" in modules and "pydhsa.gguf_info" in modules and "pydhsa.models" in modules
    assert not {m for m in modules if m.split(".")[0] == "convert"}


def test_convert_imports_pydhsa_alone():
    modules = imported_by("convert")
    assert {"convert.gguf_dhsa", "convert.hf_gemma", "pydhsa.dhsa_params", "pydhsa.gguf_layout"} <= modules
