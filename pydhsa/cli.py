"""The `pydhsa` command line: a thin layer over the Python API.

    pydhsa run [MODEL.gguf] (-p PROMPT | -f FILE) [-n N] [-c CTX] [-t THREADS] [-b N] [-ub N]
               [--temp T] [--seed S] [-ngl N] [-v] [--dense | --dhsa] [--dhsa-budget B] [--dhsa-* ...]
    pydhsa info MODEL.gguf
    pydhsa convert IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]

Flag names follow llama.cpp. Usage and input errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import PydhsaError

EXIT_USAGE = 2
MAX_TOKENS_LIMIT = 10_000_000
MAX_BATCH = 1 << 20


class UsageError(Exception):
    """A problem with the command line or its inputs: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_in(name: str, lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be between {lo} and {hi}, got {value}")
        return value
    return parse


def _float_in(name: str, lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise argparse.ArgumentTypeError(f"{name} must be between {lo} and {hi}, got {text}")
        return value
    return parse


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt", description="Generate text from a prompt; the "
                       "text streams to stdout, timings go to stderr.")
    p.add_argument("model", nargs="?", help="GGUF model file (default: the embedded Gemma 3 270M, pydhsa[model])")
    p.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help="GGUF model file (same as MODEL)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("-n", "--n-predict", type=_int_in("-n", -1, MAX_TOKENS_LIMIT), default=128,
                   help="tokens to generate (default 128; -1 = until end of text or a full context)")
    p.add_argument("-c", "--ctx-size", type=_int_in("-c", 0, 1 << 24), default=4096,
                   help="context size in tokens (default 4096; 0 = the model's training context)")
    p.add_argument("-t", "--threads", type=_int_in("-t", 1, 1024), default=None,
                   help="CPU threads (default: all available cores)")
    p.add_argument("-b", "--batch-size", type=_int_in("-b", 1, MAX_BATCH), default=2048,
                   help="logical batch size (default 2048)")
    p.add_argument("-ub", "--ubatch-size", type=_int_in("-ub", 1, MAX_BATCH), default=512,
                   help="physical batch size (default 512)")
    p.add_argument("--temp", type=_float_in("--temp", 0.0, 100.0), default=0.8,
                   help="temperature (default 0.8; 0 = greedy)")
    p.add_argument("--seed", type=_int_in("--seed", -1, 2**32 - 1), default=-1,
                   help="sampling seed (default -1 = random)")
    p.add_argument("-ngl", "--n-gpu-layers", type=_int_in("-ngl", -1, 100000), default=0,
                   help="layers to offload to the GPU (default 0; -1 = all)")
    p.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                   help="flash attention for dense runs (default auto, as llama.cpp; DHSA always uses its own kernel)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the DHSA settings and the attention density actually used")
    p.add_argument("--engine-log", action="store_true", help="show llama.cpp's own log on stderr")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true",
                      help="dense attention (upstream flash attention), ignoring any DHSA keys in the file")
    mode.add_argument("--dhsa", action="store_true",
                      help="DHSA with the file's settings, else the built-in defaults (implied by any --dhsa-* flag "
                           "and by DHSA keys in the file)")
    from .dhsa_params import add_dhsa_arguments
    add_dhsa_arguments(p)
    p.set_defaults(handler=cmd_run)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="show a GGUF model's architecture and DHSA settings",
                       description="Show a GGUF file's architecture, attention shape, quantisation and DHSA keys "
                                   "(reads the header only).")
    p.add_argument("model", help="GGUF model file")
    p.set_defaults(handler=cmd_info)


def _add_convert_parser(sub) -> None:
    from convert.gguf_dhsa import add_convert_arguments
    p = sub.add_parser("convert", help="write a GGUF with DHSA keys added, changed or removed",
                       description="Copy a GGUF file with <arch>.dhsa.* keys added, changed or removed; all other "
                                   "metadata and the tensor data are copied byte for byte.")
    add_convert_arguments(p)
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args) -> int:
    from convert.gguf_dhsa import run_convert
    return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pydhsa", description="Dynamic Hierarchical Sparse Attention for GGUF models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"pydhsa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_run_parser(sub)
    _add_info_parser(sub)
    _add_convert_parser(sub)
    from .cli_eval import add_eval_parsers
    add_eval_parsers(sub)
    return parser


def _read_prompt(args) -> str:
    if args.file is not None:
        path = Path(args.file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"prompt file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt file {path}: {e}") from None
    else:
        text = args.prompt
    if not text:
        raise UsageError("the prompt is empty")
    return text


def _resolve_model(args) -> Path:
    if args.model and args.model_flag and args.model != args.model_flag:
        raise UsageError("give the model once: as MODEL or with -m")
    chosen = args.model or args.model_flag
    if chosen:
        return Path(chosen)
    from .default_model import default_model_path
    return default_model_path()


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 20):.0f} MiB"


