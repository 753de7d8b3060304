"""The `kernel` suite: the mixing op alone (no projections), forward and forward + backward, on a GPU.

What the ffn suite's block-level ratios dilute with three matrix products: how close the Triton programs come to
the memory bandwidth an elementwise op is bound by, against Liger-Kernel's fused SiLU·mul, and which tile sizes
(``POLYGLU_TRITON_TILES``, see triton_mixing_kernel.tile_overrides) serve each layout best — the data to tune the
kernel's defaults with, from one run on the GPU at hand.

On CUDA: bf16 gate and up at the widths of the ffn suite's GPU cases (8×2048 tokens); router logits in fp32 from
the project's own routers (moved away from their initialisation) on random hidden states, so every layout is the
model's; every gradient training needs (gate, up and the router logits). Contenders: torch eager ``silu(g)·u``
("swiglu", the baseline of the ``/ swiglu`` column), Liger's ``LigerSiLUMulFunction`` (``liger_kernel``, imported
only here; on its own copies of g and u, which its backward overwrites with their gradients), swiglu through the
Triton programs, and every mixing ffn_type asked for through the Triton programs at the default tiles, at each
:data:`TILE_SWEEP` setting (:data:`SWEEP_FFN_TYPES`) and through the torch.compile'd functions.

Bandwidth counts the element accesses no fused op avoids: forward reads g and u and writes h (3 per element),
forward + backward adds reading dy, g, u and writing dg, du (8). Elsewhere the suite runs only in Triton's
interpreter (``TRITON_INTERPRET=1``, fp32, tiny sizes), which checks that it runs and measures nothing.
"""

import gc
import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from ..activation_mixing import DISABLE_TRITON_ENV, TILES_ENV, mix_activations
from ..configuration_polyglu import MIXING_FFN_TYPES
from .harness import markdown_table, progress, ratio, run_interleaved, summarize_metric, time_vs_swiglu, timed, with_environment
from .models import FFN_CASES_CUDA, project_mlp

DEFAULT_REPEATS = 5
# (hidden, intermediate, batch, tokens) in the interpreter: odd sizes, several programs at the sweep's tiles
KERNEL_CASES_INTERPRETED = ((24, 40, 2, 12),)
SWEEP_FFN_TYPES = ("polyglu", "moa")
# alternatives to the defaults (forward 8x256@4, backward 8x128@4:16): more warps, smaller and larger tiles
TILE_SWEEP = (
    "forward=8x256@8,backward=8x128@8:16",
    "forward=8x128@4,backward=8x64@4:16",
    "forward=16x256@8,backward=16x128@8:8",
    "forward=8x512@8,backward=8x256@8:16",
)
TILE_SWEEP_INTERPRETED = ("forward=4x16@4,backward=4x16@4:2",)
FORWARD_ACCESSES, TRAINING_ACCESSES = 3, 8
LIGER = "liger_silu_mul"

COLUMNS = [
    ("contender", "contender", ""), ("fwd+bwd ms", "time_ms", ".3f"), ("spread", "time_rel_spread", "pct"),
    ("/ Liger", "time_vs_liger", ".3f"), ("/ swiglu", "time_vs_swiglu", ".3f"), ("/ default tiles", "time_vs_default", ".3f"),
    ("fwd ms", "forward_ms", ".3f"), ("fwd+bwd GB/s", "bandwidth_gbs", ".0f"), ("fwd GB/s", "forward_bandwidth_gbs", ".0f"),
]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def mixing_inputs(ffn_type: str, hidden: int, intermediate: int, batch: int, tokens: int, device, dtype,
                  generator: torch.Generator) -> dict:
    """The arguments of a PolyGLUMLP's mix_activations call on random hidden states (training mode), the tensors
    as differentiable leaves: gate / up in ``dtype``, the router logits in fp32 (as from_pretrained keeps routers)."""
    module = project_mlp(hidden, intermediate, ffn_type, generator).to(device)
    x = torch.randn(batch, tokens, hidden, generator=generator).to(device)
    with torch.no_grad():
        gate = module.gate_proj(x) if module.gated else module.up_proj(x)
        up = module.up_proj(x) if module.gated else None
        static, token = module.router(x, None, None, 0) if hasattr(module, "router") else (None, None)
    softmax = module.is_softmax_routed
    gate, up, static, token = (None if t is None else t.detach().to(dtype if i < 2 else torch.float32).requires_grad_()
                               for i, t in enumerate((gate, up, static, token)))
    return {"gate": gate, "up": up, "activations": tuple(module.activations), "static_logits": static,
            "token_logits": token, "tau": module.config.routing_tau if softmax else 1.0,
            "normalization": module.normalization or "linear", "hard": module.config.routing_hard and softmax}


