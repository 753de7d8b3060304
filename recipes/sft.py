"""SFT recipe for PolyGLU-family models: the same entry point as `polyglu sft` (see recipes/README.md).

    python recipes/sft.py --config recipes/polyglu_full.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/sft.py --config recipes/polyglu_lora.yaml
"""

import sys

from modeling_polyglu.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))  # through the CLI: a user's mistake is one line on every rank
