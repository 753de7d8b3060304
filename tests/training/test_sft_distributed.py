"""`polyglu sft` on two processes, and the recipe files in recipes/.

Two gloo ranks on the CPU: `accelerate launch --multi_gpu --num_processes 2 ... -m modeling_polyglu.cli sft
--use_cpu true --config recipes/<recipe>.yaml <overrides>` in a subprocess, on a tiny Qwen3 model converted to PolyGLU
and a local JSONL chat dataset (64 conversations). (`accelerate launch --cpu --num_processes 2` starts one process;
`--use_cpu true` is a training argument, not a launcher flag.)

- every recipe parses with `polyglu sft`'s parser and says what it promises (learning rates, LoRA, packing +
  padding-free, the reference τ anneal); the accelerate configs load with accelerate's own loader and the FSDP one
  wraps a layer class the model has [test_recipes_parse_and_say_what_they_promise, test_accelerate_configs_load]
- full fine-tuning with recipes/polyglu_full.yaml on 2 ranks (one run, the session fixture `ddp_run` in conftest.py,
  also the reference of test_engines.py):
  - both ranks ran: each wrote its own initial routing snapshot [test_ddp_both_ranks_wrote_their_snapshot]
  - the rank-0 step-0 routing metrics equal one process measuring the whole probe set: every rank ran its shard and
    the sums were all-reduced [test_ddp_probe_metrics_are_reduced_over_both_shards]
  - routing metrics reach TensorBoard and trainer_state.json's log_history exactly once per monitored step, and
    routing_report.json holds the same steps [test_ddp_routing_logged_once_per_monitored_step]
  - the training loss is still logged at every logging step, monitored steps included
    [test_ddp_training_loss_logged_at_every_logging_step]
  - the saved model loads, runs, and carries the annealed τ [test_ddp_saved_model_loads_with_final_tau]
- LoRA with recipes/polyglu_lora.yaml on 2 ranks: adapter with the trained routers, per-rank snapshots, report
  [test_ddp_lora_saves_adapter_with_routers]

DeepSpeed ZeRO-2/3, FSDP2 and Ray Train are compared with this DDP run in test_engines.py.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from .distributed_runs import MAX_LENGTH, MAX_STEPS, MONITOR_EVERY, MONITORED_STEPS, PROBE_SIZE, RECIPES, SEED
from .distributed_runs import launch_two_ranks, log_history

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ----------------------------------------------------------------------------------------------------------------
# recipe files
# ----------------------------------------------------------------------------------------------------------------


def test_recipes_parse_and_say_what_they_promise():
    from modeling_polyglu.training.sft import build_parser

    recipes = sorted(RECIPES.glob("*.yaml"))
    names = {path.stem for path in recipes}
    assert {f"{ffn}_{kind}" for ffn in ("polyglu", "dualglu", "moa") for kind in ("full", "lora")} <= names
    parsed = {}
    for path in recipes:
        script_args, training_args, model_args, routing_args = build_parser().parse_args_and_config(args=["--config", str(path)])
        parsed[path.stem] = (script_args, training_args, model_args, routing_args)
        ffn_type = path.stem.split("_")[0]
        assert model_args.model_name_or_path == f"outputs/qwen3-0.6b-{ffn_type}", path.name
        assert training_args.assistant_only_loss, path.name
        assert routing_args.routing_monitor_steps > 0 and routing_args.routing_probe_size > 0, path.name
        if path.stem.endswith("_lora"):
            assert model_args.use_peft and model_args.lora_r > 0 and model_args.lora_alpha > 0, path.name
            assert 1e-4 <= training_args.learning_rate <= 5e-4, path.name
        else:
            assert not model_args.use_peft, path.name
            assert 5e-6 <= training_args.learning_rate <= 5e-5, path.name
    assert any(t.packing and t.padding_free for _, t, _, _ in parsed.values()), "no recipe packs padding-free"
    assert any(
        r.routing_tau_schedule == "linear" and r.routing_tau_start == 1.0 and r.routing_tau_end == 0.1
        for _, _, _, r in parsed.values()
    ), "no recipe uses the reference τ anneal"


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from modeling_polyglu import modeling_polyglu as modeling

    names = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
    configs = {name: load_config_from_file(str(RECIPES / "accelerate" / f"{name}.yaml")) for name in names}
    for name, config in configs.items():
        assert config.num_machines == 1 and not config.use_cpu and config.mixed_precision == "bf16", name
    assert configs["ddp"].distributed_type == DistributedType.MULTI_GPU
    fsdp = configs["fsdp"]
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    layer_class = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert layer_class == "PolyGLUDecoderLayer" and hasattr(modeling, layer_class)
    assert layer_class in modeling.PolyGLUPreTrainedModel._no_split_modules
    for name, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        assert configs[name].distributed_type == DistributedType.DEEPSPEED
        assert configs[name].deepspeed_config["zero_stage"] == stage


# ----------------------------------------------------------------------------------------------------------------
# two-rank full fine-tuning
# ----------------------------------------------------------------------------------------------------------------


def test_ddp_both_ranks_wrote_their_snapshot(ddp_run):
    from safetensors.torch import load_file

    for rank in (0, 1):
        path = ddp_run.output_dir / f"routing_initial_snapshot.rank{rank}.safetensors"
        assert path.is_file(), f"rank {rank} wrote no snapshot"
        snapshot = load_file(str(path))
        assert {"layer_0.choices", "layer_1.choices", "layer_0.probabilities"} <= set(snapshot)
        assert snapshot["layer_0.choices"].shape[0] > 0
    assert not (ddp_run.output_dir / "routing_initial_snapshot.safetensors").exists()


def test_ddp_probe_metrics_are_reduced_over_both_shards(workspace, ddp_run):
    """Step-0 metrics of the 2-rank run == one process measuring all 8 probe examples, != rank 0's 4 alone."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_polyglu.training.routing_stats import RoutingProbe, probe_batches, tokenize_probe
    from modeling_polyglu.training.sft import _split_probe

    logged = json.loads((ddp_run.output_dir / "routing_initial_metrics.json").read_text())
    dataset = DatasetDict(train=Dataset.from_list(workspace.rows))
    script_args = SimpleNamespace(dataset_train_split="train", dataset_test_split="test")
    routing_args = SimpleNamespace(routing_probe_size=PROBE_SIZE, routing_monitor_steps=MONITOR_EVERY)
    _, _, probe_examples = _split_probe(dataset, script_args, routing_args, SEED)
    tokenizer = AutoTokenizer.from_pretrained(workspace.model)
    model = AutoModelForCausalLM.from_pretrained(workspace.model).eval()
    token_lists = tokenize_probe(probe_examples, tokenizer, max_length=MAX_LENGTH)
    whole, _ = RoutingProbe().measure(model, probe_batches(token_lists, 8, tokenizer.pad_token_id))
    rank0_only, _ = RoutingProbe().measure(model, probe_batches(token_lists[0::2], 8, tokenizer.pad_token_id))
    keys = [key for key in whole if "/entropy" in key or "/usage_mean/" in key]
    assert keys and set(keys) <= set(logged)
    for key in keys:
        assert logged[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-12), key
    assert any(not math.isclose(rank0_only[key], whole[key], rel_tol=1e-4) for key in keys), "test has no power"


