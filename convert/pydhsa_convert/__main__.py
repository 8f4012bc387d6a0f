"""``python -m pydhsa_convert gguf IN.gguf OUT.gguf [--dhsa-* ...] [--remove-dhsa]``"""
import sys

from .gguf_dhsa import main

if __name__ == "__main__":
    sys.exit(main())
