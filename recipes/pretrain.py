"""Pretraining recipes: the entry points of `polyglu pretrain` and `polyglu compare` (see recipes/README.md).

    python recipes/pretrain.py --config recipes/pretrain/models/qwen3-83m.json --dataset DATA --max_steps 400 ...
    python recipes/pretrain.py compare --config recipes/pretrain/dynamic_geglu_83m.yaml --output_dir runs/dyn-geglu
"""

import sys

from modeling_polyglu.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    command = ["compare", *arguments[1:]] if arguments[:1] == ["compare"] else ["pretrain", *arguments]
    sys.exit(main(command))  # through the CLI: a user's mistake is one line on every rank
