#!/usr/bin/env python3
"""Make a patched copy of the pristine upstream tree: the fork's numbered patch series, applied in order.

A patch must apply exactly: any fuzz, offset or rejected hunk stops the build with the patch's name and
patch(1)'s own report, because a hunk that lands a few lines away from where it was written can compile
and still be wrong. The patched tree goes to a fresh directory (never the pristine cache) whose name is
derived from the upstream tree and the patch contents, so an unchanged series is reused between builds
(and compiler caches see stable paths), and a changed one can never be mixed with an old copy.

Usage:  apply_patches.py UPSTREAM_TREE PATCH_DIR DEST_PARENT   (prints the patched tree's path last)
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STAMP = ".pydhsa-patched"
# patch(1) reports inexact application in these words even when it exits 0.
INEXACT = re.compile(r"offset|fuzz|FAILED|reject|malformed|Reversed|ignored|can't find file", re.IGNORECASE)
# Trees are copied without these (they are large and nothing we build reads them).
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__")


class PatchError(RuntimeError):
    pass


def patch_series(patch_dir: Path) -> list[Path]:
    patches = sorted(patch_dir.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    stray = [p.name for p in patch_dir.glob("*.patch") if p not in patches]
    if stray:
        raise PatchError(f"patch files not named NNNN-topic.patch: {', '.join(stray)}")
    return patches


def series_digest(upstream: Path, patches: list[Path]) -> str:
    digest = hashlib.sha256()
    stamp = upstream / ".pydhsa-upstream-complete"
    digest.update(stamp.read_bytes() if stamp.exists() else str(upstream.resolve()).encode())
    for p in patches:
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def apply_one(tree: Path, patch: Path) -> None:
    cmd = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
           "--reject-file=-", "-i", str(patch.resolve())]
    try:
        result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    except FileNotFoundError:
        raise PatchError("the `patch` program is required to build pydhsa (install it, e.g. apt install patch)")
    report = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or INEXACT.search(report):
        raise PatchError(f"patch {patch.name} does not apply exactly to the pinned upstream tree:\n{report}")


def apply_series(upstream: Path, patch_dir: Path, dest_parent: Path) -> Path:
    patches = patch_series(patch_dir)
    dest = dest_parent / f"llama.cpp-patched-{series_digest(upstream, patches)}"
    if (dest / STAMP).exists():
        return dest
    dest_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest_parent))
    try:
        work = tmp / "tree"
        shutil.copytree(upstream, work, ignore=COPY_IGNORE, symlinks=True)
        for patch in patches:
            print(f"pydhsa: applying {patch.name}", file=sys.stderr)
            apply_one(work, patch)
        (work / STAMP).write_text("\n".join(p.name for p in patches) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(work, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        dest = apply_series(Path(argv[0]), Path(argv[1]), Path(argv[2]))
    except PatchError as e:
        print(f"pydhsa apply_patches: error: {e}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
