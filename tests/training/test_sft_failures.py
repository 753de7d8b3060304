"""`polyglu sft` fed bad data and faults: one line and a non-zero exit, nothing lost, nothing faked.

Faults are injected into a real run (TRL SFTTrainer on the tiny converted model of test_sft.py) by a callback that
poisons a router with NaN, or raises KeyboardInterrupt as Python's SIGINT handler does.
"""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from modeling_polyglu.cli import main
from modeling_polyglu.training import trainer as trainer_module
from tests.training.test_sft import sft, workspace  # noqa: F401  (the module fixture)


def run_cli(workspace, output_dir, *extra, dataset=None):
    return main([
        "sft", "--model_name_or_path", str(workspace / "polyglu"),
        "--dataset_name", str(dataset or workspace / "data.jsonl"), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--routing_probe_size", "8",
        "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *extra,
    ])


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip().splitlines()
    assert error and "Traceback" not in "\n".join(error)
    return error[-1]


@pytest.mark.parametrize("breakage, message", [
    ("missing", "no such file or directory"),
    ("empty", "empty; a JSONL dataset needs one JSON object per line"),
    ("malformed", "bad.jsonl:3: not valid JSON"),
    ("columns", "has columns ['answer', 'question'], none of the SFT formats"),
])
def test_bad_datasets_fail_in_one_line_before_loading_the_model(workspace, tmp_path, capsys, breakage, message):
    dataset = tmp_path / "bad.jsonl"
    lines = (workspace / "data.jsonl").read_text().splitlines()
    if breakage == "empty":
        dataset.write_text("")
    elif breakage == "malformed":
        dataset.write_text("\n".join(lines[:2] + ['{"messages": [oops'] + lines[3:]) + "\n")
    elif breakage == "columns":
        dataset.write_text("".join(json.dumps({"question": "1+1", "answer": "2"}) + "\n" for _ in range(20)))
    elif breakage == "missing":
        dataset = tmp_path / "data" / "nope.jsonl"
    assert run_cli(workspace, tmp_path / "out", "--max_steps", "1", dataset=dataset) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, message", [
    ([], "it needs --model_name_or_path, the PolyGLU-family checkpoint to fine-tune (a directory from `polyglu convert "
         "qwen3`, or a Hub name); and --dataset_name, the data (a JSONL file or directory, or a Hub dataset name). Pass "
         "them, or --config recipes/<recipe>.yaml, which sets both."),
    (["--model_name_or_path", "{model}"], "it needs --dataset_name, the data (a JSONL file or directory, or a Hub "
                                          "dataset name). Pass it, or --config recipes/<recipe>.yaml, which sets both."),
    (["--model_name_or_path", "{tmp}/no-such-model", "--dataset_name", "{data}"],
     "--model_name_or_path {tmp}/no-such-model: no such directory; pass the directory of a saved checkpoint "
     "(config.json and weights), or a Hub model name."),
    (["--model_name_or_path", "{tmp}", "--dataset_name", "{data}"],
     "--model_name_or_path {tmp}: no config.json in it; pass the directory of a saved checkpoint (config.json and "
     "weights), or a Hub model name."),
], ids=["nothing", "no_dataset", "missing_model_directory", "directory_without_config"])
def test_a_missing_model_or_dataset_is_one_line(workspace, tmp_path, capsys, arguments, message):
    """TRL's parser requires neither; the run died on a None path, or transformers took a path for a Hub id."""
    values = {"model": str(workspace / "polyglu"), "data": str(workspace / "data.jsonl"), "tmp": str(tmp_path)}
    arguments = [argument.format(**values) for argument in arguments]
    assert main(["sft", *arguments, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]) == 2
    assert one_error_line(capsys) == f"polyglu sft: error: {message.format(**values)}"
    assert not (tmp_path / "out").exists()


def test_max_steps_zero_is_refused(workspace, tmp_path, capsys):
    assert run_cli(workspace, tmp_path / "out", "--max_steps", "0") == 2
    assert "--max_steps 0 trains nothing" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


class InjectAtStep(TrainerCallback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.action(model)


def poison_router(model):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("layers.0.mlp.router.alpha")).fill_(float("nan"))


def interrupt(model):
    raise KeyboardInterrupt


@pytest.fixture
def inject(monkeypatch):
    """install(step, action): run_sft's trainer calls action(model) at the end of that optimizer step."""
    def install(step, action):
        class FaultyTrainer(trainer_module.PolyGLUSFTTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(InjectAtStep(step, action))

        monkeypatch.setattr(trainer_module, "PolyGLUSFTTrainer", FaultyTrainer)
    return install


def test_stop_on_a_nan_alert_fails_keeps_the_last_finite_checkpoint_and_writes_no_model(workspace, tmp_path, capsys, inject):
    inject(3, poison_router)
    output = tmp_path / "out"
    # a tiny learning rate: the only routing change is the NaN (which, read as zeros, looked like 100% flips to relu)
    code = run_cli(workspace, output, "--max_steps", "8", "--routing_monitor_steps", "2", "--routing_stop_on_alert", "true",
                   "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-7")
    message = one_error_line(capsys)
    assert code == 1
    assert "routing alert at step 4 (nonfinite" in message and f"{output / 'checkpoint-2'}" in message
    assert "no final model was written" in message
    assert not (output / "model.safetensors").exists()
    report = json.loads((output / "routing_report.json").read_text())
    assert {alert["kind"] for alert in report["alerts"]} == {"nonfinite"}  # no collapse/flip alerts derived from NaN
    log = json.loads((output / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"]: entry["loss"] for entry in log if "loss" in entry}
    assert all(math.isfinite(losses[step]) for step in (1, 2, 3)) and math.isnan(losses[4])  # NaN logged as NaN, not 0


def test_ctrl_c_says_what_was_saved_and_exits_130(workspace, tmp_path, capsys, inject):
    inject(3, interrupt)
    output = tmp_path / "out"
    code = run_cli(workspace, output, "--max_steps", "8", "--routing_monitor_steps", "0", "--save_strategy", "steps",
                   "--save_steps", "2")
    assert code == 130
    message = one_error_line(capsys)
    assert "interrupted" in message and f"--resume_from_checkpoint {output / 'checkpoint-2'}" in message


def test_resumed_report_holds_the_whole_history_and_trainer_state_is_saved(workspace, tmp_path):
    output = tmp_path / "out"
    sft(workspace, output, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "2")
    sft(workspace, output, "--max_steps", "4", "--resume_from_checkpoint", str(output / "checkpoint-2"))
    report = json.loads((output / "routing_report.json").read_text())
    assert [entry["step"] for entry in report["history"]] == [0, 2, 4]
    assert "routing/entropy" in report["history"][0]["metrics"]
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and any("routing/entropy" in entry for entry in state["log_history"])


def test_trainer_state_is_saved_without_any_checkpoint(workspace, tmp_path):
    output = tmp_path / "out"
    sft(workspace, output, "--max_steps", "2")
    assert not list(output.glob("checkpoint-*"))
    state = json.loads((output / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "routing/entropy" in entry] == [0, 2]
