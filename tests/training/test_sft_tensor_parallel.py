"""`polyglu sft` with tensor parallelism (2 gloo ranks on CPU under torchrun) equals one process.

Both runs: recipes/polyglu_full.yaml on the tiny workspace model (distributed_runs.py), 5 steps of 4 examples x 2
accumulated micro-batches (accumulation is where replicated weights' summed gradients can go wrong), τ annealed
1.0 -> 0.1, routing measured at steps 0, 2, 4, 5 on the whole 8-example probe, fp32, PolyGLU's Gumbel noise on (the
ranks are seeded alike and each adds its d_ff slice of the unsharded draw). The TP run loads the model with
`--model_init_kwargs '{"tp_plan": "auto"}'` (LoRA on moa: '{"distributed_config": {"tp_plan": "auto"}}', which
`polyglu sft` makes the DistributedConfig from_pretrained takes; neither warns of the deprecated standalone tp_plan)
through tests/training/tensor_parallel_on_cpu.py (accelerate refuses TP
on CPU ranks otherwise; see there). Both ranks of the group train on the same batch, so the one-process run uses
the same per-device batch.

Against one process (fp32; relative 1e-5):
- the model is sharded: tp_size 2, DTensor parameters [test_tensor_parallel_sft_trains_like_one_process]
- the loss and grad norm of every step [test_tensor_parallel_sft_trains_like_one_process]
- every `routing/*` metric of every measurement (the group measures the probe once; each rank its d_ff slice)
  [test_tensor_parallel_sft_routing_metrics_equal]
- the saved model: the same tensors (gathered from the shards), routers fp32 [test_tensor_parallel_sft_saves_the_model]

LoRA (recipes/polyglu_lora.yaml in fp32, its LoRA dropout 0.05 on, the same 5 steps x 2 micro-batches; polyglu, whose α
is sharded, and moa, whose router is replicated) against LoRA on one process, relative 1e-5: losses and grad norms of every step, every routing metric, and every adapter tensor — the
LoRA matrices gathered from the shards and the routers trained in full, which moved [test_tensor_parallel_lora_*].
DoRA with a tensor-parallel model is refused on every rank in one line
[test_dora_with_tensor_parallelism_is_refused_in_one_line].

Under a transformers whose Trainer cannot save a sharded model (< 5.19; LoRA < 5.20: safeguards.py) those tests skip,
and the run is refused on every rank in one line before loading, nothing written
[test_tensor_parallel_on_old_transformers_is_refused_before_loading].
"""

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from modeling_polyglu.training.safeguards import TENSOR_PARALLEL_SAVING_TRANSFORMERS

from .distributed_runs import (
    MONITORED_STEPS, RECIPE, REPO, RUN_OVERRIDES, assert_refused_on_both_ranks, free_port, log_history, run_checked,
    saved_weights, sft_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# save_only_model: transformers cannot checkpoint the optimizer state of a model sharded at load time
OVERRIDES = (*RUN_OVERRIDES, "--gradient_accumulation_steps", "2", "--save_only_model", "true", "--report_to", "none")
SHIM = REPO / "tests" / "training" / "tensor_parallel_on_cpu.py"
LORA_RECIPE = "polyglu_lora.yaml"
LORA_FFN_TYPES = ("polyglu", "moa")


def skip_unless_transformers_saves(kind: str) -> None:
    """kind "full" or "peft": skip where this transformers' Trainer cannot save such a tensor-parallel run."""
    needed = TENSOR_PARALLEL_SAVING_TRANSFORMERS[kind]
    if Version(transformers.__version__) < Version(needed):
        pytest.skip(f"transformers {transformers.__version__} cannot save this tensor-parallel run (>= {needed}); "
                    "test_tensor_parallel_on_old_transformers_is_refused_before_loading checks the refusal")


# both ways of asking: TRL's idiom (a standalone tp_plan) and transformers' DistributedConfig as a JSON object
TP_PLAN = '{"tp_plan": "auto"}'
DISTRIBUTED_CONFIG = '{"distributed_config": {"tp_plan": "auto"}}'
DEPRECATED_TP_PLAN = "Passing `tp_plan` directly to `from_pretrained` is deprecated"


def tensor_parallel_command(workspace, recipe: str, output_dir, *overrides: str, init_kwargs: str = TP_PLAN) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(SHIM), *sft_arguments(workspace, recipe, output_dir, *overrides, "--model_init_kwargs", init_kwargs),
    ]


