"""The `generate` suite: `model.generate` with the KV cache against a reference-style loop without cache.

The no-cache loop re-runs the full sequence for every new token, as the reference's generation does; the model is a
causal-routed polyglu, timed at several generation lengths.
"""

import gc

import torch

from .harness import markdown_table, model_label, progress, ratio, run_interleaved, summarize, timed
from .models import STEP_MODEL_QUICK, causal_lm, model_device, random_tokens

DEFAULT_REPEATS = 3
GENERATE_MODEL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=32768,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64)
GENERATE_MODEL_QUICK = STEP_MODEL_QUICK
GENERATE_PROMPT, GENERATE_LENGTHS = 128, (64, 128, 256)
GENERATE_PROMPT_QUICK, GENERATE_LENGTHS_QUICK = 8, (4, 8)

COLUMNS = [
    ("new tokens", "new_tokens", "d"), ("cached s", "cached_s", ".2f"), ("cached ms/token", "cached_ms_per_token", ".1f"),
    ("no-cache s", "no_cache_s", ".2f"), ("no-cache ms/token", "no_cache_ms_per_token", ".1f"),
    ("speedup", "speedup", ".1f"), ("same tokens", "tokens_match", ""),
]


def run(args) -> dict:
    sizes = GENERATE_MODEL_QUICK if args.quick else GENERATE_MODEL
    prompt_length = GENERATE_PROMPT_QUICK if args.quick else GENERATE_PROMPT
    lengths = args.generate_lengths or (GENERATE_LENGTHS_QUICK if args.quick else GENERATE_LENGTHS)
    device = model_device(args)
    progress(args, f"generate: {sizes} prompt={prompt_length} lengths={list(lengths)} on {device.type}")
    prompt = random_tokens(args.seed, sizes["vocab_size"], (1, prompt_length), device)
    model = causal_lm(sizes, "polyglu", args.seed, device, routing_pooling="causal").eval()
    outputs = {}

    def cached(new_tokens):
        @torch.no_grad()
        def generate_with_cache():
            sequences = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                use_cache=True, pad_token_id=0,
            )
            outputs[("cached", new_tokens)] = sequences
        return timed(generate_with_cache, device)

    def no_cache(new_tokens):
        @torch.no_grad()
        def loop_without_cache():
            sequence = prompt
            for _ in range(new_tokens):
                # the reference's loop: a full forward with logits for every position, argmax of the last
                logits = model(input_ids=sequence, use_cache=False).logits
                sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            outputs[("no_cache", new_tokens)] = sequence
        return timed(loop_without_cache, device)

    contenders = {}
    for new_tokens in lengths:
        contenders[f"cached/{new_tokens}"] = cached(new_tokens)
        contenders[f"no_cache/{new_tokens}"] = no_cache(new_tokens)
    # a short warm-up instead of full rounds: the no-cache runs are the expensive part of this suite
    for warm in range(args.warmup):
        cached(min(lengths))()
        no_cache(min(lengths))()
    samples = run_interleaved(contenders, args.repeats, warmup=0)
    rows = []
    for new_tokens in lengths:
        fast = summarize(samples[f"cached/{new_tokens}"]["seconds"])
        slow = summarize(samples[f"no_cache/{new_tokens}"]["seconds"])
        rows.append({
            "new_tokens": new_tokens,
            "cached_s": fast["median"],
            "cached_rel_spread": fast["rel_spread"],
            "cached_ms_per_token": fast["median"] * 1e3 / new_tokens,
            "no_cache_s": slow["median"],
            "no_cache_rel_spread": slow["rel_spread"],
            "no_cache_ms_per_token": slow["median"] * 1e3 / new_tokens,
            "speedup": ratio(slow["median"], fast["median"]),
            "tokens_match": bool(torch.equal(outputs[("cached", new_tokens)], outputs[("no_cache", new_tokens)])),
        })
    del model, contenders, outputs
    gc.collect()
    return {
        "description": "polyglu (routing_pooling='causal'), batch 1, greedy: model.generate with the KV cache (and "
                       "the causal routing state in PolyGLUCache) vs a reference-style loop without cache that re-runs "
                       "the whole sequence for every new token and computes logits at every position, as the reference's "
                       "generation does (the same model called with use_cache=False, argmax of the last position). "
                       "Speedup = no-cache time / cached time.",
        "model": sizes, "prompt_tokens": prompt_length, "device": device.type, "rows": rows,
    }


def render(result: dict) -> list:
    return [f"### generate: polyglu (causal routing) {model_label(result['model'])}, prompt "
            f"{result['prompt_tokens']}, batch 1: generate() with cache vs no-cache loop\n\n"
            + markdown_table(result["rows"], COLUMNS)]
