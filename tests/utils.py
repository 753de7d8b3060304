"""Helpers shared by the tests: tiny configs and models built locally (nothing is downloaded)."""

import torch

from modeling_polyglu import FFN_TYPES, PolyGLUConfig, PolyGLUForCausalLM
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
