"""Benchmarks of the activation-mixing feed-forward layers (`polyglu bench`).

Every figure is a RATIO between contenders measured in one process: for each repetition every contender runs once,
in round-robin order (the starting contender rotates from one repetition to the next), after a warm-up round; each
contender's median over the repetitions is taken and divided by its baseline's median. Timings run with
``torch.set_num_threads(1)`` (``--threads``) so that contenders do not compete for cores; on a shared machine the
absolute numbers drift, the ratios much less. Nothing here asserts anything about speed.

Suites (``--suite``):

* ``ffn``: one feed-forward block, forward + backward, for every ``ffn_type`` (project ``PolyGLUMLP``) against the
  project's swiglu, transformers' eager ``Qwen3MLP`` and a reference-style PolyGLU (all K activations stacked into
  ``[B, T, F, K]``, whole-sequence mean pooling, Gumbel softmax), plus ``mixing_backend="naive"`` and other polyglu
  variants; also the bytes autograd saves for backward.
* ``step``: one training step (forward + backward + AdamW) of a small causal LM per ``ffn_type``, against swiglu.
* ``decode``: prefill a prompt, then greedy decoding with the KV cache, per ``ffn_type``, against swiglu.
* ``generate``: ``model.generate`` with the KV cache against a reference-style loop without cache (the full
  sequence is re-run for every new token), for a causal-routed polyglu model, at several generation lengths.

Results are printed as markdown tables and written as JSON (``--json``, default
``benchmarks/results/<suite>.json``).
"""

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import activation_mixing, cpu_mixing_kernel, conversion_benchmark
from .configuration_polyglu import FFN_TYPES, PolyGLUConfig
from .modeling_polyglu import PolyGLUForCausalLM, PolyGLUMLP

SUITES = ("ffn", "hard", "step", "decode", "generate", "convert")
RECOMPILE_LIMIT = 64
SATURATED_ALPHA_STD = 100.0
_DISABLE_COMPILE_ENV = "POLYGLU_DISABLE_COMPILE"
_DISABLE_CPU_KERNEL_ENV = "POLYGLU_DISABLE_CPU_KERNEL"

# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------

# (hidden, intermediate, batch, tokens per row)
FFN_CASES = ((1024, 4096, 2, 512), (256, 1024, 8, 256))
FFN_CASES_QUICK = ((32, 64, 2, 16), (16, 32, 4, 8))

# the model of the step and decode suites: d 1024 / 4096, 2 layers, vocab 32768, Hq 16, Hkv 8, head_dim 64
STEP_MODEL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, vocab_size=32768,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64)
STEP_MODEL_QUICK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=128,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)
STEP_BATCH, STEP_TOKENS = 2, 512
STEP_BATCH_QUICK, STEP_TOKENS_QUICK = 2, 16

DECODE_PROMPT, DECODE_TOKENS = 128, 32
DECODE_PROMPT_QUICK, DECODE_TOKENS_QUICK = 8, 4

GENERATE_MODEL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=32768,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64)
GENERATE_MODEL_QUICK = STEP_MODEL_QUICK
GENERATE_PROMPT, GENERATE_LENGTHS = 128, (64, 128, 256)
GENERATE_PROMPT_QUICK, GENERATE_LENGTHS_QUICK = 8, (4, 8)

DEFAULT_REPEATS = {"ffn": 5, "hard": 7, "step": 3, "decode": 5, "generate": 3, "convert": 1}
QUICK_REPEATS = 1


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> Callable[[], dict]:
    """A contender that runs `function` once and reports its wall time as {"seconds": s}."""

    def run():
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        return {"seconds": time.perf_counter() - start}

    return run


def run_interleaved(contenders: dict, repeats: int, warmup: int = 1) -> dict:
    """Run every contender once per repetition, round-robin, after `warmup` rounds; returns name -> metric -> samples.

    A contender is a callable returning a dict of metric -> value (seconds). The starting contender rotates from
    one repetition to the next so that none is always first (or always right after the same neighbour).
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples = {name: {} for name in names}
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            for metric, value in contenders[name]().items():
                samples[name].setdefault(metric, []).append(float(value))
    return samples


def summarize(values: list) -> dict:
    """Median, minimum, maximum and relative spread ((max - min) / median) of a list of samples."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "rel_spread": (max(values) - min(values)) / median if median > 0 else 0.0,
        "samples": list(values),
    }


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def paired_ratio(samples: list, baseline_samples: list) -> float:
    """Median over repetitions of sample / baseline sample of the same repetition (cancels slow drifts of the load)."""
    return statistics.median(ratio(a, b) for a, b in zip(samples, baseline_samples))


