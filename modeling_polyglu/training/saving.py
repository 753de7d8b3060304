"""The final directory of a training run: weights in the source's dtype and shard size, and a model card.

Trainer saves what it trained: on a CPU that is one unsharded fp32 file, twice the size of a bf16 source. The
final directory is rewritten tensor by tensor in the dtype the source checkpoint declared (routers stay fp32, as
the model keeps them) and in shards no larger than the source's largest, so the output is laid out like its
input. Intermediate `checkpoint-*` directories are left as Trainer wrote them (resuming needs their precision).
"""

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..conversion.checkpoint_io import INDEX_FILE, SINGLE_FILE, safetensors_shards, write_index, write_shard
from ..conversion.model_card import hub_id_of, write_model_card
from ..conversion.staging import write_text_atomically

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # when the source's own shards cannot be seen (a Hub id not on disk)
FLOAT_CODES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}  # safetensors dtype codes of floating tensors: bytes


def is_router_tensor(name: str) -> bool:
    return ".router." in name


def source_layout(name_or_path: str) -> tuple[Optional[str], int]:
    """(dtype name declared in the source's config.json or None, largest source shard in bytes)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError:
        config = {}
    dtype = config.get("dtype", config.get("torch_dtype"))
    directory = Path(name_or_path)
    shards = list(directory.glob("*.safetensors")) if directory.is_dir() else []
    largest = max((shard.stat().st_size for shard in shards), default=DEFAULT_MAX_SHARD_BYTES)
    return (dtype if dtype in DTYPES else None), largest


def _shard_plan(tensors: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, nbytes in tensors:
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + ([current] if current else [])


def resave_like_source(directory, dtype_name: Optional[str], max_shard_bytes: int, tied: dict = None) -> None:
    """Rewrite the weights of `directory` in `dtype_name` (routers fp32) and in shards of ≤ max_shard_bytes.

    `tied` maps a tied weight's name to the one it shares storage with (lm_head → embeddings): a saved copy equal
    to its source is left out, as save_pretrained does (a tensor-parallel save writes both).
    New shards are written to a temporary folder inside `directory` and moved in when all are complete; the old
    weight files are removed last.
    """
    directory = Path(directory)
    target = DTYPES.get(dtype_name)
    old_files = safetensors_shards(directory)
    duplicates = _saved_tied_copies(old_files, tied or {})
    located, sizes = {}, []
    for shard in old_files:  # headers only
        with safe_open(str(shard), framework="pt") as handle:
            for name in (name for name in handle.keys() if name not in duplicates):
                piece = handle.get_slice(name)
                kept = target is None or is_router_tensor(name) or piece.get_dtype() not in FLOAT_CODES
                element = FLOAT_CODES.get(piece.get_dtype(), 8) if kept else torch.empty((), dtype=target).element_size()
                located[name] = shard
                sizes.append((name, math.prod(piece.get_shape()) * element))
    plan = _shard_plan(sizes, max_shard_bytes)
    names = [SINGLE_FILE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    staging = Path(tempfile.mkdtemp(prefix=".resave-", dir=directory))
    try:
        weight_map, total = {}, 0
        for file_name, shard_names in zip(names, plan):
            tensors = {}
            for shard in dict.fromkeys(located[name] for name in shard_names):
                with safe_open(str(shard), framework="pt") as handle:
                    for name in (name for name in shard_names if located[name] == shard):
                        tensor = handle.get_tensor(name)
                        keep = target is None or is_router_tensor(name) or not tensor.is_floating_point()
                        tensors[name] = tensor if keep else tensor.to(target)
            write_shard(tensors, staging / file_name)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, file_name))
            del tensors
        if len(plan) > 1:
            write_index(weight_map, total, staging)
        # new shards first, their index last, stale files after: at every moment the directory holds one complete
        # set that transformers loads (it prefers a single model.safetensors to an index)
        for name in names:
            os.replace(staging / name, directory / name)
        if len(plan) > 1:
            os.replace(staging / INDEX_FILE, directory / INDEX_FILE)
        for old in old_files + [directory / INDEX_FILE]:
            if old.exists() and old.name not in names and not (len(plan) > 1 and old.name == INDEX_FILE):
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if target is not None:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["dtype"] = dtype_name
        write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _saved_tied_copies(files: list, tied: dict) -> set:
    """The names in `tied` that the files hold next to their source with equal values."""
    located = {}
    for shard in files:
        with safe_open(str(shard), framework="pt") as handle:
            located.update(dict.fromkeys(handle.keys(), shard))
    copies = set()
    for name, source in tied.items():
        if name in located and source in located:
            with safe_open(str(located[name]), framework="pt") as copy, safe_open(str(located[source]), framework="pt") as original:
                if torch.equal(copy.get_tensor(name), original.get_tensor(source)):
                    copies.add(name)
    return copies


def write_training_card(directory, config, source: str, title: str, summary: str) -> None:
    """The model card of a trained directory; base_model is the source's Hub id when it has one."""
    hub_id = hub_id_of(source)
    lineage = f"Fine-tuned from `{hub_id}`." if hub_id else f"Fine-tuned from the local checkpoint `{Path(source).name}`."
    write_model_card(Path(directory), hub_id, config, title, f"{lineage} {summary}")
