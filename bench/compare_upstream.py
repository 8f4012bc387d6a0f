#!/usr/bin/env python3
"""Greedy output of `pydhsa run` versus upstream's own `llama-completion`, same prompt, same model.

The upstream binary is built from the pristine pinned tree (no pydhsa patches) into the pydhsa cache,
unless --llama-completion points at one. Both run greedy decoding with the same context, batch and
thread settings; the script prints both continuations and exits 0 only if they are identical.

    python bench/compare_upstream.py [--model M.gguf] [--tokens 4000] [-n 32] [--depth 0.5]

The default prompt is the Needle-in-a-Haystack prompt of the end-to-end test (about 4,000 tokens).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "native"))
import fetch_upstream  # noqa: E402


def build_llama_completion(jobs: int) -> Path:
    tree = fetch_upstream.ensure_tree(fetch_upstream.default_cache_dir(), None)
    build = fetch_upstream.default_cache_dir() / "upstream-build"
    binary = build / "bin" / "llama-completion"
    if binary.exists():
        return binary
    print(f"building upstream llama-completion from the pristine tree {tree} into {build} ...", file=sys.stderr)
    launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] \
        if subprocess.run(["which", "ccache"], capture_output=True).returncode == 0 else []
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON",
                    *launcher], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-completion", "-j", str(jobs)], check=True,
                   stdout=subprocess.DEVNULL)
    return binary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("--llama-completion", default=None, help="an upstream llama-completion binary")
    ap.add_argument("--tokens", type=int, default=4000, help="NIAH prompt length in tokens")
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("-n", type=int, default=32, help="tokens to generate")
    ap.add_argument("-t", type=int, default=os.cpu_count() or 1)
    ap.add_argument("-j", type=int, default=os.cpu_count() or 1, help="build jobs")
    args = ap.parse_args()

    from pydhsa import Model, niah
    from pydhsa.default_model import default_model_path

    model_path = Path(args.model) if args.model else default_model_path()
    with Model(model_path) as model:
        prompt = niah.build_prompt(lambda s: len(model.tokenize(s)), args.tokens, args.depth, niah.NEEDLES[0])
    ctx = str(prompt.n_tokens + args.n + 64)
    binary = Path(args.llama_completion) if args.llama_completion else build_llama_completion(args.j)

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(prompt.text)
        prompt_file = f.name
    try:
        common = ["-f", prompt_file, "-n", str(args.n), "--temp", "0", "-c", ctx, "-t", str(args.t),
                  "-b", "2048", "-ub", "512"]
        ours = subprocess.run([sys.executable, "-m", "pydhsa", "run", str(model_path), *common],
                              capture_output=True, text=True, check=True).stdout
        theirs = subprocess.run([str(binary), "-m", str(model_path), *common, "-no-cnv", "--no-display-prompt",
                                 "--simple-io", "--no-warmup"], capture_output=True, text=True, check=True,
                                stdin=subprocess.DEVNULL).stdout
    finally:
        os.unlink(prompt_file)
    ours, theirs = ours.rstrip("\n"), theirs.rstrip("\n")
    print(f"prompt: {prompt.n_tokens} tokens, needle {prompt.expected!r} at depth {args.depth}")
    print(f"pydhsa run        : {ours!r}")
    print(f"llama-completion  : {theirs!r}")
    same = ours == theirs
    print("IDENTICAL" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
