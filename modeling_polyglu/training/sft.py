"""`polyglu sft`: supervised fine-tuning of PolyGLU-family models with TRL, with routing monitoring.

Arguments are TRL's (ScriptArguments, SFTConfig, ModelConfig) plus :class:`RoutingArguments`, parsed by TrlParser, so
`--config recipes/<recipe>.yaml` works as with `trl sft`. Differences from `trl sft`:

* local data: `--dataset_name` may be a JSONL file or a directory of JSON/JSONL files (loaded with
  `load_dataset("json", data_files=...)`, which works offline; a bare path would be looked up on the Hub);
* without CUDA the defaults become `use_cpu=True, bf16=False` (TRL's bf16 default raises on a CPU);
* router parameters are never weight-decayed; `--use_peft` puts LoRA on every attention/FFN projection and trains the
  routers in full (`modules_to_save=["router"]`, saved in the adapter), with `--use_rslora`/`--use_dora` honoured;
  the adapter starts from weights drawn by seed and parameter name, so every parallel layout (tensor parallelism
  included) starts where one process does;
* a held-out probe slice (`--routing_probe_size` examples) is removed from the training data and used by the routing
  monitor; its report and plots land in `--output_dir`.
"""

import os
import sys
from pathlib import Path

import torch

from . import safeguards


def build_parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from .callbacks import RoutingArguments

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, RoutingArguments), prog="polyglu sft")
    # logging_nan_inf_filter=False: a NaN loss is logged as NaN, not replaced by the running mean (0 if all NaN)
    defaults = {"report_to": "none", "save_strategy": "no", "logging_steps": 10, "logging_nan_inf_filter": False}
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    parser.set_defaults(**defaults)
    return parser


def load_training_dataset(name_or_path: str, config_name=None, flag: str = "--dataset_name"):
    """A DatasetDict from a local JSON/JSONL file or directory, or from the Hub by name (`flag`: the option that named
    it, for the error messages)."""
    from datasets import load_dataset

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _load_json_files({"train": [str(path)]})
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ValueError(f"{path}: no .json or .jsonl files found.")
        splits = {}
        for file in files:
            split = "test" if Path(file).stem in ("test", "eval", "validation") else "train"
            splits.setdefault(split, []).append(file)
        return _load_json_files(splits)
    if safeguards.looks_like_a_local_path(name_or_path):
        raise ValueError(safeguards.missing_local_dataset_message(name_or_path, flag))
    try:
        return load_dataset(name_or_path, name=config_name)
    except (OSError, ConnectionError) as error:  # DatasetNotFoundError and offline errors are among them
        raise ValueError(safeguards.unavailable_hub_dataset_message(name_or_path, error, flag)) from None


def _load_json_files(splits: dict):
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    files = [file for split_files in splits.values() for file in split_files]
    safeguards.check_not_empty(files)
    try:
        return load_dataset("json", data_files=splits)
    except DatasetGenerationError as error:
        raise ValueError(safeguards.malformed_data_message(files, error)) from None


def _announce(message: str) -> None:
    """Print once per run, not once per process (RANK is set by torchrun and accelerate launch)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def _split_probe(dataset, script_args, routing_args, seed: int):
    """(train, eval_or_None, probe_examples): the probe is the eval split's head, or held out from train."""
    train = dataset[script_args.dataset_train_split]
    evaluation = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
    size = routing_args.routing_probe_size if routing_args.routing_monitor_steps > 0 else 0
    if size <= 0:
        return train, evaluation, []
    if evaluation is not None and len(evaluation) >= size:
        _announce(f"Routing monitor: the probe set is the first {size} examples of the '{script_args.dataset_test_split}' "
              "split (--routing_probe_size); training uses every training example.")
        return train, evaluation, [evaluation[i] for i in range(size)]
    if len(train) <= size:
        raise ValueError(f"The training set has {len(train)} examples, too few to hold out {size} for the routing probe.")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    _announce(f"Routing monitor: holding out {size} of the {len(train)} training examples as its probe set (not trained "
          f"on); change it with --routing_probe_size N, or give the data a test split of at least {size} examples.")
    return parts["train"], evaluation, list(parts["test"])



