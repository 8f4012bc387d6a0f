"""The arrows between our Python packages run one way: `pydhsa_convert` (the converters, the repository's convert/
folder) uses `pydhsa`, and no module of `pydhsa` imports it when imported (only the CLI's `convert` subcommand
calls into it). The wheel installs no generic top-level `convert` package. Inside the packages the module-level
imports form no cycle (pydhsa.evals' modules each use only those below them), every module imports with nothing
else of ours loaded before it, and no module of `pydhsa` is longer than 800 lines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"pydhsa": REPO / "pydhsa", "pydhsa_convert": REPO / "convert" / "pydhsa_convert"}
MAX_MODULE_LINES = 800

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


def _modules():
    """{module name: file} of every module of our packages, from the source tree."""
    out = {}
    for package, root in PACKAGE_DIRS.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _top_level_imports(name: str, path: Path, known) -> set:
    """Our modules that `name` imports when it is imported: import statements outside functions and classes
    (a function's import runs when it is called, after every module has loaded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for a in node.names:  # `from . import niah` names a module, `from .api import Model` a name in one
                    target = f"{base}.{a.name}"
                    found.add(target if target in known else base)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_between_our_modules():
    modules = _modules()
    graph = {name: _top_level_imports(name, path, modules) for name, path in modules.items()}
    assert graph["pydhsa.evals.speed"] >= {"pydhsa.evals.runner", "pydhsa.niah"}, graph["pydhsa.evals.speed"]
    state, cycles = {}, []

    def walk(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


IMPORT_EACH_ALONE = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("pydhsa", "pydhsa_convert")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {e!r}")
print("\\n".join(failed))
"""


def test_each_module_imports_with_nothing_of_ours_loaded_before():
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *names], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip(), result.stdout


def test_no_module_of_pydhsa_is_over_800_lines():
    long = {name: n for name, path in _modules().items() if name.split(".")[0] == "pydhsa"
            and (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, long
