"""The failure paths of `polyglu sft`: bad data named in one line, and runs that stop without losing or faking work.

* Datasets: a local path that does not exist, an empty or malformed JSON(L) file (file and line named), and columns
  that are none of the SFT formats are reported as ValueErrors before any model is loaded.
* A run stopped by a routing alert (`--routing_stop_on_alert`) is a failure: :class:`TrainingStoppedOnAlert` says
  which alert at which step; a model is written only from finite weights, otherwise the last checkpoint whose
  weights are all finite is named.
* An interrupted run says which checkpoint it left.
"""

import json
from pathlib import Path
from typing import Optional

import torch

# what TRL's SFTTrainer accepts (besides `dataset_text_field`): conversational, prompt-completion, pre-tokenized
SFT_COLUMN_SETS = (("messages",), ("prompt", "completion"), ("input_ids",))
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


class TrainingStoppedOnAlert(RuntimeError):
    """Training was stopped by a routing alert; the message names the alert, the step and what was kept."""


def looks_like_a_local_path(name: str) -> bool:
    """True for names a Hub dataset id cannot be (`owner/name` has one slash and no file suffix)."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in _DATA_SUFFIXES or name.count("/") > 1


def reject_missing_local_checkpoint(name_or_path: str, flag: str = "", hub_allowed: bool = True) -> None:
    """A local checkpoint path must hold a config.json: transformers would take anything else for a Hub id and fail
    with a message about repo names or model types."""
    path = Path(name_or_path).expanduser()
    if hub_allowed and not path.exists() and not looks_like_a_local_path(name_or_path):
        return  # a Hub name
    if not (path / "config.json").is_file():
        problem = "no config.json in it" if path.is_dir() else "no such directory"
        alternative = ", or a Hub model name" if hub_allowed else ""
        raise ValueError(f"{flag + ' ' if flag else ''}{name_or_path}: {problem}; pass the directory of a saved "
                         f"checkpoint (config.json and weights){alternative}.")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def reject_directory_without_tokenizer(directory, needed_by: str, flag: str = "") -> None:
    """A checkpoint directory used with text must carry its tokenizer (AutoTokenizer's own error is about
    sentencepiece)."""
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{flag + ' ' if flag else ''}{directory}: no tokenizer in it ({' or '.join(TOKENIZER_FILES)}), "
                         f"which {needed_by} needs; save the model's tokenizer there (tokenizer.save_pretrained(DIR)).")


def missing_local_dataset_message(name: str, flag: str = "--dataset_name") -> str:
    return f"{flag} {name}: no such file or directory; pass an existing JSONL file or directory, or a Hub dataset name."


def unavailable_hub_dataset_message(name: str, error: BaseException, flag: str = "--dataset_name") -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (
        f"{flag} {name}: not a local file or directory, and not loadable from the Hub ({first_line}); "
        "pass a JSONL file or directory, or check the dataset name and your connection."
    )


def is_blank_file(path: Path, block_size: int = 1 << 20) -> bool:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            if block.strip():
                return False
    return True


def check_not_empty(files) -> None:
    for file in files:
        if is_blank_file(Path(file)):
            raise ValueError(f"{file}: empty; a JSONL dataset needs one JSON object per line.")


def first_json_error(file: Path) -> Optional[str]:
    """'FILE:LINE: problem' for the first line of a JSON Lines file (or a whole .json file) that does not parse."""
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError:
            pass  # maybe JSON Lines with a .json name: check it line by line
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{file}:{number}: not valid JSON ({error.msg} at column {error.colno})"
        if not isinstance(value, dict):
            return f"{file}:{number}: a JSON {type(value).__name__}, not an object with the example's fields"
    return None


def malformed_data_message(files, error: BaseException) -> str:
    for file in files:
        problem = first_json_error(Path(file))
        if problem:
            return f"{problem}; fix or remove that line."
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{', '.join(map(str, files))}: could not be read as JSON Lines ({first_line})."


def check_sft_columns(columns, text_field: str, source: str, rows: int) -> None:
    """The dataset must have one of the column sets SFTTrainer accepts, and at least one row."""
    accepted = [*SFT_COLUMN_SETS, (text_field,)]
    if not any(all(name in columns for name in names) for names in accepted):
        choices = " | ".join("+".join(names) for names in accepted)
        raise ValueError(
            f"{source}: has columns {sorted(columns)}, none of the SFT formats ({choices}); rename the columns, or set "
            "--dataset_text_field to the text column."
        )
    if rows == 0:
        raise ValueError(f"{source}: has no examples.")


REQUIRED_SFT_INPUTS = {
    "--model_name_or_path": "the PolyGLU-family checkpoint to fine-tune (a directory from `polyglu convert qwen3`, or a "
                            "Hub name)",
    "--dataset_name": "the data (a JSONL file or directory, or a Hub dataset name)",
}


def require_model_and_dataset(model_name_or_path, dataset_name) -> None:
    """TRL's parser declares neither required: a run without them died on a None path (a traceback)."""
    given = {"--model_name_or_path": model_name_or_path, "--dataset_name": dataset_name}
    missing = [f"{flag}, {REQUIRED_SFT_INPUTS[flag]}" for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"it needs {'; and '.join(missing)}. Pass {'them' if len(missing) > 1 else 'it'}, or "
                         "--config recipes/<recipe>.yaml, which sets both.")


def reject_zero_max_steps(max_steps: int) -> None:
    if max_steps == 0:
        raise ValueError(
            "--max_steps 0 trains nothing; pass a positive number of steps, or -1 (the default) to train for --num_train_epochs."
        )


