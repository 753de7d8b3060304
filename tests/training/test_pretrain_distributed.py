"""`polyglu pretrain` on two ranks (CPU, gloo) — DDP, DeepSpeed ZeRO-2/3, FSDP2 — equals one process on the same batch.

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

The same 2-rank run under `accelerate launch` with recipes/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml
(DeepSpeed's partitioned optimizer state is checked on disk) and fsdp.yaml (through the FSDP2 shim, which reports the
sharding), against DDP: losses, grad norms and eval losses, the saved weights, and the routing metrics
[test_engine_pretrain_equals_ddp]. deepspeed is optional like in test_engines.py.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from .distributed_runs import DDP_LAUNCHER, RECIPES, REPO, free_port, run_checked
from .test_engines import ENGINE_PACKAGES, accelerate_config, require
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


PRETRAIN_MODULE = ("-m", "modeling_polyglu.cli", "pretrain")
ENGINE_LAUNCH = {  # engine -> (accelerate's launcher arguments, what it runs)
    "zero2": (accelerate_config("deepspeed_zero2"), (str(RECIPES / "pretrain.py"),)),
    "zero3": (accelerate_config("deepspeed_zero3"), (str(RECIPES / "pretrain.py"),)),
    "fsdp2": (accelerate_config("fsdp"), (str(REPO / "tests" / "training" / "fsdp_on_cpu.py"), "pretrain")),
}


def launch_two_rank_pretrain(corpus, output_dir, launcher, entry):
    return run_checked([
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
        "--main_process_port", str(free_port()), *entry, *pretrain_arguments(corpus, output_dir, GLOBAL_ROWS // 2),
    ], output_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pretrain_corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("pretrain_distributed")
    one, ddp = root / "one_process", root / "ddp"
    run_checked([sys.executable, *PRETRAIN_MODULE, *pretrain_arguments(corpus, one, GLOBAL_ROWS)], one)
    launch_two_rank_pretrain(corpus, ddp, DDP_LAUNCHER, PRETRAIN_MODULE)
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


def assert_same_weights(output_dir, reference_dir):
    weights, reference = load_file(str(output_dir / "model.safetensors")), load_file(str(reference_dir / "model.safetensors"))
    assert sorted(weights) == sorted(reference)
    for key, tensor in reference.items():
        assert weights[key].dtype == tensor.dtype, key
        torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_pretrain_saves_what_one_process_saves(runs):
    one, ddp = runs
    assert_same_weights(ddp, one)
    summary = json.loads((ddp / "run_summary.json").read_text())
    expected = json.loads((one / "run_summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(expected["final_eval_loss"], rel=1e-5)
    assert summary["tokens_per_step"] == expected["tokens_per_step"] == GLOBAL_ROWS * 32
    assert (summary["training_settings"]["world_size"], expected["training_settings"]["world_size"]) == (2, 1)
    assert (ddp / "README.md").is_file() and sorted(ddp.glob("routing_initial_snapshot*")) != []


def assert_same_routing_metrics(output_dir, reference_dir):
    history = json.loads((output_dir / "routing_report.json").read_text())["history"]
    reference = json.loads((reference_dir / "routing_report.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [entry["step"] for entry in reference] == [0, 2, 4]
    assert reference[-1]["metrics"]["routing/kl_from_initial"] > 0
    for measured, expected in zip(history, reference):
        keys = sorted(key for key in expected["metrics"] if key.startswith("routing/"))
        assert keys == sorted(measured["metrics"])
        for key in keys:
            assert measured["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-9), (
                f"step {expected['step']}: {key}"
            )


def test_ddp_pretrain_routing_metrics_equal(runs):
    one, ddp = runs
    assert_same_routing_metrics(ddp, one)


@pytest.mark.parametrize("engine", list(ENGINE_LAUNCH))
def test_engine_pretrain_equals_ddp(engine, runs, corpus, tmp_path):
    require(ENGINE_PACKAGES[engine])
    _, ddp = runs
    output_dir = tmp_path / engine
    result = launch_two_rank_pretrain(corpus, output_dir, *ENGINE_LAUNCH[engine])
    if engine == "fsdp2":
        assert "parameters are DTensors" in result.stdout + result.stderr, "FSDP2 did not shard"
    else:  # DeepSpeed's own checkpoint: the optimizer state partitioned over the two ranks
        partitions = sorted((output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob("*optim_states.pt"))
        assert len(partitions) == 2, partitions
    for key in ("loss", "grad_norm", "eval_loss"):
        measured, reference = _series(output_dir, key), _series(ddp, key)
        assert [step for step, _ in measured] == [step for step, _ in reference], key
        assert [value for _, value in measured] == pytest.approx([value for _, value in reference], rel=1e-5), key
    assert_same_weights(output_dir, ddp)
    assert_same_routing_metrics(output_dir, ddp)


def test_zero3_builds_initial_models_partitioned_with_one_process_weights(tmp_path):
    """Under ZeRO-3 no rank builds the whole model, and the same seed still gives one process's initial weights."""
    from modeling_polyglu.training.compare import paired_initial_model, with_fields
    from modeling_polyglu.training.pretrain import PretrainArguments, build_config, new_model
    from modeling_polyglu.training.pretrain_data import build_ascii_tokenizer

    require(ENGINE_PACKAGES["zero3"])
    output = tmp_path / "initial.safetensors"
    child = REPO / "tests" / "training" / "zero3_initial_models.py"
    run_checked([
        sys.executable, "-m", "accelerate.commands.launch", *accelerate_config("deepspeed_zero3"),
        "--num_processes", "2", "--main_process_port", str(free_port()), str(child), str(output),
    ], tmp_path)
    saved = load_file(str(output))
    assert saved.pop("partitioned").item() == 1, "a ZeRO-3 rank built a whole parameter"
    config = with_fields(build_config(PretrainArguments(), build_ascii_tokenizer()), ffn_type="polyglu")
    expected = {
        "new": new_model(config, 3),
        "paired": paired_initial_model(config, with_fields(config, ffn_type="swiglu"), 3),
    }
    for prefix, model in expected.items():
        parameters = dict(model.named_parameters())
        names = sorted(name for name in saved if name.startswith(f"{prefix}/"))
        assert names == sorted(f"{prefix}/{name}" for name in parameters)
        for name, parameter in parameters.items():
            torch.testing.assert_close(saved[f"{prefix}/{name}"], parameter.detach(), rtol=0, atol=0, msg=name)
    # polyglu's layer-0 router takes draws swiglu's does not, so from layer 1 on only pairing makes the weights agree
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(saved[f"new/{name}"], saved[f"paired/{name}"])
