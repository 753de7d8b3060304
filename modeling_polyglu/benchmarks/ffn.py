"""The `ffn` suite: one feed-forward block, forward + backward, and the bytes autograd saves for backward.

Every ``ffn_type`` (project ``PolyGLUMLP``) against the project's swiglu, transformers' eager ``Qwen3MLP`` and a
reference-style PolyGLU (all K activations stacked into ``[B, T, F, K]``, whole-sequence mean pooling, Gumbel
softmax), plus ``mixing_backend="naive"`` and other polyglu variants.

On a GPU (bf16, :data:`FFN_CASES_CUDA`) the contenders are the ones a fine-tuner chooses between: eager SwiGLU
(transformers' Qwen3MLP and the project's swiglu), Liger-Kernel's fused SwiGLU (``liger_kernel``, imported only
here; its row says "not installed" without it), swiglu through the project's Triton kernel, every mixing ffn_type
through the Triton kernel (the default there) and polyglu / moa / dualglu through the torch.compile'd functions
instead (``POLYGLU_DISABLE_TRITON_KERNEL=1``); ratios to Liger's time and saved bytes are the GPU targets.
"""

import gc
import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..activation_mixing import DISABLE_TRITON_ENV
from ..configuration_polyglu import FFN_TYPES, MIXING_FFN_TYPES
from .harness import (
    compilation_state,
    cpu_kernel_available,
    markdown_table,
    progress,
    ratio,
    run_interleaved,
    saved_tensor_bytes,
    summarize_metric,
    time_vs_swiglu,
    timed,
    with_environment,
)
from .models import FFN_CASES, FFN_CASES_CUDA, FFN_CASES_QUICK, init_linear_weights, perturb, project_mlp

DEFAULT_REPEATS = 5
_NOT_MEASURED = {key: math.nan for key in ("params", "time_ms", "time_rel_spread", "time_vs_swiglu",
                                            "time_vs_swiglu_paired", "time_vs_qwen3_mlp", "saved_bytes",
                                            "saved_vs_qwen3_mlp", "time_vs_liger", "saved_vs_liger")}
SATURATED_ALPHA_STD = 100.0
_DISABLE_COMPILE_ENV = "POLYGLU_DISABLE_COMPILE"
_DISABLE_CPU_KERNEL_ENV = "POLYGLU_DISABLE_CPU_KERNEL"

COLUMNS = [
    ("contender", "contender", ""), ("time ms", "time_ms", ".1f"), ("spread", "time_rel_spread", "pct"),
    ("time / swiglu", "time_vs_swiglu", ".2f"), ("paired", "time_vs_swiglu_paired", ".2f"),
    ("time / Qwen3MLP", "time_vs_qwen3_mlp", ".2f"),
    ("saved", "saved_bytes", "bytes"), ("saved / Qwen3MLP", "saved_vs_qwen3_mlp", ".2f"),
]
CUDA_COLUMNS = [
    ("contender", "contender", ""), ("time ms", "time_ms", ".2f"), ("spread", "time_rel_spread", "pct"),
    ("time / Liger", "time_vs_liger", ".3f"), ("time / swiglu", "time_vs_swiglu", ".3f"),
    ("paired", "time_vs_swiglu_paired", ".3f"), ("saved", "saved_bytes", "bytes"),
    ("saved / Liger", "saved_vs_liger", ".3f"), ("saved / Qwen3MLP", "saved_vs_qwen3_mlp", ".2f"),
]
LIGER = "liger_swiglu"
TORCH_COMPILE_ROWS = ("polyglu", "moa", "dualglu")  # the GPU targets' variants, also through torch.compile