@pytest.fixture(scope="module")
def runs(workspace):
    skip_unless_transformers_saves("full")
    one, tensor_parallel = workspace.root / "tp_reference_one_process", workspace.root / "tp_sft"
    run_checked([sys.executable, "-m", "modeling_polyglu.cli", "sft", *sft_arguments(workspace, RECIPE, one, *OVERRIDES)], one)
    result = run_checked(tensor_parallel_command(workspace, RECIPE, tensor_parallel, *OVERRIDES), tensor_parallel)
    return one, tensor_parallel, result.stdout + result.stderr


@pytest.fixture(scope="module", params=LORA_FFN_TYPES)
def lora_model(request, workspace):
    """(ffn_type, the workspace with that model): polyglu's α is sharded on d_ff, moa's router is replicated."""
    skip_unless_transformers_saves("peft")
    if request.param == "polyglu":
        return request.param, workspace
    from modeling_polyglu.conversion.qwen3 import convert_qwen3

    model = workspace.root / f"tp_lora_{request.param}_model"
    if not model.exists():
        convert_qwen3(str(workspace.root / "qwen3"), str(model), request.param, verify=False, log=lambda *args: None)
    return request.param, SimpleNamespace(**{**vars(workspace), "model": model})


@pytest.fixture(scope="module")
def lora_runs(lora_model):
    ffn_type, workspace = lora_model
    one, tensor_parallel = (workspace.root / f"tp_lora_{ffn_type}_{name}" for name in ("one_process", "run"))
    overrides = (*OVERRIDES, "--dtype", "float32")
    run_checked([sys.executable, "-m", "modeling_polyglu.cli", "sft", *sft_arguments(workspace, LORA_RECIPE, one, *overrides)], one)
    init_kwargs = DISTRIBUTED_CONFIG if ffn_type == "moa" else TP_PLAN
    result = run_checked(
        tensor_parallel_command(workspace, LORA_RECIPE, tensor_parallel, *overrides, init_kwargs=init_kwargs), tensor_parallel
    )
    printed = result.stdout + result.stderr
    sharding = re.findall(r"Tensor parallel on CPU: tp_size (\d+), (\d+)/(\d+) parameters are DTensors", printed)
    assert [size for size, _, _ in sharding] == ["2", "2"], f"{init_kwargs} did not shard the model: {sharding}"
    assert DEPRECATED_TP_PLAN not in printed  # polyglu sft hands from_pretrained a DistributedConfig
    return one, tensor_parallel


def _step_values(output_dir, key: str) -> list[float]:
    return [entry[key] for entry in log_history(output_dir) if key in entry and "train_runtime" not in entry]


def _assert_steps_equal(one, tensor_parallel):
    for key in ("loss", "grad_norm"):
        reference = _step_values(one, key)
        assert len(reference) == 5, key
        assert _step_values(tensor_parallel, key) == pytest.approx(reference, rel=1e-5), key


