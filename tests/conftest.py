"""Test-session settings: eager kernels (a cold torch.compile costs seconds per shape on 2 cores), offline hubs.

The tests of the compiled path turn compilation back on explicitly.
"""

import os

os.environ.setdefault("POLYGLU_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
