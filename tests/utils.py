"""Helpers shared by the tests: tiny configs and models built locally (nothing is downloaded)."""

import importlib.util
import json
import os
import random

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_polyglu import FFN_TYPES, PolyGLUConfig, PolyGLUForCausalLM
from modeling_polyglu.activation_mixing import MIN_TRITON_VERSION, _major_minor
from modeling_polyglu.presets import load_preset

# every ffn_type, plus the variants whose options change the computation
ALL_VARIANTS = [(ffn_type, {}) for ffn_type in FFN_TYPES] + [
    ("dualglu", {"dualglu_mixing": "learned_static"}),
    ("dualglu", {"dualglu_mixing": "static_equal"}),
    ("moa", {"mixer_form": "plain"}),
    ("la", {"mixer_form": "plain"}),
    ("polyglu", {"routing_pooling": "token"}),
    ("polyglu", {"routing_pooling": "sequence"}),
    ("polyglu", {"routing_hard": True}),
]


def variant_id(variant) -> str:
    ffn_type, options = variant
    return "-".join([ffn_type] + [f"{key}={value}" for key, value in options.items()])


def tiny_config(**overrides) -> PolyGLUConfig:
    """The tiny-debug preset (2 layers, hidden 32, d_ff 64, vocab 128) with overrides."""
    return load_preset("tiny-debug", **overrides)


def randomize_routers(model: torch.nn.Module, std: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Move every routing parameter far from its initialisation so routing is input-dependent and non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".router." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def tiny_model(seed: int = 0, randomize: bool = True, **overrides) -> PolyGLUForCausalLM:
    torch.manual_seed(seed)
    model = PolyGLUForCausalLM(tiny_config(**overrides))
    if randomize:
        randomize_routers(model, seed=seed)
    return model.eval()


def tiny_chat_qwen3(tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    """A transformers Qwen3 (2 layers, hidden 64, tied) sized for `tokenizer`: the source model of conversion and
    training tests."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))


def write_converted_chat_models(root, ffn_types) -> None:
    """root/qwen3 (tiny_chat_qwen3 with a character chat tokenizer) and root/<ffn_type> converted from it with
    unbiased routers (router_init_activation None), so that training can move the routing."""
    from modeling_polyglu.char_tokenizer import build_chat_tokenizer
    from modeling_polyglu.conversion.qwen3 import convert_qwen3

    tokenizer = build_chat_tokenizer(["0123456789+=? whatis"])
    tiny_chat_qwen3(tokenizer).save_pretrained(root / "qwen3")
    tokenizer.save_pretrained(root / "qwen3")
    for ffn_type in ffn_types:
        convert_qwen3(root / "qwen3", root / ffn_type, ffn_type, router_init_activation=None, verify=False, log=lambda *a: None)


def write_addition_dialogues(path, count: int, seed: int = 0) -> None:
    """`count` one-turn chats "what is a+b?" → "a+b" (a, b ≤ 20) as JSONL `messages` rows."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(count):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a}+{b}?"},
                                                  {"role": "assistant", "content": str(a + b)}]}) + "\n")


def require_usable_triton() -> None:
    """Skip the calling test module where triton (>= MIN_TRITON_VERSION) or numpy is missing, or fail there when
    POLYGLU_REQUIRE_TRITON=1 (call at module level)."""
    problems = [f"{name} not installed" for name in ("triton", "numpy") if importlib.util.find_spec(name) is None]
    if not problems:
        import triton  # the version the package reads (activation_mixing.triton_kernel)

        found = triton.__version__
        if _major_minor(found) < MIN_TRITON_VERSION:
            problems.append(f"triton {found} is older than the kernel needs ({'.'.join(map(str, MIN_TRITON_VERSION))})")
    if problems:
        if os.environ.get("POLYGLU_REQUIRE_TRITON", "0") not in ("", "0"):
            raise ImportError(f"POLYGLU_REQUIRE_TRITON=1 but {'; '.join(problems)}")
        pytest.skip("; ".join(problems), allow_module_level=True)
