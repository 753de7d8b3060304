"""Test-session settings: eager kernels (a cold torch.compile costs seconds per shape on 2 cores), offline hubs.

The tests of the compiled path turn compilation back on explicitly.
"""

import os

os.environ.setdefault("POLYGLU_DISABLE_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # property tests: CI runs a fixed set of examples (a failure there is reproducible); local runs explore
    from hypothesis import settings as hypothesis_settings

    hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI"):
        hypothesis_settings.load_profile("ci")
except ImportError:  # the oldest-transformers venv may lack hypothesis
    pass
