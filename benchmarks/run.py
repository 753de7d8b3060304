"""Run the PolyGLU benchmark suites without the console script: same arguments as `polyglu bench`.

    python benchmarks/run.py --suite ffn
    python benchmarks/run.py --suite all --quick --json /tmp/bench.json
"""

import sys
from pathlib import Path

# allow running from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_polyglu.benchmarks.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
