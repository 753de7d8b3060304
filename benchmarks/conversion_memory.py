"""Peak memory of streaming `convert qwen3` against the shard size, on a multi-GB synthetic Qwen3 checkpoint.

Writes a synthetic Qwen3 checkpoint (constant-valued tensors, written tensor by tensor so this script itself
stays small) for each shard size, converts it in a fresh process with `--no-verify`, and reports that process's
peak RSS minus the RSS of a process that only imports the package. Prints a markdown table and writes JSON.

    python benchmarks/conversion_memory.py --total-gb 3 --shard-mb 256 1024
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

_PEAK_RSS = r"""
import resource, sys
{body}
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def synthetic_qwen3(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int, shard_bytes: int):
    """A Qwen3 checkpoint directory in shards of about `shard_bytes`, never holding more than one shard in memory."""
    directory.mkdir(parents=True)
    heads, kv_heads, head_dim = hidden // 128, max(1, hidden // 256), 128
    config = dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=4096, dtype="bfloat16",
    )
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        shapes.update({
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{prefix}.self_attn.q_norm.weight": (head_dim,),
            f"{prefix}.self_attn.k_norm.weight": (head_dim,),
            f"{prefix}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{prefix}.mlp.up_proj.weight": (intermediate, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, intermediate),
        })
    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and current_bytes + nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = shape
        current_bytes += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: torch.full(shape, 0.01, dtype=torch.bfloat16) for name, shape in shard.items()},
                  str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        total += sum(2 * torch.Size(shape).numel() for shape in shard.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    largest = max(sum(2 * torch.Size(shape).numel() for shape in shard.values()) for shard in shards)
    return total, largest, len(shards)


def peak_rss(body: str) -> int:
    completed = subprocess.run([sys.executable, "-c", _PEAK_RSS.format(body=body)], capture_output=True, text=True, check=True)
    return int(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-gb", type=float, default=3.0, help="approximate checkpoint size")
    parser.add_argument("--shard-mb", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--ffn-type", default="polyglu")
    parser.add_argument("--json", default="benchmarks/results/conversion_memory.json")
    args = parser.parse_args()

    hidden, intermediate, vocab = 2048, 8192, 32768
    per_layer = 2 * (3 * hidden * intermediate + 2 * hidden * hidden + 2 * hidden * (hidden // 2))
    layers = max(1, int((args.total_gb * 2**30 - 2 * vocab * hidden) // per_layer))
    baseline = peak_rss("import modeling_polyglu.qwen3_conversion")
    rows = []
    for shard_mb in args.shard_mb:
        with tempfile.TemporaryDirectory(dir=".") as scratch:
            source = Path(scratch) / "src"
            total, largest, count = synthetic_qwen3(source, hidden, intermediate, layers, vocab, shard_mb * 2**20)
            body = (
                "from modeling_polyglu.qwen3_conversion import convert_qwen3\n"
                f"convert_qwen3({str(source)!r}, {str(Path(scratch) / 'dst')!r}, {args.ffn_type!r}, verify=False, log=lambda *a: None)"
            )
            peak = peak_rss(body)
            shutil.rmtree(source)
        extra = peak - baseline
        rows.append({"checkpoint_gib": total / 2**30, "shards": count, "largest_shard_mib": largest / 2**20,
                     "peak_rss_mib": peak / 2**20, "baseline_rss_mib": baseline / 2**20,
                     "peak_minus_baseline_mib": extra / 2**20, "ratio_to_largest_shard": extra / largest})
    print("| checkpoint (GiB) | shards | largest shard (MiB) | peak RSS (MiB) | peak − import baseline (MiB) | ÷ largest shard |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['checkpoint_gib']:.2f} | {row['shards']} | {row['largest_shard_mib']:.0f} | {row['peak_rss_mib']:.0f} | "
              f"{row['peak_minus_baseline_mib']:.0f} | {row['ratio_to_largest_shard']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
