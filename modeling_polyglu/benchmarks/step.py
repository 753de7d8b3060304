"""The `step` suite: one training step (forward + backward + AdamW) of a causal LM per ffn_type, against swiglu.

On CPU a small fp32 model (STEP_MODEL); on a GPU the polyglu-qwen3-0.6b preset in bf16 (routers fp32, as
from_pretrained keeps them) against its swiglu twin and the other ffn_types asked for, 8 sequences of 2048 tokens,
plus polyglu with POLYGLU_DISABLE_TRITON_KERNEL=1 (the torch.compile'd mixing functions instead of Triton).
"""

import gc

import torch

from ..activation_mixing import DISABLE_TRITON_ENV
from ..modeling_polyglu import PolyGLUForCausalLM
from ..presets import load_preset
from .harness import (
    markdown_table,
    model_label,
    progress,
    run_interleaved,
    summarize_metric,
    time_vs_swiglu,
    timed,
    with_environment,
)
from .models import (
    STEP_MODEL,
    STEP_MODEL_QUICK,
    STEP_PRESET_CUDA,
    causal_lm,
    model_device,
    model_ffn_types,
    random_tokens,
)

DEFAULT_REPEATS = 3
STEP_BATCH, STEP_TOKENS = 2, 512
STEP_BATCH_QUICK, STEP_TOKENS_QUICK = 2, 16
STEP_BATCH_CUDA, STEP_TOKENS_CUDA = 8, 2048

COLUMNS = [
    ("ffn_type", "contender", ""), ("params", "params", ","), ("step ms", "time_ms", ".0f"),
    ("spread", "time_rel_spread", "pct"), ("step / swiglu", "time_vs_swiglu", ".2f"),
    ("paired", "time_vs_swiglu_paired", ".2f"),
]


def _preset_lm(ffn_type: str, seed: int, device: torch.device) -> PolyGLUForCausalLM:
    """The GPU step model: STEP_PRESET_CUDA with this ffn_type, bf16 with fp32 routers, seeded."""
    torch.manual_seed(seed)
    model = PolyGLUForCausalLM(load_preset(STEP_PRESET_CUDA, ffn_type=ffn_type)).to(device, torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith(".router"):
            module.float()
    return model


def _contenders(args, device) -> list:
    """(name, ffn_type, environment overrides) of the suite's models."""
    contenders = [(ffn_type, ffn_type, {}) for ffn_type in model_ffn_types(args)]
    if device.type == "cuda" and "polyglu" in args.ffn_types:
        contenders.append(("polyglu[torch.compile]", "polyglu", {DISABLE_TRITON_ENV: "1"}))
    return contenders


def run(args) -> dict:
    device = model_device(args)
    on_gpu = device.type == "cuda" and not args.quick
    sizes = STEP_MODEL_QUICK if args.quick else STEP_MODEL
    batch, tokens = (STEP_BATCH_QUICK, STEP_TOKENS_QUICK) if args.quick else (STEP_BATCH, STEP_TOKENS)
    if on_gpu:
        preset = load_preset(STEP_PRESET_CUDA)
        sizes = {key: getattr(preset, key) for key in STEP_MODEL}
        batch, tokens = STEP_BATCH_CUDA, STEP_TOKENS_CUDA
    progress(args, f"step: {sizes} tokens={batch}x{tokens} on {device.type}")
    input_ids = random_tokens(args.seed, sizes["vocab_size"], (batch, tokens), device)

    contenders, params = {}, {}
    for name, ffn_type, overrides in _contenders(args, device):
        if on_gpu:
            model = _preset_lm(ffn_type, args.seed, device).train()
        else:
            model = causal_lm(sizes, ffn_type, args.seed, device).train()
        # foreach on a GPU (what training uses there); the per-parameter loop on CPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=device.type == "cuda")
        params[name] = sum(p.numel() for p in model.parameters())

        def train_step(model=model, optimizer=optimizer):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        contenders[name] = timed(with_environment(train_step, overrides) if overrides else train_step, device)

    times = summarize_metric(run_interleaved(contenders, args.repeats, args.warmup))
    rows = [{"contender": name, "params": params[name], **time_vs_swiglu(times, name)} for name in contenders]
    del contenders
    gc.collect()
    return {
        "description": "One training step (forward with loss, backward, AdamW step, zero_grad) of a causal LM; "
                       + (f"the {STEP_PRESET_CUDA} preset in bf16 (routers fp32)" if on_gpu else "fp32")
                       + ", training mode.",
        "model": sizes, "batch": batch, "tokens": tokens, "device": device.type,
        "dtype": "bfloat16" if on_gpu else "float32", "rows": rows,
    }


def render(result: dict) -> list:
    return [f"### step: {model_label(result['model'])} tokens={result['batch']}x{result['tokens']} "
            "(forward + backward + AdamW)\n\n" + markdown_table(result["rows"], COLUMNS)]
