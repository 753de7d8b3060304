"""LoRA under DeepSpeed ZeRO-2/3 and FSDP2: `polyglu sft --config recipes/polyglu_lora.yaml` on two CPU ranks,
compared with the same LoRA run under DDP.

Every run: the tiny workspace model (distributed_runs.py), fp32 (the recipe's bf16 base would make the comparison a
rounding test), no LoRA dropout (masks drawn in a different order are not an engine difference), 3 steps of 2 ranks x
4 examples at learning rate 1e-2 without warm-up and τ annealed 1.0 -> 0.3 (so the routing measurably moves),
routing measured at steps 0, 2 and 3, the adapter saved at the end.

Per engine, against DDP (fp32; relative 1e-5):
- the loss and grad norm of every step [test_lora_engine_trains_like_ddp]
- the saved adapter: the same keys (LoRA A/B of every projection and the full router tensors PEFT keeps in
  modules_to_save), every tensor equal to DDP's (norm-wise relative 3e-5: Adam amplifies reduction-order noise
  where gradients are ~0), LoRA B and the routers moved from their start [test_lora_engine_saves_the_ddp_adapter]
- every `routing/*` metric of every measurement [test_lora_engine_routing_metrics_equal]
- the adapter loads through AutoPeftModelForCausalLM (remote code) and reproduces the DDP adapter's logits (1e-5)
  [test_lora_engine_adapter_loads_like_ddp]

Ray Train runs plain DDP inside its workers (test_engines.py covers it for full fine-tuning), so it is not repeated
here. deepspeed is optional: its runs skip without it, unless POLYGLU_REQUIRE_ENGINES=1 (CI).
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from .distributed_runs import launch_two_ranks
from .test_engines import ENGINE_PACKAGES, METRIC_TOLERANCE, require, run_engine

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LORA_RECIPE = "polyglu_lora.yaml"
LORA_STEPS = 3
LORA_MONITORED_STEPS = [0, 2, 3]
# a learning rate and a τ anneal that move the routing within 3 steps, so equal metrics mean something
LORA_OVERRIDES = (
    "--dtype", "float32", "--lora_dropout", "0.0", "--max_steps", str(LORA_STEPS), "--logging_steps", "1",
    "--save_strategy", "no", "--warmup_steps", "0", "--learning_rate", "1e-2",
    "--routing_tau_schedule", "linear", "--routing_tau_start", "1.0", "--routing_tau_end", "0.3",
)
LORA_ENGINES = [engine for engine in ENGINE_PACKAGES if engine != "ray"]
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_TOLERANCE = 3e-5


@pytest.fixture(scope="module")
def ddp_lora_run(workspace):
    output_dir = workspace.root / "ddp_lora_reference"
    launch_two_ranks(workspace, LORA_RECIPE, output_dir, *LORA_OVERRIDES, "--report_to", "none")
    return output_dir


@pytest.fixture(scope="module", params=LORA_ENGINES)
def lora_engine_run(request, workspace):
    engine = request.param
    require(ENGINE_PACKAGES[engine])
    output_dir = workspace.root / f"{engine}_lora"
    result = run_engine(workspace, engine, output_dir, recipe=LORA_RECIPE, overrides=LORA_OVERRIDES)
    if engine == "fsdp2":
        sharding = re.search(r"FSDP2 on CPU: (\d+)/(\d+) parameters are DTensors", result.stdout + result.stderr)
        assert sharding and sharding[1] == sharding[2] != "0", "FSDP2 did not shard every parameter"
    return engine, output_dir


def _log_history(output_dir) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def _step_values(output_dir, key: str) -> list[float]:
    return [entry[key] for entry in _log_history(output_dir) if key in entry and "train_runtime" not in entry]


def test_lora_engine_trains_like_ddp(lora_engine_run, ddp_lora_run):
    engine, output_dir = lora_engine_run
    for key in ("loss", "grad_norm"):
        reference = _step_values(ddp_lora_run, key)
        assert len(reference) == LORA_STEPS, key
        assert _step_values(output_dir, key) == pytest.approx(reference, rel=1e-5), f"{engine}: {key}"


def test_lora_engine_saves_the_ddp_adapter(lora_engine_run, ddp_lora_run, workspace):
    engine, output_dir = lora_engine_run
    adapter, reference = load_file(str(output_dir / ADAPTER_FILE)), load_file(str(ddp_lora_run / ADAPTER_FILE))
    assert sorted(adapter) == sorted(reference), engine
    assert any("lora_A" in key for key in adapter) and any(".mlp.router." in key for key in adapter)
    for key, tensor in reference.items():
        assert adapter[key].dtype == tensor.dtype and adapter[key].shape == tensor.shape, f"{engine}: {key}"
        # norm-wise 3e-5: Adam divides by √v, so an element whose gradient is ~0 turns reduction-order noise into a
        # step of up to ~lr; seen here: ≤ 8e-7 (zero2, fsdp2) and 6.6e-6 (zero3, one LoRA A at lr 1e-2)
        error = float((adapter[key] - tensor).norm() / tensor.norm().clamp_min(1e-12))
        assert error <= ADAPTER_TOLERANCE, f"{engine}: {key} differs from DDP's by {error:.2e} (norm-wise)"
    # the run trained: LoRA B starts at zero and the routers at the converted model's values
    assert any(float(tensor.abs().max()) > 0 for key, tensor in adapter.items() if "lora_B" in key)
    initial = load_file(str(next(workspace.model.glob("*.safetensors"))))
    router_keys = [key for key in adapter if ".mlp.router." in key]
    moved = [key for key in router_keys if not torch.equal(adapter[key], initial[_base_key(key, initial)])]
    assert moved, f"{engine}: no router tensor changed"


def _base_key(adapter_key: str, base_state: dict) -> str:
    """The base checkpoint's name of a tensor PEFT saved for a module in modules_to_save."""
    name = adapter_key.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")
    assert name in base_state, f"{adapter_key} -> {name} is not in the base checkpoint"
    return name


def test_lora_engine_routing_metrics_equal(lora_engine_run, ddp_lora_run):
    engine, output_dir = lora_engine_run
    history = json.loads((output_dir / "routing_report.json").read_text())["history"]
    reference = json.loads((ddp_lora_run / "routing_report.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [entry["step"] for entry in reference] == LORA_MONITORED_STEPS
    start, end = reference[0]["metrics"], reference[-1]["metrics"]
    assert abs(end["routing/entropy"] - start["routing/entropy"]) > 1e-3 * start["routing/entropy"], "routing did not move"
    assert end["routing/kl_from_initial"] > 1e-6, "routing did not move"
    for measured, expected in zip(history, reference):
        keys = sorted(key for key in expected["metrics"] if key.startswith("routing/"))
        assert keys and keys == sorted(measured["metrics"]), f"{engine} @ {expected['step']}"
        for key in keys:
            assert measured["metrics"][key] == pytest.approx(expected["metrics"][key], **METRIC_TOLERANCE), (
                f"{engine} @ step {expected['step']}: {key}"
            )


def test_lora_engine_adapter_loads_like_ddp(lora_engine_run, ddp_lora_run):
    from peft import AutoPeftModelForCausalLM

    engine, output_dir = lora_engine_run
    input_ids = torch.tensor([[3, 9, 4, 12, 7, 5, 8]])
    logits = []
    for directory in (output_dir, ddp_lora_run):
        model = AutoPeftModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(model(input_ids, use_cache=False).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5, msg=engine)
