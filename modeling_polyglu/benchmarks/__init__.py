"""`polyglu bench`: a shared harness (interleaved timing, saved bytes, tables, JSON), the benchmark subjects, and one
module per suite (ffn, hard, step, decode, generate, convert)."""
