"""The `pydhsa` command line: a thin layer over the Python API.

    pydhsa run [MODEL.gguf | --model-name NAME] (-p PROMPT | -f FILE) [-n N] [-c CTX] [-t THREADS]
               [-b N] [-ub N] [-ctk TYPE] [-ctv TYPE] [-cnv [-sys TEXT]] [--temp T] [--top-k K] [--top-p P]
               [--min-p P] [--repeat-penalty R] [--repeat-last-n N] [--seed S] [-ngl N] [-v]
               [--dense | --dhsa] [--dhsa-budget B] [--dhsa-* ...]
    pydhsa info MODEL.gguf
    pydhsa convert IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]

Flag names follow llama.cpp. Usage and input errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
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


def add_model_arguments(p) -> None:
    """MODEL / -m / --model-name, shared by every subcommand that runs a model (see resolve_model)."""
    from .models import DEFAULT_MODEL, known_models
    p.add_argument("model", nargs="?", help=f"GGUF model file (default: the embedded model {DEFAULT_MODEL})")
    p.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help="GGUF model file (same as MODEL)")
    p.add_argument("--model-name", choices=known_models(), default=None,
                   help="an embedded model instead of a file, assembled once into the model cache from its PyPI "
                        "packages (gemma3-270m: pydhsa[model], the default; qwen2.5-coder-0.5b: pydhsa[qwen])")


def add_cache_type_arguments(p) -> None:
    """-ctk/-ctv as llama.cpp names them; validated by the engine's own list (api.cache_type_id)."""
    p.add_argument("-ctk", "--cache-type-k", default="f16", metavar="TYPE",
                   help="K cache type: f32, f16 (default), bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1; DHSA reads "
                        "f32/f16/bf16/q8_0, other types run those layers dense")
    p.add_argument("-ctv", "--cache-type-v", default="f16", metavar="TYPE",
                   help="V cache type (same choices; a quantised V cache needs flash attention)")


def _add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt", description="Generate text from a prompt; the "
                       "text streams to stdout, timings go to stderr.")
    add_model_arguments(p)
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
    add_cache_type_arguments(p)
    p.add_argument("-cnv", "--chat", action="store_true",
                   help="wrap the prompt as one user turn in the model's chat template (from the GGUF; for "
                        "instruct models such as qwen2.5-coder-0.5b); one turn, not an interactive session")
    p.add_argument("-sys", "--system-prompt", default=None, help="system message for --chat")
    p.add_argument("--temp", type=_float_in("--temp", 0.0, 100.0), default=0.8,
                   help="temperature (default 0.8; 0 = greedy)")
    p.add_argument("--top-k", type=_int_in("--top-k", 0, 1 << 24), default=40,
                   help="top-k sampling (default 40; 0 = off)")
    p.add_argument("--top-p", type=_float_in("--top-p", 0.0, 1.0), default=0.95,
                   help="top-p sampling (default 0.95; 1 = off)")
    p.add_argument("--min-p", type=_float_in("--min-p", 0.0, 1.0), default=0.05,
                   help="min-p sampling (default 0.05; 0 = off)")
    p.add_argument("--repeat-penalty", type=_float_in("--repeat-penalty", 0.01, 100.0), default=1.0,
                   help="penalise repeats of the last --repeat-last-n tokens (default 1.0 = off)")
    p.add_argument("--repeat-last-n", type=_int_in("--repeat-last-n", -1, 1 << 24), default=64,
                   help="tokens the repeat penalty looks back over (default 64; 0 = off, -1 = the context)")
    p.add_argument("--seed", type=_int_in("--seed", -1, 2**32 - 1), default=-1,
                   help="sampling seed (default -1 = random)")
    p.add_argument("-ngl", "--n-gpu-layers", type=_int_in("-ngl", -1, 100000), default=0,
                   help="layers to offload to the GPU (default 0; -1 = all)")
    p.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto",
                   help="flash attention for dense runs (default auto, as llama.cpp; DHSA always uses its own kernel)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the DHSA settings and the attention density actually used")
    p.add_argument("--engine-log", action="store_true", help="show llama.cpp's own log on stderr")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="prefill progress on stderr (tokens done, tok/s, ETA); default: on a terminal, for "
                        "prompts longer than one batch")
    add_attention_mode_arguments(p)
    p.set_defaults(handler=cmd_run)