STANDALONE_TENSOR_PARALLEL_KEYS = ("tp_plan", "tp_size")


def with_distributed_config(init_kwargs: dict) -> dict:
    """`init_kwargs` for from_pretrained, with tp_plan/tp_size (TRL's idiom) or a "distributed_config" JSON object
    turned into the transformers.DistributedConfig it expects: from_pretrained takes no dict there, and it deprecates
    the standalone arguments (5.17-5.25 warn, and build the same DistributedConfig from them)."""
    standalone = {key: init_kwargs[key] for key in STANDALONE_TENSOR_PARALLEL_KEYS if init_kwargs.get(key) is not None}
    given = init_kwargs.get("distributed_config")
    if not standalone and not isinstance(given, dict):
        return {key: value for key, value in init_kwargs.items() if key not in STANDALONE_TENSOR_PARALLEL_KEYS}
    if standalone and given is not None:
        raise ValueError(
            f"--model_init_kwargs has both {' and '.join(standalone)} and distributed_config; put everything in one, "
            'e.g. {"distributed_config": {"tp_plan": "auto"}}.'
        )
    from transformers import DistributedConfig

    fields = given if isinstance(given, dict) else standalone
    try:
        config = DistributedConfig(**fields)
    except TypeError as error:  # an unknown field
        raise ValueError(f"--model_init_kwargs distributed_config {fields}: {error}; see transformers.DistributedConfig "
                         "for its fields.") from None
    rest = {key: value for key, value in init_kwargs.items()
            if key not in (*STANDALONE_TENSOR_PARALLEL_KEYS, "distributed_config")}
    return {**rest, "distributed_config": config}