class ReferenceStylePolyGLU(nn.Module):
    """PolyGLU written the way the reference implementation does it (REFERENCE.md §b-§c), for comparison only.

    Whole-sequence mean pooling → gate_net (Linear(d→32) → ReLU → Linear(32→K)) → ℓ = α + β·f → Gumbel softmax over K
    (one routing vector per sequence and neuron) → all K activations stacked into [B, T, F, K], weighted and summed.
    """

    ACTIVATIONS = (torch.relu, torch.tanh, F.silu, F.gelu)  # ReLU, tanh, SiLU, GELU (erf), the reference's order

    def __init__(self, hidden_size: int, intermediate_size: int, gate_width: int = 32, tau: float = 1.0):
        super().__init__()
        num = len(self.ACTIVATIONS)
        self.W_gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.W_up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.W_down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.alpha = nn.Parameter(torch.zeros(intermediate_size, num))
        self.beta = nn.Parameter(torch.ones(num))
        self.gate_net = nn.Sequential(nn.Linear(hidden_size, gate_width), nn.ReLU(), nn.Linear(gate_width, num))
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.mean(x, 1)  # [B, D], every position (future ones included)
        dynamic = self.gate_net(pooled)  # [B, K]
        logits = self.alpha[None] + self.beta[None, None, :] * dynamic[:, None, :]  # [B, F, K]
        weights = F.gumbel_softmax(logits, tau=self.tau).unsqueeze(1)  # [B, 1, F, K]
        gate = self.W_gate(x)
        stacked = torch.stack([activation(gate) for activation in self.ACTIVATIONS], dim=-1)  # [B, T, F, K]
        mixed = (weights * stacked).sum(dim=-1)
        return self.W_down(mixed * self.W_up(x))


