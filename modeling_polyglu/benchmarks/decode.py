"""The `decode` suite: prefill a prompt, then greedy decoding with the KV cache, per ffn_type, against swiglu."""

import gc
import time

import torch

from ..modeling_polyglu import CACHE_NAME, cache_of
from .harness import markdown_table, model_label, progress, ratio, run_interleaved, summarize_metric, synchronize
from .models import STEP_MODEL, STEP_MODEL_QUICK, causal_lm, model_device, model_ffn_types, random_tokens

DEFAULT_REPEATS = 5
DECODE_PROMPT, DECODE_TOKENS = 128, 32
DECODE_PROMPT_QUICK, DECODE_TOKENS_QUICK = 8, 4

COLUMNS = [
    ("ffn_type", "contender", ""), ("prefill ms", "prefill_ms", ".1f"), ("prefill / swiglu", "prefill_vs_swiglu", ".2f"),
    ("ms / token", "per_token_ms", ".2f"), ("spread", "per_token_rel_spread", "pct"),
    ("token / swiglu", "per_token_vs_swiglu", ".2f"),
]


def run(args) -> dict:
    sizes = STEP_MODEL_QUICK if args.quick else STEP_MODEL
    prompt_length = DECODE_PROMPT_QUICK if args.quick else DECODE_PROMPT
    new_tokens = args.decode_tokens or (DECODE_TOKENS_QUICK if args.quick else DECODE_TOKENS)
    device = model_device(args)
    progress(args, f"decode: {sizes} prompt={prompt_length} new={new_tokens} on {device.type}")
    prompt = random_tokens(args.seed, sizes["vocab_size"], (1, prompt_length), device)

    contenders = {}
    for ffn_type in model_ffn_types(args):
        model = causal_lm(sizes, ffn_type, args.seed, device).eval()

        @torch.no_grad()
        def decode(model=model):
            synchronize(device)
            start = time.perf_counter()
            output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            cache = cache_of(output)
            next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            prefilled = time.perf_counter()
            for _ in range(new_tokens):
                output = model(input_ids=next_token, use_cache=True, **{CACHE_NAME: cache})
                next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            end = time.perf_counter()
            return {"prefill": prefilled - start, "per_token": (end - prefilled) / new_tokens}

        contenders[ffn_type] = decode

    samples = run_interleaved(contenders, args.repeats, args.warmup)
    prefill = summarize_metric(samples, "prefill")
    per_token = summarize_metric(samples, "per_token")
    rows = [{
        "contender": name,
        "prefill_ms": prefill[name]["median"] * 1e3,
        "prefill_vs_swiglu": ratio(prefill[name]["median"], prefill["swiglu"]["median"]),
        "per_token_ms": per_token[name]["median"] * 1e3,
        "per_token_rel_spread": per_token[name]["rel_spread"],
        "per_token_samples_ms": [value * 1e3 for value in per_token[name]["samples"]],
        "per_token_vs_swiglu": ratio(per_token[name]["median"], per_token["swiglu"]["median"]),
    } for name in contenders]
    del contenders
    gc.collect()
    return {
        "description": "Eager greedy decoding with the KV cache (batch 1): prefill the prompt, then one forward per "
                       "new token; per-token time is the decode time divided by the number of new tokens.",
        "model": sizes, "prompt_tokens": prompt_length, "new_tokens": new_tokens, "device": device.type,
        "rows": rows,
    }


def render(result: dict) -> list:
    return [f"### decode: {model_label(result['model'])}, prompt {result['prompt_tokens']}, "
            f"{result['new_tokens']} new tokens, KV cache, batch 1\n\n" + markdown_table(result["rows"], COLUMNS)]
