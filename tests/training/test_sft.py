"""Training with TRL: router hygiene (no weight decay, fp32, τ schedule) and the routing monitor end to end.

Every run is a real `polyglu sft` (TRL SFTTrainer) on a tiny converted model and a local JSONL chat dataset.
"""

import json
import re
import sys

import pytest
import torch

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.cli import main
from modeling_polyglu.training.callbacks import RoutingArguments, tau_at
from modeling_polyglu.training.routing_stats import routing_alerts
from modeling_polyglu.training.safeguards import TrainingStoppedOnAlert, reject_tensor_parallel_on_old_transformers
from modeling_polyglu.training.sft import build_parser, run_sft, with_distributed_config
from modeling_polyglu.training.trainer import PolyGLUSFTTrainer

from ..utils import write_addition_dialogues, write_converted_chat_models


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A converted tiny PolyGLU model (routers unbiased, so routing can move) and a chat dataset."""
    root = tmp_path_factory.mktemp("sft")
    write_converted_chat_models(root, ("polyglu", "moa"))
    write_addition_dialogues(root / "data.jsonl", 96)
    return root


def sft(workspace, output_dir, *extra, model="polyglu"):
    parser = build_parser()
    arguments = [
        "--model_name_or_path", str(workspace / model), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(output_dir), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--learning_rate", "5e-3", "--routing_monitor_steps", "2", "--routing_probe_size", "8", "--logging_steps", "1",
        "--disable_tqdm", "true", *extra,
    ]
    return run_sft(*parser.parse_args_and_config(args=arguments), quiet=True)


def test_router_parameters_are_never_weight_decayed(workspace, tmp_path):
    trainer = sft(workspace, tmp_path / "out", "--max_steps", "1", "--weight_decay", "0.1", "--routing_monitor_steps", "0")
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = [names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]]
    exempt = [names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]]
    assert decayed and all(".router." not in name for name in decayed)
    assert any(name.endswith("router.alpha") for name in exempt) and any("router.proj_in.weight" in name for name in exempt)
    assert any(name.endswith("mlp.up_proj.weight") for name in decayed)


def test_router_parameters_are_not_decayed_under_peft_either(workspace, tmp_path):
    trainer = sft(workspace, tmp_path / "out", "--max_steps", "1", "--use_peft", "--lora_r", "4", "--routing_monitor_steps", "0")
    assert isinstance(trainer, PolyGLUSFTTrainer)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = [names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]]
    trained_routers = [n for n, p in trainer.model.named_parameters() if ".router." in n and p.requires_grad]
    assert trained_routers and not [name for name in decayed if ".router." in name]


def test_rslora_and_dora_flags_reach_the_adapter(workspace, tmp_path):
    output = tmp_path / "out"
    trainer = sft(workspace, output, "--max_steps", "1", "--use_peft", "--lora_r", "4", "--use_rslora", "true",
                  "--use_dora", "true", "--routing_monitor_steps", "0")
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["use_dora"] is True
    assert any("lora_magnitude_vector" in name for name, _ in trainer.model.named_parameters())


def test_lora_target_parameters_are_refused_in_one_line(workspace, tmp_path, capsys):
    arguments = ["--model_name_or_path", str(workspace / "polyglu"), "--dataset_name", str(workspace / "data.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_peft",
                 "--lora_target_parameters", "alpha"]
    assert main(["sft", *arguments]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert "--lora_target_parameters puts LoRA on bare parameters" in printed[-1] and "Traceback" not in "\n".join(printed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("use_peft, refused, taken", [
    (False, ["5.17.0", "5.18.2"], ["5.19.0", "5.25.0", "5.26.0.dev0"]),
    (True, ["5.17.0", "5.19.1"], ["5.20.0", "5.25.0"]),
])
def test_tensor_parallel_on_a_transformers_that_cannot_save_it_is_refused(use_peft, refused, taken):
    tensor_parallel = {"tp_plan": "auto"}
    for version in refused:
        with pytest.raises(ValueError, match=rf"needs transformers >= 5\.(19|20), found {re.escape(version)}: .*"
                                             r"pip install -U 'transformers>=5\.(19|20)'"):
            reject_tensor_parallel_on_old_transformers(tensor_parallel, 2, use_peft, version)
        with pytest.raises(ValueError):
            reject_tensor_parallel_on_old_transformers({"tp_size": 2}, 2, use_peft, version)
        reject_tensor_parallel_on_old_transformers(tensor_parallel, 1, use_peft, version)  # nothing is sharded
        reject_tensor_parallel_on_old_transformers({"tp_plan": None, "tp_size": 1}, 2, use_peft, version)  # DDP
    for version in taken:
        reject_tensor_parallel_on_old_transformers(tensor_parallel, 2, use_peft, version)
    for asked in ({"distributed_config": {"tp_plan": "auto"}}, with_distributed_config(tensor_parallel),
                  {"distributed_config": {"tp_size": 2}}):
        with pytest.raises(ValueError, match="needs transformers >= 5"):
            reject_tensor_parallel_on_old_transformers(asked, 2, use_peft, refused[0])
    reject_tensor_parallel_on_old_transformers({"distributed_config": {"fsdp_size": 2}}, 2, use_peft, refused[0])


def test_tensor_parallel_init_kwargs_become_the_distributed_config_from_pretrained_takes():
    from transformers import DistributedConfig

    for asked in ({"tp_plan": "auto", "low_cpu_mem_usage": True}, {"distributed_config": {"tp_plan": "auto"},
                                                                    "low_cpu_mem_usage": True}):
        passed = with_distributed_config(asked)
        assert sorted(passed) == ["distributed_config", "low_cpu_mem_usage"], asked
        assert isinstance(passed["distributed_config"], DistributedConfig) and passed["distributed_config"].tp_plan == "auto"
    assert with_distributed_config({"tp_plan": None, "tp_size": None, "revision": "main"}) == {"revision": "main"}
    made = DistributedConfig(tp_plan="auto")
    assert with_distributed_config({"distributed_config": made})["distributed_config"] is made
    with pytest.raises(ValueError, match=r"has both tp_plan and distributed_config; put everything in one"):
        with_distributed_config({"tp_plan": "auto", "distributed_config": {"tp_size": 2}})
    with pytest.raises(ValueError, match=r"distributed_config \{'tp_plam': 'auto'\}: .*unexpected keyword.*'tp_plam'"):
        with_distributed_config({"distributed_config": {"tp_plam": "auto"}})


def test_monitor_logs_through_trainer_log_and_writes_the_report(workspace, tmp_path):
    output = tmp_path / "out"
    trainer = sft(workspace, output, "--report_to", "tensorboard")
    history = trainer.state.log_history
    monitored = [entry for entry in history if "routing/entropy" in entry]
    assert [entry["step"] for entry in monitored] == [0, 2, 4]
    assert all(0.0 <= entry["routing/entropy"] <= 1.0 for entry in monitored)
    assert "routing/flip_rate" not in monitored[0] and "routing/kl_from_initial" in monitored[-1]
    for key in ("routing/layer_0/usage_argmax/silu", "routing/layer_1/usage_mean/gelu", "routing/static_alpha_entropy", "routing/nonfinite"):
        assert key in monitored[-1]
    report = json.loads((output / "routing_report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == [0, 2, 4]
    assert 0.0 < report["monitor_overhead"] < 1.0
    for name in ("routing_usage_heatmap.png", "routing_entropy.png", "routing_flip_rate.png", "routing_kl.png",
                 "routing_initial_snapshot.safetensors", "routing_initial_metrics.json"):
        assert (output / name).is_file(), name
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and b"routing/entropy" in b"".join(path.read_bytes() for path in events)


def test_routing_moves_and_the_monitor_sees_it(workspace, tmp_path):
    trainer = sft(workspace, tmp_path / "out", "--max_steps", "6", "--learning_rate", "3e-2", model="moa")
    final = [entry for entry in trainer.state.log_history if "routing/kl_from_initial" in entry][-1]
    assert final["routing/kl_from_initial"] > 0.0
    model = PolyGLUForCausalLM.from_pretrained(tmp_path / "out")
    assert model.model.layers[0].mlp.router.weight.dtype == torch.float32


def test_resumed_run_compares_against_the_original_start(workspace, tmp_path):
    output = tmp_path / "out"
    sft(workspace, output, "--save_strategy", "steps", "--save_steps", "4")
    initial = json.loads((output / "routing_initial_metrics.json").read_text())
    snapshot_bytes = (output / "routing_initial_snapshot.safetensors").read_bytes()
    resumed = sft(workspace, output, "--max_steps", "6", "--save_strategy", "no",
                  "--resume_from_checkpoint", str(output / "checkpoint-4"))
    assert json.loads((output / "routing_initial_metrics.json").read_text()) == initial
    assert (output / "routing_initial_snapshot.safetensors").read_bytes() == snapshot_bytes
    first_after_resume = [entry for entry in resumed.state.log_history if "routing/entropy" in entry and entry["step"] >= 4][0]
    assert first_after_resume["routing/kl_from_initial"] > 0.0  # measured against step 0, not the checkpoint


def test_tau_schedule_anneals_and_the_final_tau_is_saved(workspace, tmp_path):
    output = tmp_path / "out"
    seen = []
    trainer = sft(workspace, output, "--routing_tau_schedule", "linear", "--routing_tau_start", "1.0",
                  "--routing_tau_end", "0.1", "--routing_monitor_steps", "0")
    assert json.loads((output / "config.json").read_text())["routing_tau"] == pytest.approx(0.1)
    assert trainer.model.config.routing_tau == pytest.approx(0.1)
    seen = [tau_at(p, 1.0, 0.1, "linear") for p in (0.0, 0.5, 1.0)]
    assert seen == pytest.approx([1.0, 0.55, 0.1])
    assert tau_at(0.5, 1.0, 0.1, "cosine") == pytest.approx(0.55)
    assert tau_at(0.25, 1.0, 0.1, "cosine") > tau_at(0.25, 1.0, 0.1, "linear")


def test_fixed_tau_keeps_the_checkpoint_value(workspace, tmp_path):
    sft(workspace, tmp_path / "out", "--routing_monitor_steps", "0")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["routing_tau"] == 1.0


def test_alerts_fire_and_can_stop_training(workspace, tmp_path):
    with pytest.warns(UserWarning, match="Routing alert"), pytest.raises(TrainingStoppedOnAlert, match=r"at step 2 \(flip_rate"):
        sft(workspace, tmp_path / "out", "--max_steps", "8", "--routing_flip_rate_threshold", "0",
            "--routing_stop_on_alert", "true")
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    report = json.loads((tmp_path / "out" / "routing_report.json").read_text())
    assert report["alerts"] and report["alerts"][0]["kind"] == "flip_rate"
    assert report["final"]["routing/flip_rate"] > 0.01  # a real change set it off, not a rounding
    assert (tmp_path / "out" / "model.safetensors").is_file()  # finite weights: the stopped model is kept


def test_alert_rules():
    initial = {"routing/layer_0/usage_argmax/silu": 0.6, "routing/layer_0/usage_argmax/relu": 0.4}
    collapsed = {"routing/layer_0/usage_argmax/silu": 0.995, "routing/layer_0/usage_argmax/relu": 0.005,
                 "routing/layer_0/flip_rate": 0.7, "routing/layer_0/nonfinite": 3.0}
    kinds = [kind for kind, _ in routing_alerts(collapsed, initial)]
    assert kinds == ["nonfinite"]  # NaN weights count as zeros (argmax: the first activation): no collapse/flips from them
    kinds = [kind for kind, _ in routing_alerts(collapsed | {"routing/layer_0/nonfinite": 0.0}, initial)]
    assert kinds == ["collapse", "flip_rate"]
    assert routing_alerts(collapsed, collapsed | {"routing/layer_0/flip_rate": 0.0, "routing/layer_0/nonfinite": 0.0},
                          flip_rate_threshold=0.9)[0][0] == "nonfinite"  # already collapsed at the start: no collapse alert


def test_packing_padding_free_and_assistant_only_loss(workspace, tmp_path):
    trainer = sft(workspace, tmp_path / "out", "--packing", "true", "--padding_free", "true", "--assistant_only_loss", "true",
                  "--max_length", "64")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(loss == loss and loss < 10 for loss in losses)


def test_routing_arguments_are_validated():
    with pytest.raises(ValueError, match="routing_tau_schedule='sometimes'; choose one of fixed, linear, cosine"):
        RoutingArguments(routing_tau_schedule="sometimes")
    with pytest.raises(ValueError, match="routing_tau_end must be > 0"):
        RoutingArguments(routing_tau_end=0.0)


def test_sft_rejects_a_model_that_is_not_polyglu(workspace, tmp_path, capsys):
    code = main(["sft", "--model_name_or_path", str(workspace / "qwen3"), "--dataset_name", str(workspace / "data.jsonl"),
                 "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert code == 2
    assert "not a PolyGLU-family model" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("routing_monitor_steps", -5, "--routing_monitor_steps must be >= 0, got -5."),
    ("routing_probe_tokens", -3, "--routing_probe_tokens must be >= 0, got -3."),
    ("routing_probe_batch_size", 0, "--routing_probe_batch_size must be >= 1, got 0."),
    ("routing_max_neurons", 0, "--routing_max_neurons must be >= 1, got 0."),
    ("routing_collapse_threshold", 2.0, "--routing_collapse_threshold is a share of routing decisions, in (0, 1]; got 2.0."),
    ("routing_collapse_threshold", 0.0, "--routing_collapse_threshold is a share of routing decisions, in (0, 1]; got 0.0."),
    ("routing_flip_rate_threshold", -1.0, "--routing_flip_rate_threshold is a share of routing decisions, in [0, 1]; got -1.0."),
])
def test_routing_arguments_out_of_range_are_refused(field, value, message):
    """Each ran before: a negative monitor interval turned monitoring off, batch size 0 died in range(), a share
    threshold of 2 never alerted."""
    with pytest.raises(ValueError, match=re.escape(message)):
        RoutingArguments(**{field: value})


def test_inspect_reports_any_checkpoint(workspace, tmp_path, capsys):
    text = tmp_path / "probe.txt"
    text.write_text("what is 1+2?\nwhat is 12+9?\n")
    assert main(["inspect", str(workspace / "polyglu"), "--text", str(text), "--output-dir", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "routing_report.json").read_text())
    assert report["probe_examples"] == 2 and 0.0 <= report["final"]["routing/entropy"] <= 1.0
    assert (tmp_path / "report" / "routing_usage_heatmap.png").is_file()
    printed = capsys.readouterr().out
    assert "top activation" in printed and len([line for line in printed.splitlines() if "%" in line]) == 2  # 2 layers


@pytest.mark.parametrize("arguments, message", [
    (["{untokenized}"], "{untokenized}: no tokenizer in it (tokenizer.json or tokenizer_config.json), which the probe "
                        "text needs; save the model's tokenizer there (tokenizer.save_pretrained(DIR))."),
    (["{model}", "--text", "{tmp}/probe.txt"], "--text {tmp}/probe.txt: no such file; pass a text file with one probe "
                                               "example per line."),
    (["{model}", "--dataset", "{tmp}/probe.jsonl"], "--dataset {tmp}/probe.jsonl: no such file or directory; pass an "
                                                    "existing JSONL file or directory, or a Hub dataset name."),
], ids=["no_tokenizer", "missing_text", "missing_dataset"])
def test_inspect_refuses_what_it_cannot_probe_before_loading_the_model(workspace, tmp_path, capsys, monkeypatch,
                                                                        arguments, message):
    from transformers import AutoModelForCausalLM

    untokenized = tmp_path / "untokenized"
    untokenized.mkdir()
    for path in (workspace / "polyglu").iterdir():
        if path.is_file() and not path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (untokenized / path.name).write_bytes(path.read_bytes())

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the probe input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    values = {"model": str(workspace / "polyglu"), "untokenized": str(untokenized), "tmp": str(tmp_path)}
    assert main(["inspect", *(argument.format(**values) for argument in arguments),
                 "--output-dir", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err.strip() == f"polyglu inspect: error: {message.format(**values)}"
    assert not (tmp_path / "report").exists()


def test_inspect_writes_the_json_report_without_matplotlib(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what importing it raises where it is not installed
    assert main(["inspect", str(workspace / "polyglu"), "--output-dir", str(tmp_path / "report")]) == 0
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == ["routing_report.json"]
    report = json.loads((tmp_path / "report" / "routing_report.json").read_text())
    assert 0.0 <= report["final"]["routing/entropy"] <= 1.0
    assert "heatmap: not drawn, matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().out