def add_attention_mode_arguments(p) -> None:
    """--dense / --dhsa and every --dhsa-* flag (read by dhsa_config_for_run)."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dense", action="store_true",
                      help="dense attention (upstream flash attention), ignoring any DHSA keys in the file")
    mode.add_argument("--dhsa", action="store_true",
                      help="DHSA with the file's settings, else the built-in defaults (implied by any --dhsa-* flag "
                           "and by DHSA keys in the file)")
    from .dhsa_params import add_dhsa_arguments
    add_dhsa_arguments(p)


def _add_perplexity_parser(sub) -> None:
    from . import perplexity
    p = sub.add_parser(
        "perplexity", help="perplexity of a text, and KL divergence against dense (--kl-divergence)",
        description="Perplexity of a text in windows of -c tokens, as llama.cpp's llama-perplexity; with "
                    "--kl-divergence also dense attention on the same tokens: mean, median, 99th percentile and "
                    "maximum KL divergence of the next-token distributions and top-token agreement, for all "
                    "positions and for those that ran sparse, with 95%% confidence intervals.")
    perplexity.add_arguments(p)
    p.set_defaults(handler=perplexity.run)


def _add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="show a GGUF model's architecture and DHSA settings",
                       description="Show a GGUF file's architecture, attention shape, quantisation and DHSA keys "
                                   "(from the header), and per layer whether DHSA would apply (from the engine, "
                                   "which reads the metadata and tensor shapes, not the weights).")
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--dhsa-layers", choices=["global", "all"], default=None,
                   help="the layer set to plan for (default: the file's key, else global)")
    add_cache_type_arguments(p)
    p.set_defaults(handler=cmd_info)


def _add_convert_parser(sub) -> None:
    from pydhsa_convert.gguf_dhsa import add_convert_arguments
    p = sub.add_parser("convert", help="write a GGUF with DHSA keys added, changed or removed",
                       description="Copy a GGUF file with <arch>.dhsa.* keys added, changed or removed; all other "
                                   "metadata and the tensor data are copied byte for byte.")
    add_convert_arguments(p)
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args) -> int:
    from pydhsa_convert.gguf_dhsa import run_convert
    return run_convert(args, error_prefix="pydhsa: error: ")


def _add_lib_path_parser(sub) -> None:
    p = sub.add_parser(
        "lib-path", help="print the folder of our libllama (for LLAMA_CPP_LIB_PATH)",
        description="Print the folder holding this package's libllama and ggml libraries. Stock "
                    "llama-cpp-python loads them instead of its own with "
                    "LLAMA_CPP_LIB_PATH=$(pydhsa lib-path); a GGUF with DHSA keys (or PYDHSA_DHSA set) then "
                    "runs DHSA there.")
    p.set_defaults(handler=cmd_lib_path)


def cmd_lib_path(args) -> int:
    from ._native import library_file, lib_dir
    directory = lib_dir()
    if not library_file(directory, "llama").exists():
        raise UsageError(f"no libllama in {directory}: is the package installed (pip install .)?")
    print(directory)
    return 0


# llama.cpp's programs, built into the package with the PYDHSA_BUILD_TOOLS option: `pydhsa <command> ARGS`
# runs the program with ARGS unchanged, on our libllama (so a GGUF with DHSA keys, or PYDHSA_DHSA, runs DHSA).
TOOL_COMMANDS = {"server": "llama-server", "cli": "llama-cli", "llama-bench": "llama-bench"}
TOOLS_INSTALL_HINT = 'CMAKE_ARGS="-DPYDHSA_BUILD_TOOLS=ON" pip install .'


def _add_tool_parsers(sub) -> None:
    for command, program in TOOL_COMMANDS.items():
        sub.add_parser(command, add_help=False, help=f"run llama.cpp's {program} from the fork (arguments pass "
                       f"straight through; needs {TOOLS_INSTALL_HINT})")


def run_tool(command: str, argv: Sequence[str]) -> int:
    """Replace this process with the fork's build of a llama.cpp program (never returns on success)."""
    from ._native import lib_dir
    program = lib_dir() / (TOOL_COMMANDS[command] + (".exe" if sys.platform == "win32" else ""))
    if not program.exists():
        raise UsageError(f"{program.name} is not installed: pydhsa was built without llama.cpp's programs; "
                         f"reinstall with {TOOLS_INSTALL_HINT}")
    sys.stdout.flush()
    if sys.platform == "win32":
        import subprocess
        return subprocess.call([str(program), *argv])
    os.execv(str(program), [str(program), *argv])
    raise AssertionError("unreachable")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pydhsa", description="Dynamic Hierarchical Sparse Attention for GGUF models.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"pydhsa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_run_parser(sub)
    _add_info_parser(sub)
    _add_convert_parser(sub)
    _add_lib_path_parser(sub)
    _add_perplexity_parser(sub)
    _add_tool_parsers(sub)
    from .cli_eval import add_eval_parsers
    add_eval_parsers(sub)
    return parser


