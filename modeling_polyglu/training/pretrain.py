"""`polyglu pretrain`: causal-LM pretraining from scratch of a preset or any config, with the HF Trainer.

Arguments are :class:`PretrainArguments` (model, data, tokenizer), transformers' TrainingArguments (every flag passes
through) and the routing options of `polyglu sft` (:class:`~.callbacks.RoutingArguments`), parsed by TRL's parser,
so YAML recipes work: `--config recipe.yaml`. `--config` with any other value names the model config (a preset or a
JSON file), the same as `--model_config`.

* Data: see pretrain_data.py — packed rows with per-document position ids (no cross-document attention, PolyGLU
  pooling per document), a held-out evaluation set that is the same for every seed, the embedded `python-stdlib`
  corpus by default. `--max_steps` or `--max_tokens` sets the budget.
* The model's vocab_size and special token ids follow the tokenizer (a preset's are defaults only). Without
  `--tokenizer`, a character tokenizer over printable ASCII is built locally (made for the embedded corpus).
* Training: AdamW with a cosine schedule by default; router parameters are never weight-decayed; the τ schedule and
  routing monitor of `polyglu sft` (probe: held-out documents); eval every `--eval_steps` (and at the start, so loss
  curves begin at the untrained loss); checkpoints every `--save_steps`, `--resume_from_checkpoint` resumes.
* Output: `--output_dir` holds a normal checkpoint (safetensors, remote code, tokenizer, model card) loadable with
  `trust_remote_code=True`, and `run_summary.json` — written last, atomically, so its presence means the run finished.
"""

import difflib
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..conversion.staging import write_text_atomically
from .pretrain_data import EMBEDDED_DATASET

RUN_SUMMARY_FILE = "run_summary.json"
RECIPE_SUFFIXES = (".yaml", ".yml")
# training settings recorded in run_summary.json; `polyglu compare` reuses a finished run only if they agree
TRAINING_SETTINGS = (
    "max_steps", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "weight_decay",
    "warmup_steps", "lr_scheduler_type", "adam_beta1", "adam_beta2", "eval_steps", "seed", "data_seed",
    "world_size",  # processes: with per_device_train_batch_size, the batch each step trains on
)


