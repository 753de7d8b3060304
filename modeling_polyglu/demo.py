"""`polyglu demo`: the whole life of a small model on an embedded default, with no download.

Builds a character tokenizer and a tiny model of the chosen variant, trains it for a few seconds on generated
addition facts, generates with and without the KV cache (they must agree), saves the model with its remote code,
and reloads it in a fresh interpreter that cannot import this package (`trust_remote_code=True`), checking that
the logits are identical.
"""

import random
import time
from pathlib import Path

import torch

from .atomic_output import atomic_directory
from .char_tokenizer import build_char_tokenizer
from .modeling_polyglu import PolyGLUForCausalLM
from .presets import load_preset
from .remote_code import load_in_fresh_process


def addition_facts(count: int, seed: int, max_operand: int = 20) -> list[str]:
    rng = random.Random(seed)
    facts = []
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        facts.append(f"{a}+{b}={a + b}")
    return facts


def _batch(tokenizer, texts):
    encoded = tokenizer([tokenizer.bos_token + text + tokenizer.eos_token for text in texts], return_tensors="pt", padding=True)
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    return encoded.input_ids, encoded.attention_mask, labels


def _mean_loss(model, tokenizer, texts) -> float:
    model.eval()
    with torch.no_grad():
        input_ids, attention_mask, labels = _batch(tokenizer, texts)
        return model(input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss.item()


def _answer(model, tokenizer, prompts, use_cache: bool) -> list[str]:
    tokenizer.padding_side = "left"
    encoded = tokenizer([tokenizer.bos_token + prompt for prompt in prompts], return_tensors="pt", padding=True)
    generated = model.generate(
        **encoded, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(generated[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)


def run_demo(ffn_type: str = "polyglu", output_dir: str = "outputs/demo", steps: int = 300, seed: int = 0,
             overwrite: bool = False, log=print) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    train_facts, held_out = addition_facts(2000, seed), addition_facts(64, seed + 1)
    tokenizer = build_char_tokenizer(["0123456789+="])
    config = load_preset(
        "tiny-debug",
        ffn_type=ffn_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = PolyGLUForCausalLM(config)
    log(f"Built a {config.num_hidden_layers}-layer {ffn_type} model, {model.num_parameters():,} parameters.")

    loss_before = _mean_loss(model, tokenizer, held_out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        input_ids, attention_mask, labels = _batch(tokenizer, rng.sample(train_facts, 32))
        loss = model(input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            log(f"  step {step + 1}/{steps}: train loss {loss.item():.3f}")
    loss_after = _mean_loss(model, tokenizer, held_out)
    log(f"Held-out loss: {loss_before:.3f} before training, {loss_after:.3f} after.")

    model.eval()
    prompts = [fact.split("=")[0] + "=" for fact in held_out[:8]]
    cached, uncached = _answer(model, tokenizer, prompts, True), _answer(model, tokenizer, prompts, False)
    correct = sum(prompt + answer == fact for prompt, answer, fact in zip(prompts, cached, held_out))
    for prompt, answer in zip(prompts, cached):
        log(f"  {prompt}{answer}")
    log(f"Greedy answers with the KV cache {'equal' if cached == uncached else 'DIFFER FROM'} recomputation; "
        f"{correct}/{len(prompts)} correct.")

    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log(f"Saved model, remote code and tokenizer to {Path(output_dir).resolve()}")

    probe = tokenizer([tokenizer.bos_token + held_out[0]], return_tensors="pt").input_ids
    remote_logits, info = load_in_fresh_process(output_dir, probe)
    with torch.no_grad():
        local_logits = model(probe, use_cache=False).logits
    max_difference = (remote_logits - local_logits).abs().max().item()
    log(f"Reloaded in a fresh process without the package as {info['module']}.{info['causal_lm']}: "
        f"max |Δlogit| = {max_difference:.2e}")
    log(f"Done in {time.perf_counter() - started:.1f} s.")
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "cache_matches": cached == uncached,
        "correct": correct,
        "remote_code_max_abs_diff": max_difference,
    }
