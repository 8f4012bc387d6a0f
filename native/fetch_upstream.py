#!/usr/bin/env python3
"""Obtain the pinned upstream llama.cpp tree for the build, without committing any of it.

Upstream is the llama.cpp tree vendored in the PyPI sdist of llama-cpp-python (see UPSTREAM_* below).
This script

  1. downloads that sdist with `pip download` into a cache outside the repository (once),
  2. checks its sha256 (a mismatch is fatal: a silently different upstream is the worst bug a fork has),
  3. unpacks only the directories the build needs into `<cache>/upstream/llama.cpp-<version>/`
     (atomically: a half-written tree is never left where the build would find it),
  4. prints the path of that tree on its last stdout line (CMake reads it).

An offline build skips all of this by passing an already unpacked tree (CMake option or environment
variable PYDHSA_LLAMA_CPP_DIR), or a downloaded sdist file (PYDHSA_UPSTREAM_SDIST).

Usage:  fetch_upstream.py [--cache-dir DIR] [--sdist FILE] [--export DIR]
  --export DIR   also copy the unpacked tree to DIR (how a machine without network gets it).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM_PACKAGE = "llama-cpp-python"
UPSTREAM_VERSION = "0.3.36"
UPSTREAM_SDIST = f"llama_cpp_python-{UPSTREAM_VERSION}.tar.gz"
UPSTREAM_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_PREFIX = f"llama_cpp_python-{UPSTREAM_VERSION}/vendor/llama.cpp/"

# What the build compiles (ggml, libllama, and the common/tools needed for the upstream
# `llama-completion` comparison). Models, docs, tests and CI files stay out of the cache.
TREE_KEEP = ("CMakeLists.txt", "LICENSE", "cmake/", "include/", "src/", "ggml/", "common/",
             "vendor/", "tools/", "licenses/",
             "scripts/ui-assets.cmake")  # llama-server's build (the PYDHSA_BUILD_TOOLS option) runs it
COMPLETE_STAMP = ".pydhsa-upstream-complete"


def _stamp_text() -> str:
    """What a complete tree was unpacked from and with: a different sdist or TREE_KEEP unpacks it again."""
    return f"{UPSTREAM_SDIST} {UPSTREAM_SHA256} {','.join(TREE_KEEP)}\n"


def default_cache_dir() -> Path:
    """pydhsa's cache folder, as the package defines it (pydhsa/cache_location.py, loaded by its path: the
    package is not importable while it is being built)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "pydhsa" / "cache_location.py"
    spec = importlib.util.spec_from_file_location("pydhsa_cache_location", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cache_dir()


def fail(message: str) -> None:
    print(f"pydhsa fetch_upstream: error: {message}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(dest_dir: Path) -> Path:
    """`pip download` the pinned sdist. --no-build-isolation keeps pip from building the sdist's own
    build requirements (cmake) from source just to read its metadata."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--dest", str(dest_dir), f"{UPSTREAM_PACKAGE}=={UPSTREAM_VERSION}"]
    print(f"pydhsa: downloading {UPSTREAM_PACKAGE}=={UPSTREAM_VERSION} sdist (pinned upstream llama.cpp)",
          file=sys.stderr)
    for extra in (["--no-build-isolation"], []):
        result = subprocess.run(base + extra, stdout=sys.stderr, stderr=sys.stderr)
        if result.returncode == 0 and (dest_dir / UPSTREAM_SDIST).exists():
            return dest_dir / UPSTREAM_SDIST
    fail(f"could not download {UPSTREAM_SDIST}; for an offline build set PYDHSA_LLAMA_CPP_DIR "
         f"to an unpacked llama.cpp tree or PYDHSA_UPSTREAM_SDIST to the sdist file")
    raise AssertionError  # unreachable


def unpack_tree(sdist: Path, tree: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=tree.name + ".tmp-", dir=tree.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(TREE_PREFIX):
                    continue
                rel = member.name[len(TREE_PREFIX):]
                if not rel or not any(rel == k or rel.startswith(k) for k in TREE_KEEP):
                    continue
                if not (member.isfile() or member.isdir()):
                    continue  # no links or devices from an archive
                member.name = rel
                members.append(member)
            tar.extractall(tmp, members=members, filter="data")
        (tmp / COMPLETE_STAMP).write_text(_stamp_text())
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(tmp, tree)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tree(cache_dir: Path, sdist_arg: str | None) -> Path:
    upstream_dir = cache_dir / "upstream"
    tree = upstream_dir / f"llama.cpp-{UPSTREAM_VERSION}"
    stamp = tree / COMPLETE_STAMP
    if stamp.exists() and stamp.read_text() == _stamp_text():
        return tree
    upstream_dir.mkdir(parents=True, exist_ok=True)
    sdist = Path(sdist_arg) if sdist_arg else upstream_dir / UPSTREAM_SDIST
    if not sdist.exists():
        if sdist_arg:
            fail(f"sdist {sdist} does not exist")
        sdist = download_sdist(upstream_dir)
    actual = sha256_of(sdist)
    if actual != UPSTREAM_SHA256:
        fail(f"{sdist} has sha256 {actual}, expected {UPSTREAM_SHA256}; delete it and retry")
    print(f"pydhsa: unpacking upstream llama.cpp into {tree}", file=sys.stderr)
    unpack_tree(sdist, tree)
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--sdist", default=os.environ.get("PYDHSA_UPSTREAM_SDIST") or None)
    parser.add_argument("--export", type=Path, default=None)
    args = parser.parse_args(argv)
    tree = ensure_tree(args.cache_dir or default_cache_dir(), args.sdist)
    if args.export:
        shutil.copytree(tree, args.export, dirs_exist_ok=True)
        tree = args.export
    print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
