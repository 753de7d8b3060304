"""Peak memory of streaming `convert qwen3` on synthetic multi-GB Qwen3 checkpoints: `polyglu bench --suite convert`.

    python benchmarks/conversion_memory.py                                   # 3 GB, 256 and 1024 MB shards
    python benchmarks/conversion_memory.py --convert-total-gb 6 --convert-shard-mb 512,2048
"""

import sys
from pathlib import Path

# allow running from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_polyglu.benchmarks.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--suite", "convert", *sys.argv[1:]]))
