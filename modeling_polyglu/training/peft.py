"""LoRA defaults for PolyGLU-family models: adapters on every attention and FFN projection, routers trained in full.

PEFT does not know model_type "polyglu", so target modules are explicit. Routers are small and their parameters are
the point of these models, so each layer's `mlp.router` submodule is trained fully and saved in the adapter
(`modules_to_save` matches module names: listing parameter names such as "alpha" would silently do nothing).
"""

from typing import Optional, Sequence

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER_MODULE = "router"


def has_routers(model) -> bool:
    return any(name.endswith(f".{ROUTER_MODULE}") for name, _ in model.named_modules())


def lora_config_for(
    model,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Optional[Sequence[str]] = None,
    modules_to_save: Optional[Sequence[str]] = None,
):
    """A `peft.LoraConfig` (task CAUSAL_LM) for `model`: LoRA on all projections, routers in modules_to_save."""
    from peft import LoraConfig

    targets = list(target_modules) if target_modules else list(ATTENTION_PROJECTIONS + FFN_PROJECTIONS)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [name for name in targets if name in present]  # plain FFNs have no gate_proj
    saved = list(modules_to_save or [])
    if has_routers(model) and ROUTER_MODULE not in saved:
        saved.append(ROUTER_MODULE)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias="none",
        target_modules=targets,
        modules_to_save=saved or None,
    )