def reject_bf16_mode_beside_deepspeed_autocast(training_args) -> None:
    """DeepSpeed runs its own bf16 mode (every weight cast to bf16) when asked for bf16 next to a config that enables
    torch_autocast, and silently so; the autocast recipes exist to keep the weights fp32."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None) or {}
    autocast = config.get("torch_autocast") or {}
    if autocast.get("enabled") is True and (training_args.bf16 or training_args.fp16):
        flag = "--bf16" if training_args.bf16 else "--fp16"
        raise ValueError(
            f"{flag} true next to a DeepSpeed config that enables torch_autocast makes DeepSpeed cast every weight, "
            f"routers included, to {autocast.get('dtype', 'bfloat16')}; pass {flag} false (torch_autocast already "
            "computes in low precision with fp32 weights)."
        )


def reject_dora_with_tensor_parallelism(use_dora: bool, tensor_parallel: bool) -> None:
    """PEFT computes DoRA's weight norms from the sharded weight and its local LoRA product, which it cannot add."""
    if use_dora and tensor_parallel:
        raise ValueError(
            "--use_dora does not work with a tensor-parallel model (tp_plan in --model_init_kwargs): PEFT cannot take "
            "the norms of sharded weights. Use plain LoRA (or rsLoRA) with tensor parallelism, or DoRA with DDP, "
            "DeepSpeed or FSDP."
        )


# transformers' Trainer saves a model sharded at load time (from_pretrained with a tp_plan) from every rank, which the
# collective gather of its shards needs, from 5.19 on, and a PEFT model around one from 5.20 on. Before, rank 0 alone
# enters the gather and the run dies at its first save, after all its training (seen on 5.17, and LoRA on 5.19).
TENSOR_PARALLEL_SAVING_TRANSFORMERS = {"full": "5.19", "peft": "5.20"}


def tensor_parallelism_requested(init_kwargs: dict) -> bool:
    """Does --model_init_kwargs shard the model at load time: a tp_plan or tp_size > 1, standalone (TRL's idiom) or
    inside "distributed_config" (a JSON object or a DistributedConfig)?"""
    config = init_kwargs.get("distributed_config")
    fields = config if isinstance(config, dict) else vars(config) if config is not None else {}
    return any(
        source.get("tp_plan") is not None or int(source.get("tp_size") or 1) > 1 for source in (init_kwargs, fields)
    )


def reject_tensor_parallel_on_old_transformers(init_kwargs: dict, world_size: int, use_peft: bool,
                                               transformers_version: str) -> None:
    """Refuse, before any loading, a tensor-parallel run whose Trainer could not save what it trained."""
    from packaging.version import Version

    requested = tensor_parallelism_requested(init_kwargs)
    needed = TENSOR_PARALLEL_SAVING_TRANSFORMERS["peft" if use_peft else "full"]
    if requested and world_size > 1 and Version(transformers_version) < Version(needed):
        what = "LoRA on a tensor-parallel model" if use_peft else "tensor-parallel training"
        raise ValueError(
            f"{what} (tp_plan in --model_init_kwargs) needs transformers >= {needed}, found {transformers_version}: "
            "its Trainer saves a sharded model from rank 0 alone, so the gather of the shards cannot complete and the "
            f"run would die at its first save. pip install -U 'transformers>={needed}', or train with DDP, DeepSpeed "
            "or FSDP."
        )


def reject_lora_target_parameters(target_parameters) -> None:
    if target_parameters:
        raise ValueError(
            "--lora_target_parameters puts LoRA on bare parameters, which PolyGLU-family models train in full "
            "(the routers are saved with the adapter); drop it and use --lora_target_modules for projections."
        )


def checkpoints(output_dir) -> list[Path]:
    """`checkpoint-N` directories of a Trainer output dir, oldest first."""
    found = [path for path in Path(output_dir).glob("checkpoint-*") if path.is_dir() and path.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-")[-1]))


def safetensors_weights_are_finite(directory: Path) -> bool:
    """Whether every floating tensor of the model/adapter safetensors files in `directory` is finite (and one exists)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return False
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return False
    return True


def last_finite_checkpoint(output_dir) -> Optional[Path]:
    for checkpoint in reversed(checkpoints(output_dir)):
        if safetensors_weights_are_finite(checkpoint):
            return checkpoint
    return None


def parameters_are_finite(model) -> bool:
    """All trainable and frozen parameters finite, agreed by every process (a shard's NaN stops them all)."""
    import torch.distributed as dist

    finite = all(bool(torch.isfinite(parameter).all()) for parameter in model.parameters() if parameter.is_floating_point())
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = bool(flag.item() == 1.0)
    return finite


def saved_checkpoint_note(output_dir) -> str:
    saved = checkpoints(output_dir)
    if not saved:
        return "no checkpoint was saved (--save_strategy steps --save_steps N keeps some)"
    return f"the last checkpoint is {saved[-1]} (continue with --resume_from_checkpoint {saved[-1]})"


def stop_on_alert_message(stop: dict, output_dir, model_saved: bool) -> str:
    """What the user reads when an alert stopped training: the alert, its step, and what was kept."""
    head = f"training stopped by a routing alert at step {stop['step']} ({stop['kind']}: {stop['message']})"
    if model_saved:
        return f"{head}; the model at that step was saved to {output_dir}. Drop --routing_stop_on_alert to train through alerts."
    kept = last_finite_checkpoint(output_dir)
    where = (f"the last checkpoint with finite weights is {kept}" if kept is not None
             else "no checkpoint with finite weights was saved (--save_strategy steps --save_steps N keeps some)")
    return f"{head}; the weights are not finite, so no final model was written; {where}. Lower the learning rate or check the data."
