"""The `convert` suite: peak memory of streaming `convert qwen3` against the shard size, on synthetic Qwen3 checkpoints.

For each shard size, a synthetic bf16 Qwen3 checkpoint (constant-valued tensors, written shard by shard so this
process stays small) is converted in a fresh process with `verify=False`; the reported figure is that process's
peak RSS minus the peak RSS of a process that only imports the converter. Not a timing: one run per shard size.
"""

import json
import shutil
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

COLUMNS = [
    ("checkpoint GiB", "checkpoint_gib", ".2f"), ("shards", "shards", "d"), ("largest shard MiB", "largest_shard_mib", ".0f"),
    ("peak RSS MiB", "peak_rss_mib", ".0f"), ("peak − import baseline MiB", "peak_minus_baseline_mib", ".0f"),
    ("÷ largest shard", "ratio_to_largest_shard", ".2f"),
]


def _bf16_bytes(shape) -> int:
    return 2 * torch.Size(shape).numel()


def synthetic_qwen3(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int, shard_bytes: int):
    """A bf16 Qwen3 checkpoint in shards of about `shard_bytes`; returns (total bytes, largest shard, shard count)."""
    directory.mkdir(parents=True)
    head_dim = min(128, hidden)
    heads, kv_heads = max(1, hidden // head_dim), max(1, hidden // (2 * head_dim))
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
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: torch.full(shape, 0.01, dtype=torch.bfloat16) for name, shape in shard.items()},
                  str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        sizes.append(sum(_bf16_bytes(shape) for shape in shard.values()))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(sizes), max(sizes), len(shards)


def peak_rss(body: str) -> int:
    """Peak resident bytes of a fresh interpreter that runs `body`."""
    completed = subprocess.run([sys.executable, "-c", _PEAK_RSS.format(body=body)], capture_output=True, text=True,
                               check=True)
    return int(completed.stdout.strip().splitlines()[-1])


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


def run(args) -> dict:
    quick = args.quick
    total_gb = args.convert_total_gb or (CONVERT_TOTAL_GB_QUICK if quick else CONVERT_TOTAL_GB)
    shard_mbs = args.convert_shard_mb or (CONVERT_SHARD_MB_QUICK if quick else CONVERT_SHARD_MB)
    model = CONVERT_MODEL_QUICK if quick else CONVERT_MODEL
    rows = conversion_memory_rows(total_gb, shard_mbs, model, on_progress=lambda message: progress(args, message))
    return {
        "description": "Peak RSS of `convert qwen3 --no-verify` (polyglu) in a fresh process on a synthetic bf16 "
                       "Qwen3 checkpoint, minus the peak RSS of a process that only imports the converter, "
                       "against the largest shard. Not a timing: one run per shard size.",
        "model": dict(zip(("hidden_size", "intermediate_size", "vocab_size"), model)),
        "rows": rows,
    }


def render(result: dict) -> list:
    return ["### convert: peak RSS of streaming `convert qwen3` (polyglu, --no-verify)\n\n"
            + markdown_table(result["rows"], COLUMNS)]
