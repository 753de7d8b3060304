"""Retrofit a transformers Qwen3 checkpoint into a PolyGLU-family checkpoint.

Same arguments as `polyglu convert qwen3` (this script is that command):

    python conversion/convert_qwen3.py --src Qwen3-0.6B --dst qwen3-0.6b-polyglu --ffn-type polyglu [--layers top:8]
"""

import sys

from modeling_polyglu.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "qwen3", *sys.argv[1:]]))
