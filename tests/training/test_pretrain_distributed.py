"""`polyglu pretrain` on two DDP ranks (CPU, gloo) equals one process training on the same global batch.

Both runs: the tiny-debug polyglu preset, a local 120-document corpus, packed rows of 32 tokens, 4 steps of 4 rows
(one process x 4, or 2 ranks x 2: the packed row stream is dispatched in order, so both see the same rows), eval and
routing measurements every 2 steps, fp32, with PolyGLU's Gumbel routing noise on (the default): the Trainer seeds
both ranks alike, and each rank, told its data-parallel replica, takes its own rows of the draw one process makes
for all 4 rows. (Without that, each rank would draw the first 2 rows' noise: ~1e-4 relative off in the loss.)

Against one process (relative 1e-5):
- the training loss and grad norm of every step and every held-out eval loss [test_ddp_pretrain_trains_like_one_process]
- the saved weights and run_summary.json (final loss, tokens per step, world size in the settings)
  [test_ddp_pretrain_saves_what_one_process_saves]
- every `routing/*` metric of every measurement [test_ddp_pretrain_routing_metrics_equal]
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from .distributed_runs import DDP_LAUNCHER, free_port, run_checked
from .test_pretrain import write_corpus

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS = 4
GLOBAL_ROWS = 4


def pretrain_arguments(corpus, output_dir, rows_per_process: int) -> list[str]:
    return [
        "--config", "tiny-debug", "--ffn_type", "polyglu",
        "--dataset", str(corpus), "--output_dir", str(output_dir), "--use_cpu", "true",
        "--max_steps", str(STEPS), "--per_device_train_batch_size", str(rows_per_process), "--max_length", "32",
        "--eval_steps", "2", "--save_steps", str(STEPS), "--eval_rows", "8", "--learning_rate", "3e-3",
        # the whole 8-document probe set in both runs (the default budget is per process and would cut it)
        "--routing_monitor_steps", "2", "--routing_probe_size", "8", "--routing_probe_tokens", "1024",
        "--logging_steps", "1",
        "--disable_tqdm", "true", "--report_to", "none",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_distributed")
    corpus = write_corpus(root / "corpus.jsonl")
    one, ddp = root / "one_process", root / "ddp"
    module = ("-m", "modeling_polyglu.cli", "pretrain")
    run_checked([sys.executable, *module, *pretrain_arguments(corpus, one, GLOBAL_ROWS)], one)
    run_checked([
        sys.executable, "-m", "accelerate.commands.launch", *DDP_LAUNCHER, "--num_processes", "2",
        "--main_process_port", str(free_port()), *module, *pretrain_arguments(corpus, ddp, GLOBAL_ROWS // 2),
    ], ddp)
    return one, ddp


def _log_history(output_dir) -> list[dict]:
    return json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]


def _series(output_dir, key: str) -> list[tuple]:
    return [(entry["step"], entry[key]) for entry in _log_history(output_dir) if key in entry]


def test_ddp_pretrain_trains_like_one_process(runs):
    one, ddp = runs
    for key, count in (("loss", STEPS), ("grad_norm", STEPS), ("eval_loss", STEPS // 2 + 1)):
        reference = _series(one, key)
        assert len(reference) == count, key
        measured = _series(ddp, key)
        assert [step for step, _ in measured] == [step for step, _ in reference], key
        assert [value for _, value in measured] == pytest.approx([value for _, value in reference], rel=1e-5), key
    losses = [value for _, value in _series(one, "eval_loss")]
    assert losses[-1] < losses[0] - 0.1, "the runs did not learn: equal losses would prove little"


def test_ddp_pretrain_saves_what_one_process_saves(runs):
    one, ddp = runs
    weights, reference = load_file(str(ddp / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert sorted(weights) == sorted(reference)
    for key, tensor in reference.items():
        assert weights[key].dtype == tensor.dtype, key
        torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((ddp / "run_summary.json").read_text())
    expected = json.loads((one / "run_summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(expected["final_eval_loss"], rel=1e-5)
    assert summary["tokens_per_step"] == expected["tokens_per_step"] == GLOBAL_ROWS * 32
    assert (summary["training_settings"]["world_size"], expected["training_settings"]["world_size"]) == (2, 1)
    assert (ddp / "README.md").is_file() and sorted(ddp.glob("routing_initial_snapshot*")) != []


def test_ddp_pretrain_routing_metrics_equal(runs):
    one, ddp = runs
    history = json.loads((ddp / "routing_report.json").read_text())["history"]
    reference = json.loads((one / "routing_report.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [entry["step"] for entry in reference] == [0, 2, 4]
    assert reference[-1]["metrics"]["routing/kl_from_initial"] > 0
    for measured, expected in zip(history, reference):
        keys = sorted(key for key in expected["metrics"] if key.startswith("routing/"))
        assert keys == sorted(measured["metrics"])
        for key in keys:
            assert measured["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-9), (
                f"step {expected['step']}: {key}"
            )
