"""Reading and writing checkpoint directories tensor by tensor, with errors that name the file and the problem.

Conversions stream: they read one safetensors shard at a time and write it out before touching the next, so
peak memory stays near one shard. Nothing here instantiates a model.
"""

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..modeling_polyglu import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_FILES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointError(ValueError):
    """A source that is not what it claims to be; the message names the file and what is wrong."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found — {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def safetensors_shards(directory: Path) -> list[Path]:
    """The shard files of a safetensors checkpoint directory (single file or sharded with an index)."""
    if (directory / INDEX_FILE).is_file():
        index = read_json(directory / INDEX_FILE, "the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{directory / INDEX_FILE}: has no weight_map")
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: listed in {INDEX_FILE} but missing")
        return shards
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: holds only pickle weights (.bin/.pt); re-save it with safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and convert that."
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def shard_header(shard: Path) -> tuple[dict[str, tuple], dict]:
    """{name: shape} and metadata of a safetensors file, reading only its header."""
    try:
        with safe_open(str(shard), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            return shapes, handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for garbage or truncated headers
        raise CheckpointError(f"{shard}: not a readable safetensors file, corrupt or truncated ({error})") from None


def iter_shard_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one safetensors file; a truncated or corrupt file raises CheckpointError."""
    try:
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{shard}: cannot read tensors, the file is truncated or corrupt ({error})") from None


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as error:  # safetensors reports a full or read-only disk as its own SafetensorError
        raise OSError(f"{path}: could not be written ({error})") from None


def write_index(weight_map: dict[str, str], total_bytes: int, directory: Path) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer_and_generation_config(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def write_config_and_remote_code(config, destination: Path) -> None:
    """config.json with an auto_map for every Auto class, plus the model's own .py files (flat, as transformers does).

    `architectures` names the causal LM the weights are (what save_pretrained writes); serving engines such as
    vLLM pick the model class from it.
    """
    config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
    config.architectures = [REMOTE_CODE_AUTO_MAP["AutoModelForCausalLM"].rsplit(".", 1)[1]]
    config.to_json_file(str(destination / "config.json"))
    package = Path(__file__).resolve().parent.parent  # the package root, where the model files stand
    for name in REMOTE_CODE_FILES:
        shutil.copy2(package / name, destination / name)
