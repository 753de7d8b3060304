"""Training with TRL and looking at the routing: the `polyglu sft` entry point, the trainer, the τ and
routing-monitor callbacks, routing statistics and reports, `polyglu inspect`, and LoRA for PEFT."""
