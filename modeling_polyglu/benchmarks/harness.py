"""The measurement harness shared by the `polyglu bench` suites: interleaved timing, saved bytes, tables, JSON.

Every figure is a RATIO between contenders measured in one process: for each repetition every contender runs once,
in round-robin order (the starting contender rotates from one repetition to the next), after a warm-up round; each
contender's median over the repetitions is taken and divided by its baseline's median. Timings run with
``torch.set_num_threads(1)`` (``--threads``) so that contenders do not compete for cores; on a shared machine the
absolute numbers drift, the ratios much less. Nothing here asserts anything about speed.
"""

import datetime
import importlib.metadata
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

from .. import activation_mixing, cpu_mixing_kernel
from ..conversion.staging import write_text_atomically

RECOMPILE_LIMIT = 64

# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> Callable[[], dict]:
    """A contender that runs `function` once and reports its wall time as {"seconds": s}."""

    def run():
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
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


def summarize_metric(samples: dict, metric: str = "seconds") -> dict:
    """name -> summarize() of one metric, for the samples of run_interleaved."""
    return {name: summarize(metrics[metric]) for name, metrics in samples.items()}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def paired_ratio(samples: list, baseline_samples: list) -> float:
    """Median over repetitions of sample / baseline sample of the same repetition (cancels slow drifts of the load)."""
    return statistics.median(ratio(a, b) for a, b in zip(samples, baseline_samples))


def time_vs_swiglu(times: dict, name: str) -> dict:
    """The time columns of one contender's row: median, spread, samples, and both ratios to swiglu."""
    median, baseline = times[name]["median"], times["swiglu"]
    return {
        "time_ms": median * 1e3,
        "time_rel_spread": times[name]["rel_spread"],
        "time_samples_ms": [value * 1e3 for value in times[name]["samples"]],
        "time_vs_swiglu": ratio(median, baseline["median"]),
        "time_vs_swiglu_paired": paired_ratio(times[name]["samples"], baseline["samples"]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Saved bytes
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# The process the suites run in
# ----------------------------------------------------------------------------------------------------------------


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
def benchmark_environment(threads: int):
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


def with_environment(function, overrides: dict):
    """`function` run with the environment variables `overrides` set."""

    def run():
        with _environment(overrides):
            return function()

    return run


def compilation_state(device_type: str = "cpu") -> Optional[bool]:
    """Whether the fused mixing kernels are torch.compile'd here (None: this version never compiles them)."""
    check = getattr(activation_mixing, "compilation_enabled", None)
    return None if check is None else bool(check(device_type))


def cpu_kernel_available() -> bool:
    """Whether the C++ CPU mixing kernel is built (building it now if needed) and enabled."""
    return cpu_mixing_kernel.load_library() is not None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list]:
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
        "mixing_kernels_compiled_cpu": compilation_state("cpu"),
        "cpu_mixing_kernel": cpu_kernel_available(),
        "dynamo_recompile_limit": getattr(_dynamo_config(), "recompile_limit", None),
        "load_average_start": load_average(),
    }
    if torch.cuda.is_available():
        info["mixing_kernels_compiled_cuda"] = compilation_state("cuda")
        info["triton"] = _installed_version("triton")  # the Triton mixing kernel's compiler, when installed
        info["liger_kernel"] = _installed_version("liger-kernel")
    return info


def _installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def progress(args, message: str) -> None:
    if not args.silent:
        print(f"[polyglu bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Tables and JSON
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


def model_label(sizes: dict) -> str:
    """`d=… F=… layers=… vocab=…` of a whole-model suite's model, for table headings."""
    return (f"d={sizes['hidden_size']} F={sizes['intermediate_size']} layers={sizes['num_hidden_layers']} "
            f"vocab={sizes['vocab_size']}")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(results, indent=2, allow_nan=True) + "\n")