def saved_tensor_bytes(function: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward while `function` runs (its forward; nothing is differentiated).

    Every tensor handed to a saved-tensors pack hook counts ``numel * element_size`` bytes (at most its storage's
    size, for expanded views); tensors sharing a storage (same ``data_ptr``) count once, with the largest view; the
    storages of `exclude` (the parameters) do not count.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    seen: dict = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in excluded:
            nbytes = min(tensor.numel() * tensor.element_size(), storage.nbytes())
            seen[pointer] = max(seen.get(pointer, 0), nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = function()
    del output
    return int(sum(seen.values()))


class _RecompileWatcher(logging.Handler):
    """Collects torch._dynamo warnings about recompilation limits (a compiled kernel silently falling back to eager)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list = []

    def emit(self, record):
        message = record.getMessage()
        if "recompile" in message.lower() or "cache_size_limit" in message:
            first_line = message.strip().splitlines()[0] if message.strip() else message
            if first_line not in self.messages:
                self.messages.append(first_line[:300])


@contextmanager
def _benchmark_environment(threads: int):
    """One thread, quiet transformers logging, a dynamo recompile watcher; restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous_threads = torch.get_num_threads()
    previous_verbosity = hf_logging.get_verbosity()
    watcher = _RecompileWatcher()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(watcher)
    dynamo_config = _dynamo_config()
    previous_limit = getattr(dynamo_config, "recompile_limit", None)
    if previous_limit is not None:
        # one process compiles the mixing kernels once per variant (activations, normalization, shapes); dynamo's
        # default limit of 8 would leave the later contenders eager, which no single-model process sees
        dynamo_config.recompile_limit = max(previous_limit, RECOMPILE_LIMIT)
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    try:
        yield watcher
    finally:
        torch.set_num_threads(previous_threads)
        hf_logging.set_verbosity(previous_verbosity)
        dynamo_logger.removeHandler(watcher)
        if previous_limit is not None:
            dynamo_config.recompile_limit = previous_limit


def _dynamo_config():
    try:
        import torch._dynamo

        return torch._dynamo.config
    except Exception:  # no dynamo on this build
        return None


@contextmanager
def _environment(overrides: dict):
    """Set environment variables for the duration of the block (the mixing backends read them at every call)."""
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _compilation_state(device_type: str = "cpu") -> Optional[bool]:
    """Whether the fused mixing kernels are torch.compile'd here (None: this version never compiles them)."""
    check = getattr(activation_mixing, "compilation_enabled", None)
    return None if check is None else bool(check(device_type))


def _cpu_kernel_available() -> bool:
    """Whether the C++ CPU mixing kernel is built (building it now if needed) and enabled."""
    return cpu_mixing_kernel.load_library() is not None


def _perturb(parameters, generator: torch.Generator, std: float = 1.0) -> None:
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
    _perturb([(name, parameter) for name, parameter in module.named_parameters()
              if "router." in name or name.startswith("router")], generator, std)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> Optional[list]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment_info(threads: int) -> dict:
    import transformers

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "mixing_kernels_compiled_cpu": _compilation_state("cpu"),
        "cpu_mixing_kernel": _cpu_kernel_available(),
        "dynamo_recompile_limit": getattr(_dynamo_config(), "recompile_limit", None),
        "load_average_start": _load_average(),
    }
    if torch.cuda.is_available():
        info["mixing_kernels_compiled_cuda"] = _compilation_state("cuda")
    return info


# ----------------------------------------------------------------------------------------------------------------
# (a) ffn: one feed-forward block
# ----------------------------------------------------------------------------------------------------------------


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


def _ffn_config(hidden: int, intermediate: int, ffn_type: str, **overrides) -> PolyGLUConfig:
    values = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=128, ffn_type=ffn_type)
    values.update(overrides)
    return PolyGLUConfig(**values)


def _init_linear_weights(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, nn.Linear):
                submodule.weight.copy_(torch.randn(submodule.weight.shape, generator=generator) * std)
                if submodule.bias is not None:
                    submodule.bias.zero_()


def _project_mlp(hidden, intermediate, ffn_type, generator, **overrides) -> nn.Module:
    config = _ffn_config(hidden, intermediate, ffn_type, **overrides)
    module = PolyGLUMLP(config, 0)
    _init_linear_weights(module, generator)
    router = getattr(module, "router", None)
    if router is not None and hasattr(router, "initialize_parameters"):
        router.initialize_parameters(config.initializer_range)
    _randomize_routers(module, generator)
    return module