def load_model_and_tokenizer(model_args, training_args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_polyglu  # noqa: F401  registers the Auto classes

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    # SFTConfig.model_init_kwargs reach from_pretrained as with TRL's own loading (e.g. {"tp_plan": "auto"} for
    # tensor parallelism under torchrun); the trainer gets an instance, so it must not see them again
    init_kwargs = with_distributed_config(dict(getattr(training_args, "model_init_kwargs", None) or {}))
    training_args.model_init_kwargs = None
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        **{
            "revision": model_args.model_revision,
            "trust_remote_code": training_args.trust_remote_code,
            "attn_implementation": model_args.attn_implementation,
            "dtype": dtype,
            **init_kwargs,
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model, tokenizer


def run_sft(script_args, training_args, model_args, routing_args, quiet: bool = False):
    """Fine-tune and save; returns the trainer (its routing monitor, if any, as `trainer.routing_monitor`).

    `quiet` keeps the console free of per-step log dictionaries (they still reach log_history and report_to).
    """
    import transformers

    from .callbacks import add_routing_callbacks, remove_console_printers
    from .peft import (
        draw_lora_weights_by_name, finish_tensor_parallel_lora, is_tensor_parallel, lora_config_for,
        prepare_tensor_parallel_lora,
    )
    from .routing_stats import tokenize_probe, unwrap_polyglu_model
    from .trainer import PolyGLUSFTTrainer

    safeguards.require_model_and_dataset(model_args.model_name_or_path, script_args.dataset_name)
    safeguards.reject_missing_local_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
    safeguards.reject_zero_max_steps(training_args.max_steps)
    safeguards.reject_bf16_mode_beside_deepspeed_autocast(training_args)
    safeguards.reject_tensor_parallel_on_old_transformers(
        training_args.model_init_kwargs or {}, training_args.world_size, model_args.use_peft, transformers.__version__
    )
    from .saving import source_layout

    source_weights = source_layout(model_args.model_name_or_path)  # dtype and shard size to save in, read before training
    dataset = load_training_dataset(script_args.dataset_name, script_args.dataset_config)
    train_split = dataset[script_args.dataset_train_split] if script_args.dataset_train_split in dataset else None
    if train_split is None:
        raise ValueError(f"{script_args.dataset_name}: has no '{script_args.dataset_train_split}' split (found {', '.join(dataset)}).")
    safeguards.check_sft_columns(
        train_split.column_names, training_args.dataset_text_field, script_args.dataset_name, len(train_split)
    )
    train, evaluation, probe_examples = _split_probe(dataset, script_args, routing_args, training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    unwrap_polyglu_model(model)  # a clear error now if this is not a PolyGLU-family model
    peft_config = None
    if model_args.use_peft:
        safeguards.reject_lora_target_parameters(model_args.lora_target_parameters)
        safeguards.reject_dora_with_tensor_parallelism(model_args.use_dora, is_tensor_parallel(model))
        peft_config = lora_config_for(
            model,
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            modules_to_save=model_args.lora_modules_to_save,
            use_rslora=model_args.use_rslora,
            use_dora=model_args.use_dora,
        )
        if is_tensor_parallel(model):
            prepare_tensor_parallel_lora(model, peft_config.modules_to_save or ())
    trainer = PolyGLUSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if model_args.use_peft:
        if is_tensor_parallel(model):
            finish_tensor_parallel_lora(trainer.model)
        draw_lora_weights_by_name(trainer.model, training_args.seed)
    if quiet:
        remove_console_printers(trainer)
    probe_ids = tokenize_probe(probe_examples, tokenizer, max_length=training_args.max_length or 512)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer.routing_monitor = add_routing_callbacks(trainer, routing_args, probe_ids, pad_token_id)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json (log history, routing keys included) even when no checkpoint was saved
    stop = getattr(trainer.routing_monitor, "stopped_by", None)
    finite = stop is None or safeguards.parameters_are_finite(trainer.model)
    if finite:
        trainer.save_model(training_args.output_dir)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(training_args.output_dir)
            if not model_args.use_peft:  # an adapter directory keeps PEFT's own files
                _finish_full_model_directory(training_args.output_dir, model_args.model_name_or_path, trainer, source_weights)
    if stop is not None:
        raise safeguards.TrainingStoppedOnAlert(safeguards.stop_on_alert_message(stop, training_args.output_dir, finite))
    return trainer


def _finish_full_model_directory(output_dir, source: str, trainer, source_weights: tuple) -> None:
    """Weights back in the source's dtype (routers fp32) and shard size, and a model card."""
    from .routing_stats import unwrap_polyglu_model
    from .saving import resave_like_source, write_training_card

    dtype_name, max_shard_bytes = source_weights
    config = unwrap_polyglu_model(trainer.model).config
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    resave_like_source(output_dir, dtype_name, max_shard_bytes, tied)
    steps = trainer.state.global_step
    write_training_card(
        output_dir, config, source, f"{Path(source).name} fine-tuned with polyglu sft",
        f"{steps} steps of supervised fine-tuning (TRL's SFTTrainer through `polyglu sft`); weights saved in "
        f"{dtype_name or 'the training dtype'}, routers in float32.",
    )


def main(argv=None) -> int:
    parser = build_parser()
    script_args, training_args, model_args, routing_args = parser.parse_args_and_config(args=argv)
    try:
        trainer = run_sft(script_args, training_args, model_args, routing_args)
    except safeguards.TrainingStoppedOnAlert as stop:
        print(f"polyglu sft: error: {stop}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"polyglu sft: interrupted; {safeguards.saved_checkpoint_note(training_args.output_dir)}", file=sys.stderr)
        return 130
    monitor = trainer.routing_monitor
    if trainer.is_world_process_zero():
        print(f"Saved the fine-tuned model to {training_args.output_dir}")
        if monitor is not None and getattr(monitor, "written", None):
            print("Routing report: " + ", ".join(monitor.written.values()))
    from .engines import close_process_group

    close_process_group()  # a gloo group left to interpreter exit can abort the process (see engines.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