def _qwen3_mlp(hidden, intermediate, generator) -> nn.Module:
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    module = Qwen3MLP(Qwen3Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
    init_linear_weights(module, generator)
    return module


def _reference_mlp(hidden, intermediate, generator) -> nn.Module:
    module = ReferenceStylePolyGLU(hidden, intermediate)
    init_linear_weights(module, generator)
    # routing away from init (α = 0, β = 1), as for the project's routers
    perturb([(name, parameter) for name, parameter in module.named_parameters() if not name.startswith("W_")],
            generator)
    return module


def ffn_contender_specs(hidden: int, intermediate: int, generator: torch.Generator, ffn_types=FFN_TYPES) -> list:
    """(name, kind, module, environment overrides) of every contender of one ffn case, baselines first."""
    specs = [
        ("qwen3_mlp", "transformers Qwen3MLP (eager)", _qwen3_mlp(hidden, intermediate, generator), {}),
        ("reference_polyglu", "reference-style PolyGLU (stacked [B,T,F,K], sequence mean, gumbel)",
         _reference_mlp(hidden, intermediate, generator), {}),
    ]
    ordered = ["swiglu"] + [t for t in ffn_types if t != "swiglu"]
    for ffn_type in ordered:
        specs.append((ffn_type, "project PolyGLUMLP (fused)", project_mlp(hidden, intermediate, ffn_type, generator),
                      {}))
    if "polyglu" in ffn_types:
        specs.append(("polyglu[naive]", "project PolyGLUMLP, mixing_backend=naive",
                      project_mlp(hidden, intermediate, "polyglu", generator, mixing_backend="naive"), {}))
        specs.append(("polyglu[sequence]", "project PolyGLUMLP, routing_pooling=sequence (reference semantics)",
                      project_mlp(hidden, intermediate, "polyglu", generator, routing_pooling="sequence"), {}))
        specs.append(("polyglu[token]", "project PolyGLUMLP, routing_pooling=token",
                      project_mlp(hidden, intermediate, "polyglu", generator, routing_pooling="token"), {}))
        specs.append(("polyglu[tau=0.1]", "project PolyGLUMLP, routing_tau=0.1 (the released model's τ: sharp routing)",
                      project_mlp(hidden, intermediate, "polyglu", generator, routing_tau=0.1), {}))
        for backend in ("fused", "naive"):
            saturated = project_mlp(hidden, intermediate, "polyglu", generator, mixing_backend=backend)
            perturb([("alpha", saturated.router.alpha)], generator, std=SATURATED_ALPHA_STD)
            specs.append((f"polyglu[{'naive,' if backend == 'naive' else ''}saturated]",
                          f"project PolyGLUMLP ({backend}), α perturbed with std {SATURATED_ALPHA_STD:g}: most "
                          "exp(z - max) of the softmax underflow (routing far sharper than any trained model's)",
                          saturated, {}))
        if cpu_kernel_available():
            specs.append(("polyglu[torch.compile]", f"project PolyGLUMLP (fused), {_DISABLE_CPU_KERNEL_ENV}=1: the "
                          "torch.compile'd mixing functions instead of the C++ kernel",
                          project_mlp(hidden, intermediate, "polyglu", generator), {_DISABLE_CPU_KERNEL_ENV: "1"}))
        if compilation_state("cpu") is not None:
            specs.append(("polyglu[eager]", f"project PolyGLUMLP (fused), {_DISABLE_CPU_KERNEL_ENV}=1 and "
                          f"{_DISABLE_COMPILE_ENV}=1: the mixing functions run eagerly",
                          project_mlp(hidden, intermediate, "polyglu", generator),
                          {_DISABLE_CPU_KERNEL_ENV: "1", _DISABLE_COMPILE_ENV: "1"}))
    return specs


def _liger_swiglu(hidden, intermediate, generator) -> Optional[nn.Module]:
    """Liger-Kernel's LigerSwiGLUMLP with seeded weights, or None where liger_kernel is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import Qwen3Config

    module = LigerSwiGLUMLP(Qwen3Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
    init_linear_weights(module, generator)
    return module


def cuda_contender_specs(hidden: int, intermediate: int, generator: torch.Generator, ffn_types=FFN_TYPES) -> list:
    """The GPU contenders (module None: not installed), baselines first."""
    liger = _liger_swiglu(hidden, intermediate, generator)
    specs = [
        ("qwen3_mlp", "transformers Qwen3MLP (eager SwiGLU)", _qwen3_mlp(hidden, intermediate, generator), {}),
        (LIGER, "Liger-Kernel LigerSwiGLUMLP (fused SwiGLU)" if liger is not None else
         "Liger-Kernel LigerSwiGLUMLP: not installed (pip install liger-kernel)", liger, {}),
        ("swiglu", "project PolyGLUMLP (fused: torch's kernels for a fixed activation)",
         project_mlp(hidden, intermediate, "swiglu", generator), {}),
        ("swiglu[triton]", "project PolyGLUMLP, mixing_backend=triton",
         project_mlp(hidden, intermediate, "swiglu", generator, mixing_backend="triton"), {}),
    ]
    routed = [t for t in ffn_types if t in MIXING_FFN_TYPES]
    for ffn_type in routed:
        specs.append((ffn_type, "project PolyGLUMLP (fused: the Triton kernel)",
                      project_mlp(hidden, intermediate, ffn_type, generator), {}))
    for ffn_type in (t for t in TORCH_COMPILE_ROWS if t in routed):
        specs.append((f"{ffn_type}[torch.compile]", f"project PolyGLUMLP (fused), {DISABLE_TRITON_ENV}=1: the "
                      "torch.compile'd mixing functions instead of the Triton kernel",
                      project_mlp(hidden, intermediate, ffn_type, generator), {DISABLE_TRITON_ENV: "1"}))
    if "polyglu" in routed:
        saturated = project_mlp(hidden, intermediate, "polyglu", generator)
        perturb([("alpha", saturated.router.alpha)], generator, std=SATURATED_ALPHA_STD)
        specs.append(("polyglu[saturated]", f"project PolyGLUMLP (Triton), α perturbed with std "
                      f"{SATURATED_ALPHA_STD:g}: tiles take the exact per-element softmax", saturated, {}))
    return specs


def _ffn_case(specs, hidden, intermediate, batch, tokens, device, dtype, repeats, warmup, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, hidden, generator=generator).to(device, dtype).requires_grad_(True)
    grad_output = torch.randn(batch, tokens, hidden, generator=generator).to(device, dtype)

    contenders, saved, params = {}, {}, {}
    for name, _, module, overrides in specs:
        if module is None:  # not installed
            continue
        module.to(device, dtype)
        router = getattr(module, "router", None)
        if router is not None:
            router.float()  # routing parameters stay fp32, as from_pretrained keeps them
        module.train()
        parameters = list(module.parameters())
        params[name] = sum(p.numel() for p in parameters)

        def forward_backward(module=module, parameters=parameters):
            for parameter in parameters:
                parameter.grad = None
            x.grad = None
            module(x).backward(grad_output)

        def forward_only(module=module):
            return module(x)

        if overrides:
            forward_backward = with_environment(forward_backward, overrides)
            forward_only = with_environment(forward_only, overrides)
        contenders[name] = timed(forward_backward, device)
        forward_backward()  # builds (compiles) the kernels before the saved-bytes pass
        saved[name] = saved_tensor_bytes(forward_only, exclude=parameters)

    times = summarize_metric(run_interleaved(contenders, repeats, warmup))
    rows = []
    for name, kind, module, _ in specs:
        if module is None:
            rows.append({"contender": name, "kind": kind, "installed": False, **_NOT_MEASURED})
            continue
        row = {
            "contender": name,
            "kind": kind,
            "params": params[name],
            **time_vs_swiglu(times, name),
            "time_vs_qwen3_mlp": ratio(times[name]["median"], times["qwen3_mlp"]["median"]),
            "saved_bytes": saved[name],
            "saved_vs_qwen3_mlp": ratio(saved[name], saved["qwen3_mlp"]),
        }
        if any(spec[0] == LIGER for spec in specs):
            measured = LIGER in times
            row["time_vs_liger"] = ratio(times[name]["median"], times[LIGER]["median"]) if measured else math.nan
            row["saved_vs_liger"] = ratio(saved[name], saved[LIGER]) if measured else math.nan
        rows.append(row)
    del specs, contenders
    gc.collect()
    return {
        "case": f"{str(dtype).replace('torch.', '')} {device.type} d={hidden} F={intermediate} tokens={batch}x{tokens}",
        "device": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "batch": batch,
        "tokens": tokens,
        "rows": rows,
    }


def run(args) -> dict:
    # (device, dtype, cases, contenders): fp32 CPU unless --device cuda; bf16 CUDA unless --device cpu
    targets = []
    if args.device != "cuda":
        targets.append((torch.device("cpu"), torch.float32, FFN_CASES_QUICK if args.quick else FFN_CASES,
                        ffn_contender_specs))
    if torch.cuda.is_available() and args.device != "cpu":
        targets.append((torch.device("cuda"), torch.bfloat16, FFN_CASES_QUICK if args.quick else FFN_CASES_CUDA,
                        cuda_contender_specs))
    results = []
    for device, dtype, cases, contender_specs in targets:
        for hidden, intermediate, batch, tokens in cases:
            progress(args, f"ffn: {dtype} {device.type} d={hidden} F={intermediate} {batch}x{tokens}")
            specs = contender_specs(hidden, intermediate, torch.Generator().manual_seed(args.seed), args.ffn_types)
            results.append(_ffn_case(specs, hidden, intermediate, batch, tokens, device, dtype, args.repeats,
                                     args.warmup, args.seed + 1))
    return {
        "description": "FFN block forward+backward (training mode; polyglu draws Gumbel noise as in training) and "
                       "bytes saved for backward (parameters excluded, storages de-duplicated). Ratios are of "
                       "medians over interleaved repetitions.",
        "cases": results,
    }


def render(result: dict) -> list:
    return [f"### ffn: {case['case']} (forward + backward)\n\n"
            + markdown_table(case["rows"], CUDA_COLUMNS if case["device"] == "cuda" else COLUMNS)
            for case in result["cases"]]