@dataclass
class PretrainArguments:
    """Model, data and tokenizer of `polyglu pretrain`."""

    model_config: str = field(default="tiny-debug", metadata={"help": "Preset name or JSON config file of the model (also `--config NAME|FILE.json`)."})
    ffn_type: Optional[str] = field(default=None, metadata={"help": "Override the config's ffn_type."})
    intermediate_size: Optional[int] = field(default=None, metadata={"help": "Override the config's intermediate_size."})
    config_overrides: Optional[str] = field(default=None, metadata={"help": 'JSON object of further config fields, e.g. \'{"routing_tau": 0.5}\'.'})
    dataset: str = field(default=EMBEDDED_DATASET, metadata={"help": f"Hub dataset name, local JSONL/JSON/.txt file or directory, or {EMBEDDED_DATASET!r} (embedded, offline)."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_field: str = field(default="text", metadata={"help": "Field holding each document's text."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it whole."})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer directory or Hub repo (default: a printable-ASCII character tokenizer built locally)."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Tokens per packed row (default: min(2048, max_position_embeddings))."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Training budget in tokens (sets max_steps)."})
    eval_rows: int = field(default=64, metadata={"help": "Held-out rows of max_length tokens to evaluate on."})

    def __post_init__(self):
        if self.eval_rows < 1:
            raise ValueError(f"eval_rows must be >= 1, got {self.eval_rows}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}.")
        if self.config_overrides is not None:
            parsed = _json_object(self.config_overrides)
            if not isinstance(parsed, dict):
                raise ValueError(f"config_overrides must be a JSON object, got {self.config_overrides!r}.")
            check_config_fields(parsed, "config_overrides")


@functools.lru_cache(maxsize=1)
def config_field_names() -> frozenset:
    """Every field a PolyGLUConfig saves, and Qwen3's older rope fields (folded into rope_parameters)."""
    from ..configuration_polyglu import PolyGLUConfig

    return frozenset(PolyGLUConfig().to_dict()) | {"rope_theta", "rope_scaling"}


def check_config_fields(names, source: str) -> None:
    """Refuse a name PolyGLUConfig lacks: the config would keep it as an attribute that nothing reads (a typo)."""
    known = config_field_names()
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{source}: {name!r} is not a PolyGLUConfig field; {hint}PolyGLUConfig's docstring "
                             "lists the fields.")


def _json_object(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config_overrides is not valid JSON ({error}): {text!r}.") from None


def argument_classes():
    from transformers import TrainingArguments

    from .callbacks import RoutingArguments

    return PretrainArguments, TrainingArguments, RoutingArguments


def build_parser(extra_classes=(), prog: str = "polyglu pretrain"):
    from trl import TrlParser

    parser = TrlParser(tuple(extra_classes) + argument_classes(), prog=prog)
    defaults = {
        "report_to": "none", "logging_steps": 10, "lr_scheduler_type": "cosine", "learning_rate": 3e-4,
        "warmup_steps": 0.05, "weight_decay": 0.1, "adam_beta2": 0.95, "eval_strategy": "steps", "eval_steps": 50,
        "eval_on_start": True, "save_strategy": "steps", "save_steps": 50, "save_total_limit": 1,
        "prediction_loss_only": True, "per_device_train_batch_size": 16,
    }
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    parser.set_defaults(**defaults)
    return parser


def normalise_config_flag(argv: list[str]) -> list[str]:
    """`--config X` is a YAML recipe when X ends in .yaml/.yml, otherwise the model config (`--model_config X`)."""
    result = []
    for index, item in enumerate(argv):
        previous = argv[index - 1] if index else None
        if previous == "--config" and not item.endswith(RECIPE_SUFFIXES):
            result[-1] = "--model_config"
        if item.startswith("--config=") and not item.endswith(RECIPE_SUFFIXES):
            item = "--model_config=" + item.split("=", 1)[1]
        result.append(item)
    return result


def parse_arguments(parser, argv):
    return parser.parse_args_and_config(args=normalise_config_flag(list(argv)))


def load_tokenizer(name_or_path: Optional[str]):
    if name_or_path is None:
        from .pretrain_data import build_ascii_tokenizer

        return build_ascii_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def model_config_values(source: str) -> dict:
    """Config fields of a preset name, a JSON file or a checkpoint directory's config.json."""
    from ..presets import preset_path

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if not path.is_file() and (path.suffix == ".json" or len(path.parts) > 1):
        problem = "no config.json in it" if path.is_dir() else "no such file"
        raise ValueError(f"--model_config {source}: {problem}; pass a preset name, a JSON config file or a checkpoint "
                         "directory.")
    if not path.is_file():
        path = preset_path(source)  # raises a one-line error naming the available presets
    values = json.loads(path.read_text())
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"):
        values.pop(key, None)
    return values


def build_config(arguments: PretrainArguments, tokenizer):
    """The PolyGLUConfig to train: the source config, the overrides, and the tokenizer's vocabulary and ids."""
    from ..configuration_polyglu import PolyGLUConfig

    values = model_config_values(arguments.model_config)
    values.update(_json_object(arguments.config_overrides) if arguments.config_overrides else {})
    if arguments.ffn_type is not None:
        values.update(ffn_type=arguments.ffn_type, ffn_types=None)
    if arguments.intermediate_size is not None:
        values["intermediate_size"] = arguments.intermediate_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    values.update(vocab_size=len(tokenizer), pad_token_id=pad, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return PolyGLUConfig(**values)


def resolve_max_length(arguments: PretrainArguments, config) -> int:
    limit = config.max_position_embeddings
    length = arguments.max_length or min(2048, limit)
    if not 2 <= length <= limit:
        raise ValueError(f"max_length={length} must lie in [2, max_position_embeddings={limit}].")
    return length


def tokens_per_step(training_args, max_length: int) -> int:
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size * max_length


def resolve_max_steps(arguments: PretrainArguments, training_args, max_length: int) -> int:
    if arguments.max_tokens is not None:
        return math.ceil(arguments.max_tokens / tokens_per_step(training_args, max_length))
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError("Set the training budget with --max_steps N or --max_tokens N.")
    return training_args.max_steps


def training_settings(training_args) -> dict:
    """TRAINING_SETTINGS as JSON values (enums as their strings)."""
    return json.loads(json.dumps({name: getattr(training_args, name) for name in TRAINING_SETTINGS}, default=str))


def count_parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once), whole also where ZeRO-3 holds a slice of each."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in model.parameters())


def new_model(config, seed: int):
    """A model initialised under `seed`; under DeepSpeed ZeRO-3 partitioned over the ranks as it is built.

    Under ZeRO-3 transformers builds each layer inside `deepspeed.zero.Init` with torch's default initialisation
    off, then draws every weight in its own init order, so no rank ever holds the whole model. The other engines
    build the model the same way without the partitioning: the same seed gives the same weights on every engine.
    """
    from transformers import set_seed
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    from ..modeling_polyglu import PolyGLUForCausalLM

    set_seed(seed)
    if is_deepspeed_zero3_enabled():
        return PolyGLUForCausalLM._from_config(config)
    with no_init_weights():
        model = PolyGLUForCausalLM(config)
    model.initialize_weights()
    model.tie_weights()
    return model


def eval_loss_history(log_history: list[dict]) -> list[list]:
    """[[step, eval_loss], ...] in step order, one entry per step (the latest, e.g. after a resume)."""
    by_step = {entry["step"]: entry["eval_loss"] for entry in log_history if "eval_loss" in entry}
    return [[step, by_step[step]] for step in sorted(by_step)]


def complete_checkpoints(output_dir) -> list[Path]:
    """checkpoint-N folders with their trainer state written (the Trainer writes it last), oldest first."""
    folders = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.split("-", 1)[1]
        if suffix.isdigit() and (folder / "trainer_state.json").is_file():
            folders.append((int(suffix), folder))
    return [folder for _, folder in sorted(folders)]


def read_run_summary(output_dir) -> Optional[dict]:
    path = Path(output_dir) / RUN_SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _pretrain_trainer_class():
    from transformers import Trainer

    from .trainer import RouterNoDecayMixin, RoutersSavedInFp32Mixin

    class PolyGLUPretrainTrainer(RouterNoDecayMixin, RoutersSavedInFp32Mixin, Trainer):
        """Trainer with `polyglu sft`'s router hygiene (no decay, saved in fp32) whose forwards never build a KV cache.

        In eval mode the model would otherwise create a cache, and with a cache transformers ignores the packed
        documents in the position ids (DESIGN §4): attention and routing would cross document boundaries.
        """

        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)

    return PolyGLUPretrainTrainer


def run_pretrain(arguments: PretrainArguments, training_args, routing_args, model=None, quiet: bool = False) -> dict:
    """Train, save the checkpoint and `run_summary.json`; return the summary. `model`: a prepared initial model."""
    from transformers import default_data_collator

    from ..conversion.model_card import write_model_card
    from .callbacks import add_routing_callbacks, remove_console_printers
    from .pretrain_data import PackedRowStream, document_token_ids, held_out_rows, load_documents
    from .safeguards import reject_bf16_mode_beside_deepspeed_autocast

    reject_bf16_mode_beside_deepspeed_autocast(training_args)
    settings = training_settings(training_args)  # as given, before max_steps is resolved
    tokenizer = load_tokenizer(arguments.tokenizer)
    config = build_config(arguments, tokenizer) if model is None else model.config
    max_length = resolve_max_length(arguments, config)
    training_args.max_steps = resolve_max_steps(arguments, training_args, max_length)

    train_documents, eval_documents = load_documents(arguments.dataset, arguments.dataset_config, arguments.text_field, arguments.streaming)
    if eval_documents is None:  # hold out the head of a fixed order of the training documents
        train_documents = train_documents.fixed_shuffle(seed=0)
        eval_documents = train_documents
    eval_rows, used = held_out_rows(eval_documents, tokenizer, max_length, arguments.eval_rows)
    if not eval_rows:
        raise ValueError(f"The evaluation documents do not fill one row of {max_length} tokens; lower --max_length.")
    probe_texts = [text for text, _ in zip(eval_documents.ordered(), range(routing_args.routing_probe_size))]
    if eval_documents is train_documents:
        train_documents = train_documents.without_head(used)
    training_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    if model is None:
        model = new_model(config, training_args.seed)
    trainer = _pretrain_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=PackedRowStream(train_documents, tokenizer, max_length, training_seed),
        eval_dataset=eval_rows if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    if quiet:
        remove_console_printers(trainer)
    probe_ids = [ids[:max_length] for ids in document_token_ids(probe_texts, tokenizer)] if probe_texts else []
    trainer.routing_monitor = add_routing_callbacks(trainer, routing_args, probe_ids, config.pad_token_id)

    resume = training_args.resume_from_checkpoint
    start_step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
    output = trainer.train(resume_from_checkpoint=resume)
    if training_args.eval_strategy != "no":
        history = eval_loss_history(trainer.state.log_history)
        if not history or history[-1][0] != trainer.state.global_step:
            trainer.evaluate()  # the final loss is measured after the last step
    trainer.save_model(training_args.output_dir)
    history = eval_loss_history(trainer.state.log_history)
    steps_now = trainer.state.global_step - start_step
    summary = {
        "ffn_type": config.ffn_type,
        "seed": training_args.seed,
        "final_eval_loss": history[-1][1] if history else None,
        "final_step": trainer.state.global_step,
        "num_parameters": count_parameters(model),
        "intermediate_size": config.intermediate_size,
        "tokens_per_step": tokens_per_step(training_args, max_length),
        "tokens_per_second": steps_now * tokens_per_step(training_args, max_length) / output.metrics["train_runtime"] if steps_now else None,
        "resumed_from_step": start_step or None,
        "eval_loss_history": history,
        "dataset": arguments.dataset,
        "max_length": max_length,
        "arguments": asdict(arguments),
        "training_settings": settings,
    }
    if trainer.is_world_process_zero():
        write_model_card(
            Path(training_args.output_dir), None, config, f"{config.ffn_type} language model trained from scratch",
            f"Trained with `polyglu pretrain` on {arguments.dataset} for {trainer.state.global_step} steps "
            f"({summary['tokens_per_step']} tokens per step); final held-out loss {summary['final_eval_loss']}.",
        )
        write_text_atomically(Path(training_args.output_dir) / RUN_SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = build_parser()
    arguments, training_args, routing_args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    summary = run_pretrain(arguments, training_args, routing_args)
    if training_args.process_index == 0:
        print(f"Saved the pretrained {summary['ffn_type']} model ({summary['num_parameters']:,} parameters) to "
              f"{training_args.output_dir}; final eval loss {summary['final_eval_loss']:.4f}")
    from .engines import close_process_group

    close_process_group()  # a gloo group left to interpreter exit can abort the process (see engines.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
