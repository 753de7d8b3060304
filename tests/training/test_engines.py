"""DeepSpeed ZeRO-2/3, FSDP2 and Ray Train: `polyglu sft` on two CPU ranks, compared with DDP and with one process.

Every engine runs recipes/polyglu_full.yaml on the same tiny model and data with the same overrides as the DDP
session run (conftest.py's `ddp_run`, distributed_runs.RUN_OVERRIDES): 5 steps of 2 ranks x 4 examples, τ annealed
1.0 -> 0.1, routing measured at steps 0, 2, 4, 5 on an 8-example probe (4 per rank), a checkpoint at step 5.

- zero2 / zero3: `accelerate launch --config_file recipes/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2
  --mixed_precision no recipes/sft.py ...` (DeepSpeed on CPU uses gloo);
- fsdp2: `accelerate launch --config_file recipes/accelerate/fsdp.yaml ... tests/training/fsdp_on_cpu.py ...` — the
  shim puts back the FSDP state accelerate 1.15-1.16 keep from CPU ranks; the run asserts that parameters are DTensors;
- ray: `python recipes/ray_train.py --num_workers 2 -- ...`, a Ray Train TorchTrainer with 2 CPU workers.

Per engine, against DDP and one process (fp32; relative 1e-5 unless stated):
- it trains like DDP: the loss and grad norm of every step [test_engine_trains_like_ddp]
- every `routing/*` metric at step 0 equals one process measuring the whole probe set on the initial model, and at
  the end equals one process measuring the DDP-trained model with the last step's τ against its own step-0
  snapshot; static_alpha_entropy included (ZeRO-3 partitions and FSDP2 shards α) [test_engine_routing_metrics_equal]
- the saved checkpoint has our auto_map and remote code (no FSDP class or torch files), routers fp32 in the file,
  and loads through trust_remote_code in a fresh interpreter without the package, with logits equal to the
  DDP-trained model's (1e-5) [test_engine_checkpoint_loads_like_ddp]
- DeepSpeed with bf16 (where the CPU has bf16): the routers in the saved file are fp32 and equal DeepSpeed's fp32
  masters (read back from the step-5 ZeRO checkpoint with zero_to_fp32), not their bf16 copies
  [test_deepspeed_bf16_saves_fp32_router_masters]

deepspeed and ray are optional: these tests skip without them, unless POLYGLU_REQUIRE_ENGINES=1 (CI) makes that a
failure.
"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

from .distributed_runs import (
    MAX_LENGTH, MAX_STEPS, PROBE_SIZE, MONITOR_EVERY, RECIPE, RECIPES, REPO, RUN_OVERRIDES, SEED,
    launch_two_ranks, log_history, run_checked, sft_arguments,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REQUIRE_ENGINES = os.environ.get("POLYGLU_REQUIRE_ENGINES") == "1"
ENGINE_PACKAGES = {"zero2": "deepspeed", "zero3": "deepspeed", "fsdp2": "torch", "ray": "ray"}
METRIC_TOLERANCE = dict(rel=1e-5, abs=1e-9)


def require(package: str):
    if importlib.util.find_spec(package) is None:
        if REQUIRE_ENGINES:
            pytest.fail(f"{package} is not installed, and POLYGLU_REQUIRE_ENGINES=1 requires it.")
        pytest.skip(f"{package} is not installed (pip install deepspeed 'ray[train]'; DS_BUILD_OPS=0 works on CPU)")


def accelerate_config(name: str) -> tuple:
    return ("--config_file", str(RECIPES / "accelerate" / f"{name}.yaml"), "--mixed_precision", "no")


def run_engine(workspace, engine: str, output_dir, *extra: str, recipe: str = RECIPE, overrides=RUN_OVERRIDES):
    """One 2-rank run of `engine` with the DDP run's settings (plus `extra`); `recipe`/`overrides` for other runs."""
    overrides = (*overrides, "--report_to", "none", *extra)
    if engine in ("zero2", "zero3"):
        config = "deepspeed_zero2" if engine == "zero2" else "deepspeed_zero3"
        return launch_two_ranks(
            workspace, recipe, output_dir, *overrides, launcher=accelerate_config(config), entry=(str(RECIPES / "sft.py"),)
        )
    if engine == "fsdp2":
        shim = str(REPO / "tests" / "training" / "fsdp_on_cpu.py")
        return launch_two_ranks(workspace, recipe, output_dir, *overrides, launcher=accelerate_config("fsdp"), entry=(shim,))
    command = [
        sys.executable, str(RECIPES / "ray_train.py"), "--num_workers", "2",
        "--storage_path", str(output_dir.parent / f"{output_dir.name}_ray"), "--",
        *sft_arguments(workspace, recipe, output_dir, *overrides),
    ]
    return run_checked(command, output_dir)