def _qwen3_mlp(hidden, intermediate, generator) -> nn.Module:
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    module = Qwen3MLP(Qwen3Config(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
    _init_linear_weights(module, generator)
    return module


def _reference_mlp(hidden, intermediate, generator) -> nn.Module:
    module = ReferenceStylePolyGLU(hidden, intermediate)
    _init_linear_weights(module, generator)
    # routing away from init (α = 0, β = 1), as for the project's routers
    _perturb([(name, parameter) for name, parameter in module.named_parameters() if not name.startswith("W_")],
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
        specs.append((ffn_type, "project PolyGLUMLP (fused)", _project_mlp(hidden, intermediate, ffn_type, generator),
                      {}))
    if "polyglu" in ffn_types:
        specs.append(("polyglu[naive]", "project PolyGLUMLP, mixing_backend=naive",
                      _project_mlp(hidden, intermediate, "polyglu", generator, mixing_backend="naive"), {}))
        specs.append(("polyglu[sequence]", "project PolyGLUMLP, routing_pooling=sequence (reference semantics)",
                      _project_mlp(hidden, intermediate, "polyglu", generator, routing_pooling="sequence"), {}))
        specs.append(("polyglu[token]", "project PolyGLUMLP, routing_pooling=token",
                      _project_mlp(hidden, intermediate, "polyglu", generator, routing_pooling="token"), {}))
        specs.append(("polyglu[tau=0.1]", "project PolyGLUMLP, routing_tau=0.1 (the released model's τ: sharp routing)",
                      _project_mlp(hidden, intermediate, "polyglu", generator, routing_tau=0.1), {}))
        for backend in ("fused", "naive"):
            saturated = _project_mlp(hidden, intermediate, "polyglu", generator, mixing_backend=backend)
            _perturb([("alpha", saturated.router.alpha)], generator, std=SATURATED_ALPHA_STD)
            specs.append((f"polyglu[{'naive,' if backend == 'naive' else ''}saturated]",
                          f"project PolyGLUMLP ({backend}), α perturbed with std {SATURATED_ALPHA_STD:g}: most "
                          "exp(z - max) of the softmax underflow (routing far sharper than any trained model's)",
                          saturated, {}))
        if _cpu_kernel_available():
            specs.append(("polyglu[torch.compile]", f"project PolyGLUMLP (fused), {_DISABLE_CPU_KERNEL_ENV}=1: the "
                          "torch.compile'd mixing functions instead of the C++ kernel",
                          _project_mlp(hidden, intermediate, "polyglu", generator), {_DISABLE_CPU_KERNEL_ENV: "1"}))
        if _compilation_state("cpu") is not None:
            specs.append(("polyglu[eager]", f"project PolyGLUMLP (fused), {_DISABLE_CPU_KERNEL_ENV}=1 and "
                          f"{_DISABLE_COMPILE_ENV}=1: the mixing functions run eagerly",
                          _project_mlp(hidden, intermediate, "polyglu", generator),
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
            forward_backward = _with_environment(forward_backward, overrides)
            forward_only = _with_environment(forward_only, overrides)
        contenders[name] = timed(forward_backward, device)
        forward_backward()  # builds (compiles) the kernels before the saved-bytes pass
        saved[name] = saved_tensor_bytes(forward_only, exclude=parameters)

    samples = run_interleaved(contenders, repeats, warmup)
    times = {name: summarize(metrics["seconds"]) for name, metrics in samples.items()}
    rows = []
    for name, kind, _, _ in specs:
        median = times[name]["median"]
        rows.append({
            "contender": name,
            "kind": kind,
            "params": params[name],
            "time_ms": median * 1e3,
            "time_rel_spread": times[name]["rel_spread"],
            "time_samples_ms": [value * 1e3 for value in times[name]["samples"]],
            "time_vs_swiglu": ratio(median, times["swiglu"]["median"]),
            "time_vs_swiglu_paired": paired_ratio(times[name]["samples"], times["swiglu"]["samples"]),
            "time_vs_qwen3_mlp": ratio(median, times["qwen3_mlp"]["median"]),
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


def _with_environment(function, overrides: dict):
    def run():
        with _environment(overrides):
            return function()

    return run


def run_ffn_suite(args) -> dict:
    cases = FFN_CASES_QUICK if args.quick else FFN_CASES
    targets = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available() and args.device != "cpu":
        targets.append((torch.device("cuda"), torch.bfloat16))
    results = []
    for device, dtype in targets:
        for hidden, intermediate, batch, tokens in cases:
            _progress(args, f"ffn: {dtype} {device.type} d={hidden} F={intermediate} {batch}x{tokens}")
            results.append(_ffn_case(hidden, intermediate, batch, tokens, device, dtype, args.repeats, args.warmup,
                                     args.ffn_types, args.seed))
    return {
        "description": "FFN block forward+backward (training mode; polyglu draws Gumbel noise as in training) and "
                       "bytes saved for backward (parameters excluded, storages de-duplicated). Ratios are of "
                       "medians over interleaved repetitions.",
        "cases": results,
    }


# ----------------------------------------------------------------------------------------------------------------
# hard: soft vs hard routing at inference
# ----------------------------------------------------------------------------------------------------------------

# (label, ffn_type, config overrides) of the routed mixers whose hard routing is compared with their soft routing
HARD_ROUTING_CONTENDERS = (
    ("polyglu", "polyglu", {}),
    ("polyglu[token]", "polyglu", {"routing_pooling": "token"}),
    ("moa", "moa", {}),
    ("dualglu", "dualglu", {}),
    ("dualglu[learned_static]", "dualglu", {"dualglu_mixing": "learned_static"}),
)


def _hard_case(hidden, intermediate, batch, tokens, repeats, warmup, ffn_types, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, hidden, generator=generator)
    modules = {"swiglu": _project_mlp(hidden, intermediate, "swiglu", generator)}
    pairs = []
    for label, ffn_type, overrides in HARD_ROUTING_CONTENDERS:
        if ffn_type not in ffn_types:
            continue
        soft = _project_mlp(hidden, intermediate, ffn_type, generator, **overrides)
        hard = PolyGLUMLP(_ffn_config(hidden, intermediate, ffn_type, routing_hard=True, **overrides), 0)
        hard.load_state_dict(soft.state_dict())  # the same weights and routers: only the mixing differs
        modules[label], modules[f"{label}[hard]"] = soft, hard
        pairs.append(label)

    def inference(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    contenders = {}
    for name, module in modules.items():
        module.eval()
        contenders[name] = timed(inference(module), torch.device("cpu"))
    samples = run_interleaved(contenders, repeats, warmup)
    times = {name: summarize(metrics["seconds"]) for name, metrics in samples.items()}
    rows = []
    for label in pairs:
        soft, hard = times[label], times[f"{label}[hard]"]
        rows.append({
            "contender": label,
            "soft_ms": soft["median"] * 1e3,
            "hard_ms": hard["median"] * 1e3,
            "hard_rel_spread": hard["rel_spread"],
            "hard_vs_soft": ratio(hard["median"], soft["median"]),
            "hard_vs_soft_paired": paired_ratio(hard["samples"], soft["samples"]),
            "soft_vs_swiglu": ratio(soft["median"], times["swiglu"]["median"]),
            "soft_samples_ms": [value * 1e3 for value in soft["samples"]],
            "hard_samples_ms": [value * 1e3 for value in hard["samples"]],
        })
    return {
        "case": f"float32 cpu d={hidden} F={intermediate} tokens={batch}x{tokens}",
        "hidden_size": hidden, "intermediate_size": intermediate, "batch": batch, "tokens": tokens,
        "swiglu_ms": times["swiglu"]["median"] * 1e3,
        "rows": rows,
    }


def run_hard_suite(args) -> dict:
    cases = FFN_CASES_QUICK if args.quick else FFN_CASES
    results = []
    for hidden, intermediate, batch, tokens in cases:
        _progress(args, f"hard: float32 cpu d={hidden} F={intermediate} {batch}x{tokens}")
        results.append(_hard_case(hidden, intermediate, batch, tokens, args.repeats, args.warmup, args.ffn_types,
                                  args.seed))
    return {
        "description": "FFN block forward at inference (eval mode, no_grad), the same module with routing_hard "
                       "True and False. Hard routing evaluates one activation per neuron (static choice, grouped) "
                       "or per token (MoA, DualGLU), or selects per element (PolyGLU) without the softmax.",
        "cases": results,
    }


# ----------------------------------------------------------------------------------------------------------------
# Whole models: (b) step, (c) decode, (d) generate
# ----------------------------------------------------------------------------------------------------------------


def _model(sizes: dict, ffn_type: str, seed: int, device: torch.device, **overrides) -> PolyGLUForCausalLM:
    torch.manual_seed(seed)
    config = PolyGLUConfig(
        **sizes, ffn_type=ffn_type, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=None, bos_token_id=None, eos_token_id=None, **overrides,
    )
    model = PolyGLUForCausalLM(config)
    _randomize_routers(model, torch.Generator().manual_seed(seed + 1))
    return model.to(device)


def _model_ffn_types(args) -> list:
    return ["swiglu"] + [t for t in args.ffn_types if t != "swiglu"]


def run_step_suite(args) -> dict:
    sizes = STEP_MODEL_QUICK if args.quick else STEP_MODEL
    batch, tokens = (STEP_BATCH_QUICK, STEP_TOKENS_QUICK) if args.quick else (STEP_BATCH, STEP_TOKENS)
    device = _model_device(args)
    _progress(args, f"step: {sizes} tokens={batch}x{tokens} on {device.type}")
    input_ids = _random_tokens(args.seed, sizes["vocab_size"], (batch, tokens), device)

    contenders, params = {}, {}
    for ffn_type in _model_ffn_types(args):
        model = _model(sizes, ffn_type, args.seed, device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, foreach=False)
        params[ffn_type] = sum(p.numel() for p in model.parameters())

        def train_step(model=model, optimizer=optimizer):
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        contenders[ffn_type] = timed(train_step, device)

    samples = run_interleaved(contenders, args.repeats, args.warmup)
    times = {name: summarize(metrics["seconds"]) for name, metrics in samples.items()}
    rows = [{
        "contender": name,
        "params": params[name],
        "time_ms": times[name]["median"] * 1e3,
        "time_rel_spread": times[name]["rel_spread"],
        "time_samples_ms": [value * 1e3 for value in times[name]["samples"]],
        "time_vs_swiglu": ratio(times[name]["median"], times["swiglu"]["median"]),
        "time_vs_swiglu_paired": paired_ratio(times[name]["samples"], times["swiglu"]["samples"]),
    } for name in contenders]
    del contenders
    gc.collect()
    return {
        "description": "One training step (forward with loss, backward, AdamW step, zero_grad) of a causal LM; "
                       "fp32, training mode.",
        "model": sizes, "batch": batch, "tokens": tokens, "device": device.type, "rows": rows,
    }


def _random_tokens(seed: int, vocab_size: int, shape: tuple, device) -> torch.Tensor:
    """Seeded token ids, the same on every device."""
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def run_decode_suite(args) -> dict:
    sizes = STEP_MODEL_QUICK if args.quick else STEP_MODEL
    prompt_length = DECODE_PROMPT_QUICK if args.quick else DECODE_PROMPT
    new_tokens = args.decode_tokens or (DECODE_TOKENS_QUICK if args.quick else DECODE_TOKENS)
    device = _model_device(args)
    _progress(args, f"decode: {sizes} prompt={prompt_length} new={new_tokens} on {device.type}")
    prompt = _random_tokens(args.seed, sizes["vocab_size"], (1, prompt_length), device)

    contenders = {}
    for ffn_type in _model_ffn_types(args):
        model = _model(sizes, ffn_type, args.seed, device).eval()

        @torch.no_grad()
        def decode(model=model):
            _synchronize(device)
            start = time.perf_counter()
            output = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            cache = output.past_key_values
            next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            _synchronize(device)
            prefilled = time.perf_counter()
            for _ in range(new_tokens):
                output = model(input_ids=next_token, past_key_values=cache, use_cache=True)
                next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            _synchronize(device)
            end = time.perf_counter()
            return {"prefill": prefilled - start, "per_token": (end - prefilled) / new_tokens}

        contenders[ffn_type] = decode

    samples = run_interleaved(contenders, args.repeats, args.warmup)
    prefill = {name: summarize(metrics["prefill"]) for name, metrics in samples.items()}
    per_token = {name: summarize(metrics["per_token"]) for name, metrics in samples.items()}
    rows = [{
        "contender": name,
        "prefill_ms": prefill[name]["median"] * 1e3,
        "prefill_vs_swiglu": ratio(prefill[name]["median"], prefill["swiglu"]["median"]),
        "per_token_ms": per_token[name]["median"] * 1e3,
        "per_token_rel_spread": per_token[name]["rel_spread"],
        "per_token_samples_ms": [value * 1e3 for value in per_token[name]["samples"]],
        "per_token_vs_swiglu": ratio(per_token[name]["median"], per_token["swiglu"]["median"]),
    } for name in contenders]
    del contenders
    gc.collect()
    return {
        "description": "Eager greedy decoding with the KV cache (batch 1): prefill the prompt, then one forward per "
                       "new token; per-token time is the decode time divided by the number of new tokens.",
        "model": sizes, "prompt_tokens": prompt_length, "new_tokens": new_tokens, "device": device.type,
        "rows": rows,
    }


def run_generate_suite(args) -> dict:
    sizes = GENERATE_MODEL_QUICK if args.quick else GENERATE_MODEL
    prompt_length = GENERATE_PROMPT_QUICK if args.quick else GENERATE_PROMPT
    lengths = args.generate_lengths or (GENERATE_LENGTHS_QUICK if args.quick else GENERATE_LENGTHS)
    device = _model_device(args)
    _progress(args, f"generate: {sizes} prompt={prompt_length} lengths={list(lengths)} on {device.type}")
    prompt = _random_tokens(args.seed, sizes["vocab_size"], (1, prompt_length), device)
    model = _model(sizes, "polyglu", args.seed, device, routing_pooling="causal").eval()
    outputs = {}

    def cached(new_tokens):
        @torch.no_grad()
        def run():
            sequences = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                use_cache=True, pad_token_id=0,
            )
            outputs[("cached", new_tokens)] = sequences
        return timed(run, device)

    def no_cache(new_tokens):
        @torch.no_grad()
        def run():
            sequence = prompt
            for _ in range(new_tokens):
                # the reference's loop: a full forward with logits for every position, argmax of the last
                logits = model(input_ids=sequence, use_cache=False).logits
                sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            outputs[("no_cache", new_tokens)] = sequence
        return timed(run, device)

    contenders = {}
    for new_tokens in lengths:
        contenders[f"cached/{new_tokens}"] = cached(new_tokens)
        contenders[f"no_cache/{new_tokens}"] = no_cache(new_tokens)
    # a short warm-up instead of full rounds: the no-cache runs are the expensive part of this suite
    for warm in range(args.warmup):
        cached(min(lengths))()
        no_cache(min(lengths))()
    samples = run_interleaved(contenders, args.repeats, warmup=0)
    rows = []
    for new_tokens in lengths:
        fast = summarize(samples[f"cached/{new_tokens}"]["seconds"])
        slow = summarize(samples[f"no_cache/{new_tokens}"]["seconds"])
        rows.append({
            "new_tokens": new_tokens,
            "cached_s": fast["median"],
            "cached_rel_spread": fast["rel_spread"],
            "cached_ms_per_token": fast["median"] * 1e3 / new_tokens,
            "no_cache_s": slow["median"],
            "no_cache_rel_spread": slow["rel_spread"],
            "no_cache_ms_per_token": slow["median"] * 1e3 / new_tokens,
            "speedup": ratio(slow["median"], fast["median"]),
            "tokens_match": bool(torch.equal(outputs[("cached", new_tokens)], outputs[("no_cache", new_tokens)])),
        })
    del model, contenders, outputs
    gc.collect()
    return {
        "description": "polyglu (routing_pooling='causal'), batch 1, greedy: model.generate with the KV cache (and "
                       "the causal routing state in PolyGLUCache) vs a reference-style loop without cache that re-runs "
                       "the whole sequence for every new token and computes logits at every position, as the reference's "
                       "generation does (the same model called with use_cache=False, argmax of the last position). "
                       "Speedup = no-cache time / cached time.",
        "model": sizes, "prompt_tokens": prompt_length, "device": device.type, "rows": rows,
    }


def _model_device(args) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _progress(args, message: str) -> None:
    if not args.silent:
        print(f"[polyglu bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# (e) convert: peak memory of streaming conversion
# ----------------------------------------------------------------------------------------------------------------


def run_convert_suite(args) -> dict:
    quick = args.quick
    total_gb = args.convert_total_gb or (conversion_benchmark.CONVERT_TOTAL_GB_QUICK if quick
                                         else conversion_benchmark.CONVERT_TOTAL_GB)
    shard_mbs = args.convert_shard_mb or (conversion_benchmark.CONVERT_SHARD_MB_QUICK if quick
                                          else conversion_benchmark.CONVERT_SHARD_MB)
    model = conversion_benchmark.CONVERT_MODEL_QUICK if quick else conversion_benchmark.CONVERT_MODEL
    rows = conversion_benchmark.conversion_memory_rows(total_gb, shard_mbs, model,
                                                       progress=lambda message: _progress(args, message))
    return {
        "description": "Peak RSS of `convert qwen3 --no-verify` (polyglu) in a fresh process on a synthetic bf16 "
                       "Qwen3 checkpoint, minus the peak RSS of a process that only imports the converter, "
                       "against the largest shard. Not a timing: one run per shard size.",
        "model": dict(zip(("hidden_size", "intermediate_size", "vocab_size"), model)),
        "rows": rows,
    }


RUNNERS = {"ffn": run_ffn_suite, "hard": run_hard_suite, "step": run_step_suite, "decode": run_decode_suite, "generate": run_generate_suite,
           "convert": run_convert_suite}


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def _format(value, spec: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if spec == "bytes":
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value} B"
    if spec == "pct":
        return f"±{100 * value / 2:.0f}%"
    return format(value, spec)


def markdown_table(rows: list, columns: list) -> str:
    """columns: (header, key, format spec)."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---" if spec == "" else "---:" for _, _, spec in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(row[key], spec) for _, key, spec in columns) + " |")
    return "\n".join(lines)


FFN_COLUMNS = [
    ("contender", "contender", ""), ("time ms", "time_ms", ".1f"), ("spread", "time_rel_spread", "pct"),
    ("time / swiglu", "time_vs_swiglu", ".2f"), ("paired", "time_vs_swiglu_paired", ".2f"),
    ("time / Qwen3MLP", "time_vs_qwen3_mlp", ".2f"),
    ("saved", "saved_bytes", "bytes"), ("saved / Qwen3MLP", "saved_vs_qwen3_mlp", ".2f"),
]
HARD_COLUMNS = [
    ("mixer", "contender", ""), ("soft ms", "soft_ms", ".1f"), ("hard ms", "hard_ms", ".1f"),
    ("spread", "hard_rel_spread", "pct"), ("hard / soft", "hard_vs_soft", ".2f"), ("paired", "hard_vs_soft_paired", ".2f"),
    ("soft / swiglu", "soft_vs_swiglu", ".2f"),
]
CONVERT_COLUMNS = [
    ("checkpoint GiB", "checkpoint_gib", ".2f"), ("shards", "shards", "d"), ("largest shard MiB", "largest_shard_mib", ".0f"),
    ("peak RSS MiB", "peak_rss_mib", ".0f"), ("peak − import baseline MiB", "peak_minus_baseline_mib", ".0f"),
    ("÷ largest shard", "ratio_to_largest_shard", ".2f"),
]
STEP_COLUMNS = [
    ("ffn_type", "contender", ""), ("params", "params", ","), ("step ms", "time_ms", ".0f"),
    ("spread", "time_rel_spread", "pct"), ("step / swiglu", "time_vs_swiglu", ".2f"),
    ("paired", "time_vs_swiglu_paired", ".2f"),
]
DECODE_COLUMNS = [
    ("ffn_type", "contender", ""), ("prefill ms", "prefill_ms", ".1f"), ("prefill / swiglu", "prefill_vs_swiglu", ".2f"),
    ("ms / token", "per_token_ms", ".2f"), ("spread", "per_token_rel_spread", "pct"),
    ("token / swiglu", "per_token_vs_swiglu", ".2f"),
]
GENERATE_COLUMNS = [
    ("new tokens", "new_tokens", "d"), ("cached s", "cached_s", ".2f"), ("cached ms/token", "cached_ms_per_token", ".1f"),
    ("no-cache s", "no_cache_s", ".2f"), ("no-cache ms/token", "no_cache_ms_per_token", ".1f"),
    ("speedup", "speedup", ".1f"), ("same tokens", "tokens_match", ""),
]


def render(results: dict) -> str:
    meta = results["meta"]
    parts = [
        f"PolyGLU benchmarks — {meta['date_utc']}, {meta['cpu']} ({meta['cpu_count']} cores, {meta['threads']} "
        f"thread(s)), torch {meta['torch']}, transformers {meta['transformers']}, repeats {meta['repeats']}"
        f"{' (quick sizes)' if meta['quick'] else ''}, fused mixing kernels compiled on CPU: "
        f"{meta['mixing_kernels_compiled_cpu']}, C++ CPU kernel: {meta.get('cpu_mixing_kernel')}; spread = ±half of (max - min) / median; paired = median over "
        "repetitions of the per-repetition ratio."
    ]
    suites = results["suites"]
    if "ffn" in suites:
        for case in suites["ffn"]["cases"]:
            parts.append(f"### ffn: {case['case']} (forward + backward)\n\n" + markdown_table(case["rows"], FFN_COLUMNS))
    if "hard" in suites:
        for case in suites["hard"]["cases"]:
            parts.append(f"### hard: {case['case']} (forward at inference, soft vs hard routing; swiglu "
                         f"{case['swiglu_ms']:.1f} ms)\n\n" + markdown_table(case["rows"], HARD_COLUMNS))
    if "step" in suites:
        step = suites["step"]
        model = step["model"]
        parts.append(f"### step: d={model['hidden_size']} F={model['intermediate_size']} "
                     f"layers={model['num_hidden_layers']} vocab={model['vocab_size']} tokens={step['batch']}x"
                     f"{step['tokens']} (forward + backward + AdamW)\n\n" + markdown_table(step["rows"], STEP_COLUMNS))
    if "decode" in suites:
        decode = suites["decode"]
        model = decode["model"]
        parts.append(f"### decode: d={model['hidden_size']} F={model['intermediate_size']} "
                     f"layers={model['num_hidden_layers']} vocab={model['vocab_size']}, prompt {decode['prompt_tokens']}, "
                     f"{decode['new_tokens']} new tokens, KV cache, batch 1\n\n"
                     + markdown_table(decode["rows"], DECODE_COLUMNS))
    if "generate" in suites:
        generate = suites["generate"]
        model = generate["model"]
        parts.append(f"### generate: polyglu (causal routing) d={model['hidden_size']} F={model['intermediate_size']} "
                     f"layers={model['num_hidden_layers']} vocab={model['vocab_size']}, prompt "
                     f"{generate['prompt_tokens']}, batch 1: generate() with cache vs no-cache loop\n\n"
                     + markdown_table(generate["rows"], GENERATE_COLUMNS))
    if "convert" in suites:
        parts.append("### convert: peak RSS of streaming `convert qwen3` (polyglu, --no-verify)\n\n"
                     + markdown_table(suites["convert"]["rows"], CONVERT_COLUMNS))
    if meta.get("recompile_warnings"):
        parts.append("torch._dynamo recompilation warnings (some fused kernels may have fallen back to eager):\n"
                     + "\n".join(f"* {message}" for message in meta["recompile_warnings"]))
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _csv_ints(text: str) -> tuple:
    return tuple(int(value) for value in text.split(",") if value.strip())


def _csv_ffn_types(text: str) -> tuple:
    values = tuple(value.strip() for value in text.split(",") if value.strip())
    unknown = [value for value in values if value not in FFN_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ffn_type(s) {unknown}; choose from {', '.join(FFN_TYPES)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyglu bench",
        description="Interleaved, single-threaded benchmarks reported as ratios (markdown table + JSON). "
                    "No timing is asserted; on a shared machine compare ratios, not absolute times.",
    )
    parser.add_argument("--suite", choices=SUITES + ("all",), default="ffn",
                        help="ffn (default): FFN block fwd+bwd and saved bytes; hard: soft vs hard routing at "
                             "inference; step: training step; convert: peak memory of streaming conversion; decode: cached "
                             "per-token latency; generate: cached generate() vs no-cache loop; all: every suite")
    parser.add_argument("--repeats", type=int,
                        help="interleaved repetitions per contender (default: ffn 5, hard 7, step 3, decode 5, "
                             "generate 3; convert always runs once; "
                             f"{QUICK_REPEATS} with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests and smoke runs)")
    parser.add_argument("--json", dest="json_path", help="output JSON (default benchmarks/results/<suite>.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads during the run (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="step/decode/generate device (auto: cuda if available); ffn always runs fp32 CPU and, "
                             "unless --device cpu, also bf16 CUDA when available")
    parser.add_argument("--ffn-types", type=_csv_ffn_types, default=FFN_TYPES,
                        help="comma-separated ffn_types to compare (default: all; swiglu is always included)")
    parser.add_argument("--decode-tokens", type=int, help=f"new tokens of the decode suite (default {DECODE_TOKENS})")
    parser.add_argument("--generate-lengths", type=_csv_ints,
                        help="new-token counts of the generate suite (default 64,128,256)")
    parser.add_argument("--convert-total-gb", type=float,
                        help=f"synthetic checkpoint size of the convert suite (default {conversion_benchmark.CONVERT_TOTAL_GB:g})")
    parser.add_argument("--convert-shard-mb", type=_csv_ints,
                        help="shard sizes of the convert suite (default 256,1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return parser


def run_benchmarks(args) -> dict:
    """Run the selected suites; returns {"meta": ..., "suites": {name: result}}."""
    suites = SUITES if args.suite == "all" else (args.suite,)
    if "swiglu" not in args.ffn_types:
        args.ffn_types = ("swiglu",) + tuple(args.ffn_types)
    with _benchmark_environment(args.threads) as watcher:
        meta = environment_info(args.threads)
        results = {}
        for suite in suites:
            suite_args = argparse.Namespace(**vars(args))
            if suite_args.repeats is None:
                suite_args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS[suite]
            started = time.perf_counter()
            results[suite] = RUNNERS[suite](suite_args)
            results[suite]["repeats"] = suite_args.repeats
            results[suite]["wall_s"] = time.perf_counter() - started
        meta.update({
            "suite": args.suite,
            "repeats": args.repeats if args.repeats is not None else ("per suite" if args.suite == "all" else
                                                                       results[suites[0]]["repeats"]),
            "warmup": args.warmup,
            "quick": bool(args.quick),
            "seed": args.seed,
            "load_average_end": _load_average(),
            "recompile_warnings": list(watcher.messages),
        })
    return {"meta": meta, "suites": results}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        print("polyglu bench: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.warmup < 0 or args.threads < 1:
        print("polyglu bench: error: --warmup must be >= 0 and --threads >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("polyglu bench: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    results = run_benchmarks(args)
    print(render(results))
    path = Path(args.json_path or Path("benchmarks") / "results" / f"{args.suite}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    if not args.silent:
        print(f"[polyglu bench] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
