"""The `ffn` suite: one feed-forward block, forward + backward, and the bytes autograd saves for backward.

Every ``ffn_type`` (project ``PolyGLUMLP``) against the project's swiglu, transformers' eager ``Qwen3MLP`` and a
reference-style PolyGLU (all K activations stacked into ``[B, T, F, K]``, whole-sequence mean pooling, Gumbel
softmax), plus ``mixing_backend="naive"`` and other polyglu variants.
"""

import gc

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_polyglu import FFN_TYPES
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
from .models import FFN_CASES, FFN_CASES_QUICK, init_linear_weights, perturb, project_mlp

DEFAULT_REPEATS = 5
SATURATED_ALPHA_STD = 100.0
_DISABLE_COMPILE_ENV = "POLYGLU_DISABLE_COMPILE"
_DISABLE_CPU_KERNEL_ENV = "POLYGLU_DISABLE_CPU_KERNEL"

COLUMNS = [
    ("contender", "contender", ""), ("time ms", "time_ms", ".1f"), ("spread", "time_rel_spread", "pct"),
    ("time / swiglu", "time_vs_swiglu", ".2f"), ("paired", "time_vs_swiglu_paired", ".2f"),
    ("time / Qwen3MLP", "time_vs_qwen3_mlp", ".2f"),
    ("saved", "saved_bytes", "bytes"), ("saved / Qwen3MLP", "saved_vs_qwen3_mlp", ".2f"),
]


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


def _ffn_case(hidden, intermediate, batch, tokens, device, dtype, repeats, warmup, ffn_types, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    specs = ffn_contender_specs(hidden, intermediate, generator, ffn_types)
    x = torch.randn(batch, tokens, hidden, generator=generator).to(device, dtype).requires_grad_(True)
    grad_output = torch.randn(batch, tokens, hidden, generator=generator).to(device, dtype)

    contenders, saved, params = {}, {}, {}
    for name, _, module, overrides in specs:
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
    for name, kind, _, _ in specs:
        rows.append({
            "contender": name,
            "kind": kind,
            "params": params[name],
            **time_vs_swiglu(times, name),
            "time_vs_qwen3_mlp": ratio(times[name]["median"], times["qwen3_mlp"]["median"]),
            "saved_bytes": saved[name],
            "saved_vs_qwen3_mlp": ratio(saved[name], saved["qwen3_mlp"]),
        })
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
    cases = FFN_CASES_QUICK if args.quick else FFN_CASES
    targets = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available() and args.device != "cpu":
        targets.append((torch.device("cuda"), torch.bfloat16))
    results = []
    for device, dtype in targets:
        for hidden, intermediate, batch, tokens in cases:
            progress(args, f"ffn: {dtype} {device.type} d={hidden} F={intermediate} {batch}x{tokens}")
            results.append(_ffn_case(hidden, intermediate, batch, tokens, device, dtype, args.repeats, args.warmup,
                                     args.ffn_types, args.seed))
    return {
        "description": "FFN block forward+backward (training mode; polyglu draws Gumbel noise as in training) and "
                       "bytes saved for backward (parameters excluded, storages de-duplicated). Ratios are of "
                       "medians over interleaved repetitions.",
        "cases": results,
    }


def render(result: dict) -> list:
    return [f"### ffn: {case['case']} (forward + backward)\n\n" + markdown_table(case["rows"], COLUMNS)
            for case in result["cases"]]