def _read_prompt(args) -> str:
    if args.file is not None:
        path = Path(args.file)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"prompt file not found: {path}") from None
        except OSError as e:
            raise UsageError(f"cannot read prompt file {path}: {e.strerror or e}") from None
        where = f"prompt file {path}"
    else:
        # a command line argument that is not UTF-8 reaches Python with its bad bytes as surrogates
        data = os.fsencode(args.prompt)
        where = "-p prompt"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"the {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text:
        raise UsageError("the prompt is empty")
    return text


def resolve_model(args) -> Path:
    """The model file of MODEL / -m / --model-name (default: the embedded default model)."""
    if args.model and args.model_flag and args.model != args.model_flag:
        raise UsageError("give the model once: as MODEL or with -m")
    chosen = args.model or args.model_flag
    if chosen and args.model_name:
        raise UsageError("give either a model file or --model-name, not both")
    if chosen:
        return Path(chosen)
    from .models import model_path
    return model_path(args.model_name)


def prompt_tokens(model, text: str, chat: bool = False, system: Optional[str] = None) -> list:
    """The tokens of a prompt: as written (with the model's BOS), or, with chat, as one user turn in the
    model's chat template, whose text already holds any BOS the template wants."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        formatted = model.chat_prompt(messages, add_assistant=True)
        with_special, plain = model.tokenize(formatted, add_special=True), model.tokenize(formatted, add_special=False)
        # The template wrote the BOS itself when adding one more puts a second copy in front.
        doubled = len(with_special) == len(plain) + 1 and plain[:1] == with_special[:1]
        return plain if doubled else with_special
    if system:
        raise UsageError("-sys/--system-prompt needs -cnv/--chat")
    return model.tokenize(text, add_special=True)


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


def _report_routes(session) -> None:
    """-v: which layers ran DHSA and why the others ran dense (the engine's per-layer routes)."""
    routes = session.dhsa_routes()
    if not routes:
        return
    parts = [f"{route}: {_layer_list(layers)}" for route, layers in _layers_by_route(sorted(routes.items())).items()]
    print(f"pydhsa: DHSA layers | {' | '.join(parts)}", file=sys.stderr)


def _layers_by_route(pairs) -> dict:
    """(layer, route) pairs -> {route: [layers]}, routes in order of first appearance."""
    groups: dict = {}
    for il, route in pairs:
        groups.setdefault(route, []).append(il)
    return groups


def _layer_list(layers: list) -> str:
    """[0, 1, 2, 5, 7, 8] -> "L0-2, L5, L7-8"."""
    spans, start = [], None
    for i, il in enumerate(layers):
        if start is None:
            start = il
        if i + 1 == len(layers) or layers[i + 1] != il + 1:
            spans.append(f"L{start}" if start == il else f"L{start}-{il}")
            start = None
    return ", ".join(spans)


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


class PrefillProgress:
    """`prefill 8192/16384 tokens (50%) | 1520 tok/s | ETA 5 s` on one line of stderr (a line per update
    when stderr is not a terminal); called by Session.prefill after each batch."""

    def __init__(self, stream, clock=time.monotonic):
        self.stream, self.clock, self.start = stream, clock, clock()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"pydhsa: prefill {done}/{total} tokens ({done / total:.0%}) | {rate:.0f} tok/s | ETA {eta:.0f} s"
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        """Ends the line before generated text or timings follow; returns None (no more updates)."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return None


def _exit_on_ctrl_c() -> None:
    """Ctrl-C ends `pydhsa run` at once: the handler runs in the main thread within a moment (it waits on
    the engine's worker thread in short joins), flushes what was printed and leaves with status 130. It
    does not cancel the engine and free the context first: a cancel during prefill followed by teardown
    crashed once in 3 runs of the test (glibc "double free", not yet understood), and a process that is
    leaving has nothing to free."""
    import signal

    def handler(_signum, _frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.write(2, b"\npydhsa: interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, handler)


def cmd_run(args) -> int:
    from .api import Model
    from .gguf_info import check_model_path

    from .api import cache_type_id
    _exit_on_ctrl_c()
    prompt = _read_prompt(args)
    cache_type_id(args.cache_type_k), cache_type_id(args.cache_type_v)  # a bad name fails before loading
    model_path = check_model_path(resolve_model(args))
    dhsa = dhsa_config_for_run(args, model_path)
    if args.verbose:
        print(f"pydhsa: attention: {'dense' if dhsa is None else dhsa}", file=sys.stderr)
    with Model(model_path, n_gpu_layers=args.n_gpu_layers, verbose=args.engine_log) as model:
        with model.session(n_ctx=args.ctx_size, n_threads=args.threads, n_batch=args.batch_size,
                           n_ubatch=args.ubatch_size, verbose=args.engine_log, dhsa=dhsa,
                           flash_attn={"on": True, "off": False, "auto": None}[args.flash_attn],
                           type_k=args.cache_type_k, type_v=args.cache_type_v) as session:
            tokens = prompt_tokens(model, prompt, args.chat, args.system_prompt)
            if len(tokens) > session.n_ctx:
                raise UsageError(f"the prompt is {len(tokens)} tokens but the context holds {session.n_ctx}; "
                                 f"raise -c (the model allows up to {model.info.n_ctx_train})")
            seed = None if args.seed == -1 else args.seed
            show = args.progress if args.progress is not None else sys.stderr.isatty() and len(tokens) > args.batch_size
            progress = PrefillProgress(sys.stderr) if show else None
            for piece in session.generate(tokens, max_tokens=args.n_predict, temperature=args.temp, seed=seed,
                                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                                          progress=progress):
                if progress is not None:
                    progress = progress.finish()
                sys.stdout.write(piece)
                sys.stdout.flush()
            if progress is not None:
                progress.finish()
            sys.stdout.write("\n")
            sys.stdout.flush()
            t = session.timings()
            print(f"pydhsa: prompt {t.n_prefill} tokens in {t.t_prefill_ms / 1e3:.2f} s ({t.prefill_tok_s:.1f} tok/s)"
                  f" | generated {t.n_generate} tokens in {t.t_generate_ms / 1e3:.2f} s ({t.generate_tok_s:.1f} tok/s)"
                  f" | load {t.t_load_ms / 1e3:.2f} s | peak memory {_mib(t.peak_rss_bytes)}"
                  f" | threads {session.n_threads}", file=sys.stderr)
            if t.n_past >= session.n_ctx and args.n_predict != 0 and t.n_generate != args.n_predict:
                print(f"pydhsa: the context is full ({session.n_ctx} tokens): generation stopped after "
                      f"{t.n_generate} token{'s' if t.n_generate != 1 else ''}; raise -c for more", file=sys.stderr)
            if args.verbose:
                _report_routes(session)
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
    _print_dhsa_plan(args, info)
    return 0


def _print_dhsa_plan(args, info) -> None:
    """Per layer, what DHSA would do with this file (the engine's rules; see llama_dhsa_layer_route)."""
    from .api import Model
    from .dhsa_params import DhsaConfig

    layers = args.dhsa_layers or info.dhsa_keys.get(f"{info.architecture}.dhsa.layers") or "global"
    try:
        with Model(info.path, metadata_only=True) as model:
            plan = model.dhsa_plan(DhsaConfig(layers=layers), args.cache_type_k, args.cache_type_v)
    except PydhsaError as e:
        print(f"dhsa plan: unavailable (the engine cannot load this file: {e})")
        return
    print(f"dhsa plan (layers={layers}, K {args.cache_type_k}, V {args.cache_type_v}):")
    for route, ils in _layers_by_route(enumerate(plan)).items():
        print(f"  {route}: {len(ils)} layers ({_layer_list(ils)})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TOOL_COMMANDS:  # before argparse: every argument is the program's
            return run_tool(argv[0], argv[1:])
    except UsageError as e:
        print(f"pydhsa: error: {e}", file=sys.stderr)
        return EXIT_USAGE
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
