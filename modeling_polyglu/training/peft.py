"""LoRA defaults for PolyGLU-family models: adapters on every attention and FFN projection, routers trained in full.

PEFT does not know model_type "polyglu", so target modules are explicit. Routers are small and their parameters are
the point of these models, so each layer's `mlp.router` submodule is trained fully and saved in the adapter
(`modules_to_save` matches module names: listing parameter names such as "alpha" would silently do nothing).

The adapter's starting point depends on the seed and the parameter names only (draw_lora_weights_by_name), so one
process, data-parallel ranks and tensor-parallel ranks all start from the same weights. Tensor parallelism needs
mends around PEFT 0.21, before and after it wraps the model (prepare_/finish_tensor_parallel_lora); without them
LoRA under transformers' tensor parallelism fails for Qwen3 itself.
"""

import math
import re
import zlib
from typing import Optional, Sequence

import torch

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER_MODULE = "router"


def has_routers(model) -> bool:
    return any(name.endswith(f".{ROUTER_MODULE}") for name, _ in model.named_modules())


ALL_LINEAR = "all-linear"  # PEFT's and TRL's name for every linear layer


def _matching_modules(name: str, module_names: Sequence[str]) -> list:
    """The modules PEFT matches to `name` in a list: the name itself or a dotted suffix."""
    return [module for module in module_names if module == name or module.endswith(f".{name}")]


def _matches_as_regex(pattern: str, module_names: Sequence[str]) -> bool:
    """Whether PEFT, which reads a str target as a regex on full module names, would match any; a bad regex matches none."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return False
    return any(compiled.fullmatch(name) for name in module_names)


def _reject_unmatched(flag: str, names: Sequence[str], module_names: Sequence[str]) -> None:
    """A name that matches no module was dropped (targets) or trained nothing (modules_to_save), silently."""
    unmatched = [name for name in names if not _matching_modules(name, module_names)]
    if unmatched:
        kinds = sorted({module.rsplit(".", 1)[-1] for module in module_names if not module.rsplit(".", 1)[-1].isdigit()})
        raise ValueError(f"{flag} {', '.join(unmatched)}: no module of this model is named so; its module names end "
                         f"in {', '.join(kinds)}.")


def lora_config_for(
    model,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Optional[Sequence[str]] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    use_rslora: bool = False,
    use_dora: bool = False,
):
    """A `peft.LoraConfig` (task CAUSAL_LM) for `model`: LoRA on all projections, routers in modules_to_save."""
    from peft import LoraConfig

    module_names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):  # TRL turns a single --lora_target_modules value into a str
        is_regex = not _matching_modules(target_modules, module_names) and _matches_as_regex(target_modules, module_names)
        targets = target_modules if is_regex else [target_modules]  # PEFT matches a str as a regex on full names
    else:
        targets = list(target_modules or [])
    if isinstance(targets, list):
        targets = [name for name in targets if name != ALL_LINEAR]
        if targets:
            _reject_unmatched("--lora_target_modules", targets, module_names)
        else:  # the default, or "all-linear": every projection the model has (plain FFNs have no gate_proj)
            present = {name.rsplit(".", 1)[-1] for name in module_names}
            targets = [name for name in ATTENTION_PROJECTIONS + FFN_PROJECTIONS if name in present]
    saved = list(modules_to_save or [])
    _reject_unmatched("--lora_modules_to_save", saved, module_names)
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
        use_rslora=use_rslora,
        use_dora=use_dora,
    )


def is_tensor_parallel(model) -> bool:
    from .routing_stats import tensor_parallel_size

    return tensor_parallel_size(model) > 1


def prepare_tensor_parallel_lora(model, modules_to_save: Sequence[str]) -> None:
    """Before PEFT wraps a tensor-parallel `model`: the sharded parameters of the modules it will deep-copy
    (modules_to_save) get storage of their own. transformers loads a rank's shard as a view into the memory-mapped
    checkpoint tensor, and deep-copying such a view fails on every rank but the first ("invalid python storage")."""
    from torch.distributed.tensor import DTensor

    saved = set(modules_to_save)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in saved:
            for parameter in module.parameters():
                if isinstance(parameter, DTensor):
                    parameter.data = parameter.data.clone()


def _plan_style(model, module_name: str):
    """transformers' TP style for `module_name` (layer numbers as in the checkpoint) under model.tp_plan, or None."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    plan = getattr(model, "tp_plan", None) or {}
    style_name = plan.get(re.sub(r"\.\d+(\.|$)", lambda match: ".*" + match.group(1), module_name))
    return ALL_PARALLEL_STYLES[style_name] if style_name is not None else None