def _assert_routing_metrics_equal(one, tensor_parallel, moved: float):
    history = json.loads((tensor_parallel / "routing_report.json").read_text())["history"]
    reference = json.loads((one / "routing_report.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [entry["step"] for entry in reference] == MONITORED_STEPS
    assert reference[-1]["metrics"]["routing/kl_from_initial"] > moved, "routing did not move"
    for measured, expected in zip(history, reference):
        keys = sorted(key for key in expected["metrics"] if key.startswith("routing/"))
        assert keys == sorted(measured["metrics"]), expected["step"]
        for key in keys:
            assert measured["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-9), (
                f"step {expected['step']}: {key}"
            )


def test_tensor_parallel_sft_trains_like_one_process(runs):
    one, tensor_parallel, printed = runs
    sharding = re.findall(r"Tensor parallel on CPU: tp_size (\d+), (\d+)/(\d+) parameters are DTensors", printed)
    assert len(sharding) == 2 and all(size == "2" and int(sharded) > 0 for size, sharded, _ in sharding), sharding
    assert DEPRECATED_TP_PLAN not in printed  # polyglu sft hands from_pretrained a DistributedConfig
    _assert_steps_equal(one, tensor_parallel)


def test_tensor_parallel_sft_routing_metrics_equal(runs):
    one, tensor_parallel, _ = runs
    _assert_routing_metrics_equal(one, tensor_parallel, moved=1e-6)


def test_tensor_parallel_sft_saves_the_model(runs):
    one, tensor_parallel, _ = runs
    weights, reference = saved_weights(tensor_parallel), saved_weights(one)
    assert sorted(weights) == sorted(reference)
    for key, tensor in reference.items():
        assert weights[key].dtype == tensor.dtype and weights[key].shape == tensor.shape, key
        torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert all(tensor.dtype == torch.float32 for key, tensor in weights.items() if ".router." in key)


def test_tensor_parallel_lora_trains_like_one_process(lora_runs):
    _assert_steps_equal(*lora_runs)


def test_tensor_parallel_lora_routing_metrics_equal(lora_runs):
    # a 5-step LoRA run at lr 2e-4 moves the routing little (KL ~1e-8), so the routers' tensors are checked below
    _assert_routing_metrics_equal(*lora_runs, moved=1e-9)


def test_tensor_parallel_lora_saves_the_adapter_of_one_process(lora_runs, lora_model):
    one, tensor_parallel = lora_runs
    _, workspace = lora_model
    adapter, reference = (load_file(str(path / "adapter_model.safetensors")) for path in (tensor_parallel, one))
    assert sorted(adapter) == sorted(reference)
    assert any(".lora_A." in key for key in reference) and any(".router." in key for key in reference)
    base = saved_weights(workspace.model)
    for key, tensor in reference.items():
        assert adapter[key].dtype == tensor.dtype and adapter[key].shape == tensor.shape, key
        torch.testing.assert_close(adapter[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
        if ".router." in key:  # trained in full, through PEFT's copies of the routers
            initial = base[key.removeprefix("base_model.model.")]
            assert (tensor - initial).abs().max() > 1e-4, f"{key} did not train"
    configs = [json.loads((path / "adapter_config.json").read_text()) for path in (tensor_parallel, one)]
    for config in configs:  # a set, saved in no particular order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


def test_dora_with_tensor_parallelism_is_refused_in_one_line(workspace):
    # PEFT takes DoRA's weight norms of the sharded weight plus a local LoRA product, which DTensor cannot add
    skip_unless_transformers_saves("peft")
    output_dir = workspace.root / "tp_dora"
    command = tensor_parallel_command(workspace, LORA_RECIPE, output_dir, "--dtype", "float32", "--max_steps", "1",
                                      "--use_dora", "true")
    assert_refused_on_both_ranks(command, output_dir, "polyglu sft: error: --use_dora does not work with a tensor-parallel model")
    assert not (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["full", "peft"])
def test_tensor_parallel_on_old_transformers_is_refused_before_loading(workspace, kind):
    needed = TENSOR_PARALLEL_SAVING_TRANSFORMERS[kind]
    if Version(transformers.__version__) >= Version(needed):
        pytest.skip(f"transformers {transformers.__version__} saves this tensor-parallel run (the tests above)")
    output_dir = workspace.root / f"tp_refused_{kind}"
    recipe, extra = (LORA_RECIPE, ("--dtype", "float32")) if kind == "peft" else (RECIPE, ())
    command = tensor_parallel_command(workspace, recipe, output_dir, *extra, "--max_steps", "1")
    what = "LoRA on a tensor-parallel model" if kind == "peft" else "tensor-parallel training"
    message = f"polyglu sft: error: {what} (tp_plan in --model_init_kwargs) needs transformers >= {needed}, found "
    assert_refused_on_both_ranks(command, output_dir, message + transformers.__version__)
    assert not output_dir.exists() or not any(output_dir.iterdir())
