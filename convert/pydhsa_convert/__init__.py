"""Model file converters for pydhsa.

``python -m pydhsa_convert gguf IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]`` copies a GGUF file with
its ``<arch>.dhsa.*`` metadata keys added, changed or removed (see ``pydhsa_convert.gguf_dhsa``).
"""
from .gguf_dhsa import (
    ConvertError,
    ConvertIOError,
    ConvertResult,
    GgufLayout,
    add_convert_arguments,
    build_parser,
    convert_gguf,
    inspect_gguf,
    main,
    run_convert,
)

__all__ = [
    "ConvertError", "ConvertIOError", "ConvertResult", "GgufLayout", "add_convert_arguments",
    "build_parser", "convert_gguf", "inspect_gguf", "main", "run_convert",
]