class SliceDropout(torch.nn.Module):
    """Dropout of this rank's last-dim slice of a tensor-parallel input, with the slice of the mask one process
    draws for the whole input (so noise drawn later is one process's too). The mask is whole-width: tp_size times the
    slice's memory, for the moment of the LoRA branch."""

    def __init__(self, p: float, width: int, mesh):
        super().__init__()
        self.p, self.width = p, width
        sizes = [len(chunk) for chunk in torch.arange(width).chunk(mesh.size())]
        self.start, self.size = sum(sizes[: mesh.get_local_rank()]), sizes[mesh.get_local_rank()]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return hidden_states
        if hidden_states.shape[-1] != self.size:
            raise ValueError(f"SliceDropout: expected this rank's {self.size} of {self.width} features, got {hidden_states.shape[-1]}.")
        ones = hidden_states.new_ones((*hidden_states.shape[:-1], self.width))
        mask = torch.nn.functional.dropout(ones, self.p, training=True)
        return hidden_states * mask[..., self.start : self.start + self.size]

    def extra_repr(self) -> str:
        return f"p={self.p}, features {self.start}..{self.start + self.size} of {self.width}"


def finish_tensor_parallel_lora(peft_model) -> None:
    """After PEFT wrapped a tensor-parallel model, three things it leaves for the ranks to get wrong:

    * a LoRA matrix beside a sharded projection (lora_B of a colwise, lora_A of a rowwise one) is a DTensor of the
      global shape but keeps the per-rank in/out_features PEFT built it with; transformers' rowwise forward reads
      in_features as the global width, so the forward fails. They are set to the weight's global shape.
    * LoRA dropout on a rowwise projection's input sees this rank's slice only; it becomes a SliceDropout, so the
      mask (and the random numbers spent on it) are one process's.
    * the trained copies of modules_to_save are deep copies whose TP forward is still the original's (a closure
      over the original module), so they would run — and train — nothing. The plan's style is installed anew on
      each copy.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper
    from torch.distributed.tensor import DTensor

    base = peft_model.get_base_model()
    mesh = base._device_mesh
    mesh = mesh["tp"] if mesh.ndim > 1 else mesh
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, DTensor):
            module.out_features, module.in_features = module.weight.shape
        if isinstance(module, LoraLayer) and _plan_style(base, name) is not None:
            for adapter, lora_a in module.lora_A.items():
                sliced_input = isinstance(lora_a.weight, DTensor) and lora_a.weight.placements[0].is_shard(1)
                dropout = module.lora_dropout[adapter]
                if sliced_input and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    module.lora_dropout[adapter] = SliceDropout(dropout.p, lora_a.weight.shape[1], mesh)
        if isinstance(module, ModulesToSaveWrapper):
            style = _plan_style(base, name)
            for copy in module.modules_to_save.values():
                if style is not None and "forward" in copy.__dict__:
                    del copy.forward
                    style.install_forward(copy, mesh)


def draw_lora_weights_by_name(peft_model, seed: int) -> None:
    """Redraws every LoRA A matrix as PEFT initialises it (Kaiming-uniform, a=√5, over the whole fan-in; B stays
    zero), from a generator seeded by `seed` and the parameter's name. Each tensor-parallel rank keeps its slice of
    the one whole draw, where PEFT would draw every rank's slice alike with the slice's own fan-in."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, parameter in peft_model.named_parameters():
        if ".lora_A." not in name:
            continue
        # the CPU generator keeps 32 bits of its seed: seed and name are hashed together
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        whole = torch.empty(parameter.shape)
        torch.nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            if isinstance(parameter, DTensor):
                local = distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None)
                parameter.to_local().copy_(local.to_local())
            else:
                parameter.copy_(whole)
