"""The `convert` suite: peak memory of `convert qwen3`, on synthetic Qwen3 checkpoints.

* streaming rows: for each shard size, a synthetic bf16 Qwen3 checkpoint (written shard by shard so this process
  stays small) is converted in a fresh process with `verify=False`; the figure is that process's peak RSS minus the
  peak RSS of a process that only imports the converter, against the largest shard.
* verified rows: a checkpoint of Qwen3-0.6B's exact shape (random bf16 weights, 3 shards) is converted with and
  without verification (the default, layer by layer against transformers' Qwen3); the figures are the whole
  process's peak RSS against the checkpoint size (the target is ≤ 2.5×) and its wall time.
One run per row; the wall time is one sample on a shared machine.
"""

import json
import shutil
import time
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..configuration_polyglu import PolyGLUConfig
from ..conversion.qwen3 import expected_qwen3_shapes
from .harness import markdown_table, progress

DEFAULT_REPEATS = 1

_PEAK_RSS = r"""
import resource
{body}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

# hidden, intermediate, vocab of the synthetic checkpoints (layers follow from the requested total size)
CONVERT_MODEL = (2048, 8192, 32768)
CONVERT_MODEL_QUICK = (64, 256, 512)
CONVERT_TOTAL_GB, CONVERT_SHARD_MB = 3.0, (256, 1024)
CONVERT_TOTAL_GB_QUICK, CONVERT_SHARD_MB_QUICK = 0.02, (2, 8)
# the verified rows: hidden, intermediate, layers, vocab, heads, kv heads, head dim, shards
QWEN3_0_6B_SHAPE = (1024, 3072, 28, 151936, 16, 8, 128, 3)
QWEN3_0_6B_SHAPE_QUICK = (64, 192, 4, 4096, 4, 2, 16, 3)
PEAK_TARGET = 2.5  # peak RSS of a verified conversion, in checkpoint sizes

COLUMNS = [
    ("checkpoint GiB", "checkpoint_gib", ".2f"), ("shards", "shards", "d"), ("largest shard MiB", "largest_shard_mib", ".0f"),
    ("peak RSS MiB", "peak_rss_mib", ".0f"), ("peak − import baseline MiB", "peak_minus_baseline_mib", ".0f"),
    ("÷ largest shard", "ratio_to_largest_shard", ".2f"),
]


def _bf16_bytes(shape) -> int:
    return 2 * torch.Size(shape).numel()


def _synthetic_tensor(shape, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, matrices N(0, 0.02²) in bf16: a finite forward at any depth, so verification means something."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def synthetic_qwen3(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int, shard_bytes: int,
                    heads: int = None, kv_heads: int = None, head_dim: int = None, seed: int = 0):
    """A random bf16 Qwen3 checkpoint in shards of about `shard_bytes`; returns (total bytes, largest shard, shard count)."""
    directory.mkdir(parents=True)
    head_dim = head_dim or min(128, hidden)
    heads = heads or max(1, hidden // head_dim)
    kv_heads = kv_heads or max(1, hidden // (2 * head_dim))
    config = dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=4096, dtype="bfloat16",
    )
    (directory / "config.json").write_text(json.dumps(config))
    dims = {key: config[key] for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")}
    shards, current, current_bytes = [], {}, 0
    for name, shape in expected_qwen3_shapes(PolyGLUConfig(**dims)).items():
        if current and current_bytes + _bf16_bytes(shape) > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = shape
        current_bytes += _bf16_bytes(shape)
    shards.append(current)
    weight_map, sizes = {}, []
    generator = torch.Generator().manual_seed(seed)
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: _synthetic_tensor(shape, generator) for name, shape in shard.items()},
                  str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        sizes.append(sum(_bf16_bytes(shape) for shape in shard.values()))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(sizes), max(sizes), len(shards)


def run_measured(body: str) -> tuple[int, float, list[str]]:
    """(peak resident bytes, wall seconds, other stdout lines) of a fresh interpreter that runs `body`."""
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", _PEAK_RSS.format(body=body)], capture_output=True, text=True,
                               check=True)
    lines = completed.stdout.strip().splitlines()
    return int(lines[-1]), time.perf_counter() - started, lines[:-1]


def peak_rss(body: str) -> int:
    """Peak resident bytes of a fresh interpreter that runs `body`."""
    return run_measured(body)[0]


def conversion_memory_rows(total_gb: float, shard_mbs, model=CONVERT_MODEL, ffn_type: str = "polyglu",
                           scratch_dir=None, on_progress=lambda message: None) -> list:
    hidden, intermediate, vocab = model
    per_layer = 2 * (3 * hidden * intermediate + 2 * hidden * hidden + 2 * hidden * (hidden // 2))
    layers = max(1, int((total_gb * 2**30 - 2 * vocab * hidden) // per_layer))
    baseline = peak_rss("import modeling_polyglu.conversion.qwen3")
    rows = []
    for shard_mb in shard_mbs:
        on_progress(f"convert: {total_gb:g} GB checkpoint, {shard_mb} MB shards")
        with tempfile.TemporaryDirectory(dir=scratch_dir) as scratch:
            source, destination = Path(scratch) / "src", Path(scratch) / "dst"
            total, largest, count = synthetic_qwen3(source, hidden, intermediate, layers, vocab, shard_mb * 2**20)
            peak = peak_rss(
                "from modeling_polyglu.conversion.qwen3 import convert_qwen3\n"
                f"convert_qwen3({str(source)!r}, {str(destination)!r}, {ffn_type!r}, verify=False, "
                "log=lambda *a: None)"
            )
            shutil.rmtree(source)
        rows.append({
            "checkpoint_gib": total / 2**30, "shards": count, "largest_shard_mib": largest / 2**20,
            "peak_rss_mib": peak / 2**20, "baseline_rss_mib": baseline / 2**20,
            "peak_minus_baseline_mib": (peak - baseline) / 2**20, "ratio_to_largest_shard": (peak - baseline) / largest,
        })
    return rows


VERIFIED_COLUMNS = [
    ("ffn_type", "ffn_type", ""), ("verify", "verify", ""), ("checkpoint GiB", "checkpoint_gib", ".2f"),
    ("shards", "shards", "d"), ("peak RSS MiB", "peak_rss_mib", ".0f"), ("peak ÷ checkpoint", "peak_to_checkpoint", ".2f"),
    ("wall s", "wall_s", ".1f"), ("max abs Δlogit", "max_abs_logit_diff", ".2e"),
]


def verified_conversion_rows(shape=QWEN3_0_6B_SHAPE, ffn_types=("polyglu",), scratch_dir=None,
                             on_progress=lambda message: None, verify_modes=(True, False)) -> list:
    """Peak RSS and wall time of `convert qwen3` with and without verification, on one synthetic checkpoint."""
    hidden, intermediate, layers, vocab, heads, kv_heads, head_dim, shard_count = shape
    rows = []
    with tempfile.TemporaryDirectory(dir=scratch_dir) as scratch:
        source = Path(scratch) / "src"
        per_layer = 2 * (3 * hidden * intermediate + 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim)
        shard_bytes = int(1.05 * (2 * vocab * hidden + layers * per_layer) / shard_count)  # tensors do not split evenly

        total, _, count = synthetic_qwen3(source, hidden, intermediate, layers, vocab, shard_bytes, heads, kv_heads, head_dim)
        for ffn_type in ffn_types:
            for verify in verify_modes:
                on_progress(f"convert: {total / 2**30:.2f} GiB Qwen3-shaped checkpoint to {ffn_type}, verify={verify}")
                destination = Path(scratch) / "dst"
                peak, seconds, lines = run_measured(
                    "from modeling_polyglu.conversion.qwen3 import convert_qwen3\n"
                    f"report = convert_qwen3({str(source)!r}, {str(destination)!r}, {ffn_type!r}, verify={verify}, "
                    "log=lambda *a: None)\n"
                    "print(report.max_abs_logit_diff)"
                )
                shutil.rmtree(destination)
                deviation = float(lines[-1]) if verify else float("nan")
                rows.append({
                    "ffn_type": ffn_type, "verify": "yes" if verify else "no", "checkpoint_gib": total / 2**30,
                    "shards": count, "peak_rss_mib": peak / 2**20, "peak_to_checkpoint": peak / total,
                    "wall_s": seconds, "max_abs_logit_diff": deviation, "layers": layers,
                })
    return rows


def run(args) -> dict:
    quick = args.quick
    total_gb = args.convert_total_gb or (CONVERT_TOTAL_GB_QUICK if quick else CONVERT_TOTAL_GB)
    shard_mbs = args.convert_shard_mb or (CONVERT_SHARD_MB_QUICK if quick else CONVERT_SHARD_MB)
    model = CONVERT_MODEL_QUICK if quick else CONVERT_MODEL
    report_progress = lambda message: progress(args, message)  # noqa: E731
    rows = conversion_memory_rows(total_gb, shard_mbs, model, on_progress=report_progress)
    shape = QWEN3_0_6B_SHAPE_QUICK if quick else QWEN3_0_6B_SHAPE
    return {
        "description": "Peak RSS of `convert qwen3 --no-verify` (polyglu) in a fresh process on a synthetic bf16 "
                       "Qwen3 checkpoint, minus the peak RSS of a process that only imports the converter, "
                       "against the largest shard. Not a timing: one run per shard size.",
        "model": dict(zip(("hidden_size", "intermediate_size", "vocab_size"), model)),
        "rows": rows,
        "verified_description": "Whole-process peak RSS and wall time of `convert qwen3` with verification (the "
                                "default) and with --no-verify, on a random bf16 checkpoint of Qwen3-0.6B's shape"
                                f"{' (quick: a tiny shape)' if quick else ''}; target peak ≤ {PEAK_TARGET}× the checkpoint.",
        "verified_model": dict(zip(("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                    "num_attention_heads", "num_key_value_heads", "head_dim"), shape)),
        # quick: the verified row only (each row is a fresh interpreter)
        "verified_rows": verified_conversion_rows(shape, on_progress=report_progress,
                                                  verify_modes=(True,) if quick else (True, False)),
    }


def render(result: dict) -> list:
    tables = ["### convert: peak RSS of streaming `convert qwen3` (polyglu, --no-verify)\n\n"
              + markdown_table(result["rows"], COLUMNS)]
    if result.get("verified_rows"):
        sizes = result["verified_model"]
        tables.append(f"### convert: verified conversion, d={sizes['hidden_size']} F={sizes['intermediate_size']} "
                      f"layers={sizes['num_hidden_layers']} vocab={sizes['vocab_size']} (whole-process peak; target "
                      f"≤ {PEAK_TARGET}× the checkpoint)\n\n" + markdown_table(result["verified_rows"], VERIFIED_COLUMNS))
    return tables
