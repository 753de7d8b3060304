"""Tests of modeling_polyglu.conversion: the Qwen3 retrofit and the PolychromaticLM import."""
