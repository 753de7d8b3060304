"""Import a PolychromaticLM checkpoint of the reference PolyGLU implementation.

Same arguments as `polyglu convert polychromatic` (this script is that command):

    python conversion/convert_polychromatic.py --src portable_final.pt --dst polychromatic-base --tokenizer Qwen3-0.6B-Base
"""

import sys

from modeling_polyglu.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "polychromatic", *sys.argv[1:]]))