def test_ddp_routing_logged_once_per_monitored_step(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitored = MONITORED_STEPS
    # the last measurement is taken at the last step, so the step-5 checkpoint's trainer_state.json has it too
    history_steps = [entry["step"] for entry in log_history(ddp_run.output_dir) if "routing/entropy" in entry]
    assert history_steps == monitored
    accumulator = EventAccumulator(str(ddp_run.tensorboard_dir))
    accumulator.Reload()
    assert "train/routing/entropy" in accumulator.Tags()["scalars"]
    for tag in ("train/routing/entropy", "train/routing/layer_0/usage_mean/silu"):
        steps = [event.step for event in accumulator.Scalars(tag)]
        assert steps == monitored, tag
    assert [event.step for event in accumulator.Scalars("train/routing/flip_rate")] == monitored[1:]
    report = json.loads((ddp_run.output_dir / "routing_report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == monitored
    assert report["history"][-1]["metrics"]["routing/entropy"] == report["final"]["routing/entropy"]
    assert all(alert["kind"] in ("collapse", "flip_rate", "nonfinite") for alert in report["alerts"])
    for name in ("routing_usage_heatmap.png", "routing_entropy.png", "routing_flip_rate.png", "routing_kl.png"):
        assert (ddp_run.output_dir / name).stat().st_size > 0, name


def test_ddp_training_loss_logged_at_every_logging_step(ddp_run):
    """logging_steps=1: every step's log carries the loss, also the steps where the routing monitor logged."""
    loss_steps = sorted(entry["step"] for entry in log_history(ddp_run.output_dir) if "loss" in entry)
    assert loss_steps == list(range(1, MAX_STEPS + 1))


def test_ddp_saved_model_loads_with_final_tau(workspace, ddp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ddp_run.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(ddp_run.output_dir)
    assert model.config.model_type == "polyglu"
    assert model.config.routing_tau == pytest.approx(0.1)  # the recipe's linear anneal 1.0 -> 0.1, saved at the end
    ids = tokenizer.apply_chat_template(workspace.rows[0]["messages"][:1], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(workspace.model)
    assert model.config.vocab_size == original.config.vocab_size >= len(tokenizer)  # the padded table is kept
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    trained = dict(model.named_parameters())
    assert any(not torch.equal(parameter, trained[name]) for name, parameter in original.named_parameters()), "nothing trained"


# ----------------------------------------------------------------------------------------------------------------
# two-rank LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_ddp_lora_saves_adapter_with_routers(workspace):
    from safetensors import safe_open

    output_dir = workspace.root / "ddp_lora"
    launch_two_ranks(
        workspace, "polyglu_lora.yaml", output_dir,
        "--max_steps", "2", "--save_strategy", "no", "--report_to", "none",
    )
    for rank in (0, 1):
        assert (output_dir / f"routing_initial_snapshot.rank{rank}.safetensors").is_file(), rank
    assert (output_dir / "adapter_config.json").is_file()
    with safe_open(str(output_dir / "adapter_model.safetensors"), "pt") as adapter:
        keys = list(adapter.keys())
    assert any(".mlp.router." in key for key in keys) and any("lora_A" in key for key in keys)
    report = json.loads((output_dir / "routing_report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == [0, 2]