@pytest.fixture(scope="module", params=list(ENGINE_PACKAGES))
def engine_run(request, workspace):
    engine = request.param
    require(ENGINE_PACKAGES[engine])
    output_dir = workspace.root / engine
    result = run_engine(workspace, engine, output_dir)
    if engine == "fsdp2":
        assert "FSDP2 on CPU: 36/36 parameters are DTensors" in result.stdout + result.stderr, "FSDP2 did not shard"
    return engine, output_dir


# ----------------------------------------------------------------------------------------------------------------
# one-process references
# ----------------------------------------------------------------------------------------------------------------


def _probe_token_lists(workspace, tokenizer):
    from datasets import Dataset, DatasetDict

    from modeling_polyglu.training.routing_stats import tokenize_probe
    from modeling_polyglu.training.sft import _split_probe

    dataset = DatasetDict(train=Dataset.from_list(workspace.rows))
    script_args = type("ScriptArguments", (), {"dataset_train_split": "train", "dataset_test_split": "test"})
    routing_args = type("RoutingArguments", (), {"routing_probe_size": PROBE_SIZE, "routing_monitor_steps": MONITOR_EVERY})
    _, _, probe_examples = _split_probe(dataset, script_args, routing_args, SEED)
    return tokenize_probe(probe_examples, tokenizer, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def one_process(workspace, ddp_run):
    """Routing metrics of one process on the whole probe set: the initial model, and the DDP-trained model with the
    τ of the last step (the end-of-training measurement precedes the final τ update) against the initial snapshot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_polyglu.training.callbacks import tau_at
    from modeling_polyglu.training.routing_stats import RoutingProbe, concatenate_snapshot, probe_batches

    tokenizer = AutoTokenizer.from_pretrained(workspace.model)
    batches = probe_batches(_probe_token_lists(workspace, tokenizer), PROBE_SIZE, tokenizer.pad_token_id)
    initial_model = AutoModelForCausalLM.from_pretrained(workspace.model)
    initial, snapshot = RoutingProbe().measure(initial_model, batches)
    trained = AutoModelForCausalLM.from_pretrained(ddp_run.output_dir)
    trained.set_routing_tau(tau_at((MAX_STEPS - 1) / MAX_STEPS, 1.0, 0.1, "linear"))
    final, _ = RoutingProbe().measure(trained, batches, concatenate_snapshot(snapshot))
    return {"initial": initial, "final": final}


def _routing_report(output_dir) -> dict:
    return json.loads((output_dir / "routing_report.json").read_text())


def _assert_metrics_equal(measured: dict, reference: dict, label: str):
    routing_keys = sorted(key for key in reference if key.startswith("routing/"))
    assert routing_keys and set(routing_keys) == {key for key in measured if key.startswith("routing/")}, label
    for key in routing_keys:
        assert measured[key] == pytest.approx(reference[key], **METRIC_TOLERANCE), f"{label}: {key}"


# ----------------------------------------------------------------------------------------------------------------
# the engines
# ----------------------------------------------------------------------------------------------------------------


def test_ddp_reference_equals_one_process(ddp_run, one_process):
    """The reference itself: DDP's step-0 and final metrics are one process's (so the engines are compared with both)."""
    report = _routing_report(ddp_run.output_dir)
    _assert_metrics_equal(report["initial"], one_process["initial"], "ddp step 0")
    _assert_metrics_equal(report["final"], one_process["final"], "ddp end")
    assert "routing/layer_0/static_alpha_entropy" in one_process["initial"]
    assert one_process["final"]["routing/flip_rate"] >= 0 and one_process["final"]["routing/kl_from_initial"] > 0


def test_engine_trains_like_ddp(engine_run, ddp_run):
    engine, output_dir = engine_run

    def per_step(history):
        return {entry["step"]: (entry["loss"], entry["grad_norm"]) for entry in history if "loss" in entry}

    reference, measured = per_step(log_history(ddp_run.output_dir)), per_step(log_history(output_dir))
    assert sorted(reference) == list(range(1, MAX_STEPS + 1)) and sorted(measured) == sorted(reference), engine
    for step, (loss, grad_norm) in reference.items():
        assert measured[step][0] == pytest.approx(loss, rel=1e-5), f"{engine} loss at step {step}"
        assert measured[step][1] == pytest.approx(grad_norm, rel=1e-5), f"{engine} grad norm at step {step}"


def test_engine_routing_metrics_equal(engine_run, one_process):
    engine, output_dir = engine_run
    report = _routing_report(output_dir)
    assert [entry["step"] for entry in report["history"]] == [0, 2, 4, 5], engine
    _assert_metrics_equal(report["initial"], one_process["initial"], f"{engine} step 0")
    _assert_metrics_equal(report["final"], one_process["final"], f"{engine} end")


def _assert_checkpoint_is_ours(output_dir):
    from modeling_polyglu.modeling_polyglu import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_FILES

    names = {path.name for path in output_dir.iterdir()}
    assert set(REMOTE_CODE_FILES) <= names, sorted(names)
    assert not any(name.startswith("_fsdp") for name in names), sorted(names)
    assert json.loads((output_dir / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP
    with safe_open(str(output_dir / "model.safetensors"), "pt") as weights:
        dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    routers = {key: dtype for key, dtype in dtypes.items() if ".mlp.router." in key}
    assert len(routers) == 12 and set(routers.values()) == {"F32"}, routers  # 2 layers x α, β, proj_in/out weight+bias
    return dtypes


def test_engine_checkpoint_loads_like_ddp(engine_run, workspace, ddp_run):
    from transformers import AutoModelForCausalLM

    from modeling_polyglu.conversion.remote_code import load_in_fresh_process

    engine, output_dir = engine_run
    dtypes = _assert_checkpoint_is_ours(output_dir)
    assert set(dtypes.values()) == {"F32"}, engine
    input_ids = torch.randint(0, 30, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, info = load_in_fresh_process(output_dir, input_ids)
    assert info["module"].startswith("transformers_modules.") and info["causal_lm"] == "PolyGLUForCausalLM"
    ddp_model = AutoModelForCausalLM.from_pretrained(ddp_run.output_dir).eval()
    initial_model = AutoModelForCausalLM.from_pretrained(workspace.model).eval()
    with torch.no_grad():
        ddp_logits = ddp_model(input_ids, use_cache=False).logits
        initial_logits = initial_model(input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, ddp_logits, rtol=1e-5, atol=1e-5, msg=lambda message: f"{engine}: {message}")
    assert (ddp_logits - initial_logits).abs().max() > 1e-3, "training did not change the logits: the test has no power"


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed with bf16
# ----------------------------------------------------------------------------------------------------------------


def _cpu_has_bf16() -> bool:
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_bf16_saves_fp32_router_masters(engine, workspace):
    require("deepspeed")
    if not _cpu_has_bf16():
        pytest.skip("this CPU has no bf16 support")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from modeling_polyglu.conversion.remote_code import load_in_fresh_process

    output_dir = workspace.root / f"{engine}_bf16"
    run_engine(workspace, engine, output_dir, "--bf16", "true")
    _assert_checkpoint_is_ours(output_dir)  # (the other weights are written back in the source's dtype, fp32 here)
    saved = load_file(str(output_dir / "model.safetensors"))
    masters = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / f"checkpoint-{MAX_STEPS}"))
    alpha_errors = []
    for key, value in saved.items():
        if ".router." in key:
            assert torch.equal(value, masters[key].float()), f"{engine}: {key} is not DeepSpeed's fp32 master"
            if key.endswith(".alpha"):
                alpha_errors.append(float((value - value.bfloat16().float()).abs().max()))
    assert max(alpha_errors) > 0, "the fp32 masters are all bf16-representable: the test has no power"
    logits, _ = load_in_fresh_process(output_dir, torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(logits).all()