def dhsa_config_for_run(args, model_path: Path):
    """The DHSA settings of a run (None = dense): flags over the file's keys over built-in defaults.
    DHSA is on when asked for (--dhsa or any --dhsa-* flag) or when the file carries DHSA keys."""
    from .dhsa_params import cli_values, config_from_args, read_gguf_dhsa

    flags = cli_values(args)
    if args.dense and flags:
        raise UsageError(f"--dense cannot be combined with --dhsa-* flags (got {', '.join(sorted(flags))})")
    if args.dense:
        return None
    file_values = read_gguf_dhsa(model_path)
    if not (args.dhsa or flags or file_values):
        return None
    return config_from_args(args, file_values)


def _report_density(session, n_gpu_layers: int = 0) -> None:
    density = session.dhsa_density()
    if density is None:
        return
    if density.overall is None:
        if n_gpu_layers != 0:
            message = "not counted for layers on the GPU (the CUDA kernels do not report it)"
        else:
            message = "no layer ran DHSA (context below min_context, or no eligible layer)"
        print(f"pydhsa: DHSA density: {message}", file=sys.stderr)
        return
    layers = ", ".join(f"L{il} {d:.3f}" for il, d in sorted(density.per_layer.items()))
    print(f"pydhsa: DHSA density {density.overall:.3f} overall (computed / causal query-key pairs) | {layers}",
          file=sys.stderr)


def cmd_run(args) -> int:
    from .api import Model
    from .gguf_info import check_model_path

    prompt = _read_prompt(args)
    model_path = check_model_path(_resolve_model(args))
    dhsa = dhsa_config_for_run(args, model_path)
    if args.verbose:
        print(f"pydhsa: attention: {'dense' if dhsa is None else dhsa}", file=sys.stderr)
    with Model(model_path, n_gpu_layers=args.n_gpu_layers, verbose=args.engine_log) as model:
        with model.session(n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                           n_ubatch=args.ubatch_size, verbose=args.engine_log, dhsa=dhsa,
                           flash_attn={"on": True, "off": False, "auto": None}[args.flash_attn]) as session:
            tokens = model.tokenize(prompt, add_special=True)
            if len(tokens) > session.n_ctx:
                raise UsageError(f"the prompt is {len(tokens)} tokens but the context holds {session.n_ctx}; "
                                 f"raise -c (the model allows up to {model.info.n_ctx_train})")
            seed = None if args.seed == -1 else args.seed
            for piece in session.generate(tokens, max_tokens=args.n_predict, temperature=args.temp, seed=seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            t = session.timings()
            print(f"pydhsa: prompt {t.n_prefill} tokens in {t.t_prefill_ms / 1e3:.2f} s ({t.prefill_tok_s:.1f} tok/s)"
                  f" | generated {t.n_generate} tokens in {t.t_generate_ms / 1e3:.2f} s ({t.generate_tok_s:.1f} tok/s)"
                  f" | load {t.t_load_ms / 1e3:.2f} s | peak memory {_mib(t.peak_rss_bytes)}"
                  f" | threads {session.n_threads}", file=sys.stderr)
            if args.verbose:
                _report_density(session, args.n_gpu_layers)
    return 0


def cmd_info(args) -> int:
    from .gguf_info import file_type_name, read_gguf_info, swa_pattern

    info = read_gguf_info(args.model)
    n_head = info.arch_value("attention.head_count")
    n_embd = info.arch_value("embedding_length")
    head_dim = info.arch_value("attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    window = info.arch_value("attention.sliding_window")
    pattern = swa_pattern(info)
    rows = [
        ("file", str(info.path)),
        ("name", info.metadata.get("general.name", "")),
        ("architecture", info.architecture),
        ("layers", info.arch_value("block_count")),
        ("heads", n_head),
        ("kv heads", info.arch_value("attention.head_count_kv", n_head)),
        ("head size", head_dim),
        ("embedding", n_embd),
        ("context length", info.arch_value("context_length")),
        ("sliding window", window or "none"),
        ("window pattern", f"every {pattern}th layer global, the others windowed" if pattern else "n/a"),
        ("quantisation", file_type_name(info)),
        ("tensors", f"{info.n_tensors} ({', '.join(f'{k} x{v}' for k, v in sorted(info.tensor_types.items()))})"),
        ("tensor data", _mib(info.data_bytes)),
    ]
    dhsa = info.dhsa_keys
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if dhsa:
        print("dhsa keys:")
        for key, value in sorted(dhsa.items()):
            print(f"  {key} = {value}")
    else:
        print(f"{'dhsa keys':<{width}}  none (built-in defaults apply when DHSA is asked for)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.handler(args)
    except (UsageError, PydhsaError, ValueError) as e:
        print(f"pydhsa: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pydhsa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
