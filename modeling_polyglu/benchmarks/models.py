"""What the `polyglu bench` suites measure: the project's FFN blocks and small causal LMs, seeded and with routers
moved away from their initialisation, and the sizes the suites share."""

import math

import torch
from torch import nn

from ..configuration_polyglu import PolyGLUConfig
from ..modeling_polyglu import PolyGLUForCausalLM, PolyGLUMLP

# (hidden, intermediate, batch, tokens per row) of the ffn and hard suites
FFN_CASES = ((1024, 4096, 2, 512), (256, 1024, 8, 256))
FFN_CASES_QUICK = ((32, 64, 2, 16), (16, 32, 4, 8))
# bf16 on a GPU: a 0.6B-class and an 8B-class FFN (Qwen3-8B: d 4096 / 14336), 8 sequences of 2048 tokens
FFN_CASES_CUDA = ((1024, 4096, 8, 2048), (4096, 14336, 8, 2048))

# the step suite on a GPU: this preset (bf16, routers fp32) against its swiglu twin, 8 sequences of 2048 tokens
STEP_PRESET_CUDA = "polyglu-qwen3-0.6b"

# the model of the step and decode suites: d 1024 / 4096, 2 layers, vocab 32768, Hq 16, Hkv 8, head_dim 64
STEP_MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, vocab_size=32768,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64)
STEP_MODEL_QUICK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=128,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def perturb(parameters, generator: torch.Generator, std: float = 1.0) -> None:
    """Add N(0, std²) noise, scaled by 1/sqrt(fan_in) for weight matrices, so logits stay O(1) but input dependent.

    (Logits of O(10²) — e.g. unscaled noise on a d=1024 router — would make the softmax saturate and send exp into
    its slow underflow path on CPU, measuring that path rather than the layer; the tau=0.1 rows show that case.)
    """
    with torch.no_grad():
        for name, parameter in parameters:
            scale = std / math.sqrt(parameter.shape[-1]) if parameter.dim() >= 2 and name.endswith("weight") else std
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise.to(parameter.device, parameter.dtype))


def _randomize_routers(module: nn.Module, generator: torch.Generator, std: float = 1.0) -> None:
    """Move every routing parameter (names containing 'router.') away from its initialisation."""
    perturb([(name, parameter) for name, parameter in module.named_parameters()
             if "router." in name or name.startswith("router")], generator, std)


def ffn_config(hidden: int, intermediate: int, ffn_type: str, **overrides) -> PolyGLUConfig:
    values = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, ffn_type=ffn_type)
    values.update(overrides)
    return PolyGLUConfig(**values)


def init_linear_weights(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, nn.Linear):
                submodule.weight.copy_(torch.randn(submodule.weight.shape, generator=generator) * std)
                if submodule.bias is not None:
                    submodule.bias.zero_()


def project_mlp(hidden, intermediate, ffn_type, generator, **overrides) -> nn.Module:
    """The project's PolyGLUMLP of one ffn_type, seeded weights, routers away from their initialisation."""
    config = ffn_config(hidden, intermediate, ffn_type, **overrides)
    module = PolyGLUMLP(config, 0)
    init_linear_weights(module, generator)
    router = getattr(module, "router", None)
    if router is not None and hasattr(router, "initialize_parameters"):
        router.initialize_parameters(config.initializer_range)
    _randomize_routers(module, generator)
    return module


def causal_lm(sizes: dict, ffn_type: str, seed: int, device: torch.device, **overrides) -> PolyGLUForCausalLM:
    """A seeded PolyGLUForCausalLM of `sizes` (tied embeddings, no special tokens), routers randomized."""
    torch.manual_seed(seed)
    config = PolyGLUConfig(
        **sizes, ffn_type=ffn_type, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **overrides,
    )
    model = PolyGLUForCausalLM(config)
    _randomize_routers(model, torch.Generator().manual_seed(seed + 1))
    return model.to(device)


def model_ffn_types(args) -> list:
    """The ffn_types of a whole-model suite, swiglu (the baseline) first."""
    return ["swiglu"] + [t for t in args.ffn_types if t != "swiglu"]


def model_device(args) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def random_tokens(seed: int, vocab_size: int, shape: tuple, device) -> torch.Tensor:
    """Seeded token ids, the same on every device."""
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)
