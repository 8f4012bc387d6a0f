"""The arrows between our Python packages run one way: `pydhsa_convert` (the converters, the repository's convert/
folder) uses `pydhsa`, and no module of `pydhsa` imports it when imported (only the CLI's `convert` subcommand
calls into it). The wheel installs no generic top-level `convert` package."""
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
print(" ".join(sorted(name for name in sys.modules if name.split(".")[0] in ("pydhsa", "pydhsa_convert", "convert"))))
"""


def imported_by(package: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL.format(package=package)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_pydhsa_does_not_import_the_converters():
    modules = imported_by("pydhsa")
    assert "pydhsa.cli" in modules and "pydhsa.gguf_info" in modules and "pydhsa.models" in modules
    assert not {m for m in modules if m.split(".")[0] in ("pydhsa_convert", "convert")}


def test_the_converters_import_pydhsa_alone():
    modules = imported_by("pydhsa_convert")
    assert {"pydhsa_convert.gguf_dhsa", "pydhsa_convert.hf_gemma", "pydhsa.dhsa_params",
            "pydhsa.gguf_layout"} <= modules


def test_no_top_level_convert_package_is_installed():
    from importlib.metadata import files
    installed = {str(f).split("/")[0] for f in files("pydhsa") or []}
    assert "pydhsa" in installed or any(name.startswith("_editable") for name in installed), installed
    assert "convert" not in installed, installed