def _op_contender(inputs: dict, upstream: torch.Tensor, backend: str):
    """(forward + backward, forward only) of mix_activations on these leaves."""
    leaves = [t for t in (inputs["gate"], inputs["up"], inputs["static_logits"], inputs["token_logits"])
              if t is not None]

    def forward():
        return mix_activations(inputs["gate"], inputs["up"], inputs["activations"], inputs["static_logits"],
                               inputs["token_logits"], inputs["tau"], inputs["normalization"], inputs["hard"],
                               backend=backend)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        forward().backward(upstream)

    return forward_backward, forward


def _liger_contender(gate: torch.Tensor, up: torch.Tensor, upstream: torch.Tensor):
    """Liger's fused SiLU·mul on copies of g and u (its backward writes the gradients into them), or None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    a, b = (t.detach().clone().requires_grad_() for t in (gate, up))

    def forward():
        return LigerSiLUMulFunction.apply(a, b)

    def forward_backward():
        a.grad = b.grad = None
        forward().backward(upstream)

    return forward_backward, forward


def _eager_silu_mul(gate: torch.Tensor, up: torch.Tensor, upstream: torch.Tensor):
    def forward():
        return F.silu(gate) * up

    def forward_backward():
        gate.grad = up.grad = None
        forward().backward(upstream)

    return forward_backward, forward


def kernel_contender_specs(case, device, dtype, seed: int, ffn_types, on_gpu: bool) -> tuple:
    """The upstream gradient and the contenders, baselines first: (name, kind, (forward + backward, forward) or None
    where not installed, environment overrides, the ffn_type whose default-tiles row the contender is a variant of)."""
    hidden, intermediate, batch, tokens = case
    generator = torch.Generator().manual_seed(seed)
    swiglu_inputs = mixing_inputs("swiglu", hidden, intermediate, batch, tokens, device, dtype, generator)
    gate, up = swiglu_inputs["gate"], swiglu_inputs["up"]
    upstream = torch.randn(gate.shape, generator=generator).to(device, dtype)
    liger = _liger_contender(gate, up, upstream) if on_gpu else None
    specs = [
        ("swiglu", "torch eager silu(g)·u", _eager_silu_mul(gate, up, upstream), {}, None),
        (LIGER, "Liger-Kernel LigerSiLUMulFunction" if liger is not None else
         "Liger-Kernel LigerSiLUMulFunction: not installed (pip install liger-kernel)" if on_gpu else
         "Liger-Kernel: CUDA only", liger, {}, None),
        ("swiglu[triton]", "silu(g)·u through the Triton programs",
         _op_contender(swiglu_inputs, upstream, "triton"), {}, None),
    ]
    sweep = TILE_SWEEP if on_gpu else TILE_SWEEP_INTERPRETED
    for ffn_type in (t for t in ffn_types if t in MIXING_FFN_TYPES):
        inputs = mixing_inputs(ffn_type, hidden, intermediate, batch, tokens, device, dtype, generator)
        specs.append((ffn_type, "the Triton programs, default tiles",
                      _op_contender(inputs, upstream, "triton"), {}, ffn_type))
        if ffn_type in SWEEP_FFN_TYPES:
            for setting in sweep:
                specs.append((f"{ffn_type}[{setting}]", f"the Triton programs, {TILES_ENV}={setting}",
                              _op_contender(inputs, upstream, "triton"), {TILES_ENV: setting},
                              ffn_type))
        if on_gpu:
            specs.append((f"{ffn_type}[torch.compile]", f"{DISABLE_TRITON_ENV}=1: the torch.compile'd functions",
                          _op_contender(inputs, upstream, "fused"), {DISABLE_TRITON_ENV: "1"}, ffn_type))
    return upstream, specs


def _bandwidth(elements: int, element_size: int, accesses: int, seconds: float) -> float:
    return accesses * elements * element_size / seconds / 1e9 if seconds > 0 else math.nan


def _kernel_case(case, device, dtype, repeats, warmup, seed, ffn_types, on_gpu) -> dict:
    hidden, intermediate, batch, tokens = case
    upstream, specs = kernel_contender_specs(case, device, dtype, seed, ffn_types, on_gpu)
    contenders = {}
    for name, _, functions, overrides, _ in specs:
        if functions is None:
            continue
        for suffix, function in zip(("", "/forward"), functions):
            function = with_environment(function, overrides) if overrides else function
            function()  # compiles the programs of this setting before any timing
            contenders[name + suffix] = timed(function, device)
    times = summarize_metric(run_interleaved(contenders, repeats, warmup))
    forward_times = {name: times.pop(name + "/forward") for name in list(times) if name + "/forward" in times}
    elements, element_size = upstream.numel(), upstream.element_size()
    rows = []
    for name, kind, functions, _, ffn_type in specs:
        row = {"contender": name, "kind": kind, "installed": functions is not None}
        if functions is None:
            row.update({key: math.nan for key in ("time_ms", "time_rel_spread", "time_vs_swiglu", "time_vs_liger",
                                                  "time_vs_default", "forward_ms", "bandwidth_gbs",
                                                  "forward_bandwidth_gbs")})
            rows.append(row)
            continue
        median, forward_median = times[name]["median"], forward_times[name]["median"]
        default = times.get(ffn_type) if ffn_type is not None and name != ffn_type else None
        row.update({
            **time_vs_swiglu(times, name),
            "time_vs_liger": ratio(median, times[LIGER]["median"]) if LIGER in times else math.nan,
            "time_vs_default": ratio(median, default["median"]) if default is not None else math.nan,
            "forward_ms": forward_median * 1e3,
            "bandwidth_gbs": _bandwidth(elements, element_size, TRAINING_ACCESSES, median),
            "forward_bandwidth_gbs": _bandwidth(elements, element_size, FORWARD_ACCESSES, forward_median),
        })
        rows.append(row)
    del specs, contenders, upstream
    gc.collect()
    return {
        "case": f"{str(dtype).replace('torch.', '')} {device.type} F={intermediate} tokens={batch}x{tokens}",
        "device": device.type, "dtype": str(dtype).replace("torch.", ""), "hidden_size": hidden,
        "intermediate_size": intermediate, "batch": batch, "tokens": tokens, "rows": rows,
    }


def run(args) -> dict:
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    description = ("The mixing op alone (no projections), forward + backward with every gradient training needs, "
                   "and its forward; ratios of medians over interleaved repetitions; GB/s counts 8 (forward: 3) "
                   "element accesses.")
    if not on_gpu and not interpreted():
        return {"description": description, "cases": [],
                "unavailable": "the kernel suite runs on CUDA (or, measuring nothing, in Triton's interpreter: "
                               "TRITON_INTERPRET=1)"}
    device, dtype = (torch.device("cuda"), torch.bfloat16) if on_gpu else (torch.device("cpu"), torch.float32)
    cases = FFN_CASES_CUDA if on_gpu and not args.quick else KERNEL_CASES_INTERPRETED
    if on_gpu and args.quick:
        cases = ((32, 64, 2, 16),)
    results = []
    for case in cases:
        progress(args, f"kernel: {dtype} {device.type} F={case[1]} {case[2]}x{case[3]}")
        results.append(_kernel_case(case, device, dtype, args.repeats, args.warmup, args.seed, args.ffn_types,
                                    on_gpu))
    return {"description": description, "cases": results}


def render(result: dict) -> list:
    if not result["cases"]:
        return [f"### kernel: not run — {result.get('unavailable', 'no case')}"]
    return [f"### kernel: {case['case']} (the mixing op alone)\n\n" + markdown_table(case["rows"], COLUMNS)
            for case in result["cases"]]
