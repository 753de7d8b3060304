"""Tests of modeling_polyglu.training: `polyglu sft` with its callbacks and `polyglu inspect`, distributed SFT, PEFT."""
