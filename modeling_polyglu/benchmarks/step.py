"""The `step` suite: one training step (forward + backward + AdamW) of a small causal LM per ffn_type, against swiglu."""

import gc

import torch

from .harness import markdown_table, model_label, progress, run_interleaved, summarize_metric, time_vs_swiglu, timed
from .models import STEP_MODEL, STEP_MODEL_QUICK, causal_lm, model_device, model_ffn_types, random_tokens

DEFAULT_REPEATS = 3
STEP_BATCH, STEP_TOKENS = 2, 512
STEP_BATCH_QUICK, STEP_TOKENS_QUICK = 2, 16

COLUMNS = [
    ("ffn_type", "contender", ""), ("params", "params", ","), ("step ms", "time_ms", ".0f"),
    ("spread", "time_rel_spread", "pct"), ("step / swiglu", "time_vs_swiglu", ".2f"),
    ("paired", "time_vs_swiglu_paired", ".2f"),
]


def run(args) -> dict:
    sizes = STEP_MODEL_QUICK if args.quick else STEP_MODEL
    batch, tokens = (STEP_BATCH_QUICK, STEP_TOKENS_QUICK) if args.quick else (STEP_BATCH, STEP_TOKENS)
    device = model_device(args)
    progress(args, f"step: {sizes} tokens={batch}x{tokens} on {device.type}")
    input_ids = random_tokens(args.seed, sizes["vocab_size"], (batch, tokens), device)

    contenders, params = {}, {}
    for ffn_type in model_ffn_types(args):
        model = causal_lm(sizes, ffn_type, args.seed, device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=False)
        params[ffn_type] = sum(p.numel() for p in model.parameters())

        def train_step(model=model, optimizer=optimizer):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        contenders[ffn_type] = timed(train_step, device)

    times = summarize_metric(run_interleaved(contenders, args.repeats, args.warmup))
    rows = [{"contender": name, "params": params[name], **time_vs_swiglu(times, name)} for name in contenders]
    del contenders
    gc.collect()
    return {
        "description": "One training step (forward with loss, backward, AdamW step, zero_grad) of a causal LM; "
                       "fp32, training mode.",
        "model": sizes, "batch": batch, "tokens": tokens, "device": device.type, "rows": rows,
    }


def render(result: dict) -> list:
    return [f"### step: {model_label(result['model'])} tokens={result['batch']}x{result['tokens']} "
            "(forward + backward + AdamW)\n\n" + markdown_table(result["rows"], COLUMNS)]
