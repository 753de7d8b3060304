"""Making and shipping checkpoints: the Qwen3 retrofit, the PolychromaticLM import, shard and config I/O with the
remote-code files, atomic staging of output directories, model cards, and the fresh-process check that a written
checkpoint loads by its own code where this package is absent."""
