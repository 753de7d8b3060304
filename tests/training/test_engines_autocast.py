"""DeepSpeed with torch autocast (recipes/accelerate/deepspeed_zero{2,3}_autocast.yaml): bf16 compute, fp32 weights.

DeepSpeed's own bf16 mode (deepspeed_zero{2,3}.yaml) casts every weight, routers included, to bf16 for the forward.
The autocast recipes keep the weights fp32 and run only the matrix products in bf16, which is what DDP does under
accelerate's bf16 mixed precision. So the reference here is DDP with bf16 autocast, not fp32 DDP. Every run is
recipes/polyglu_full.yaml on the session's tiny model with the DDP run's overrides (5 steps of 2 ranks x 4 examples),
on two gloo CPU ranks; the CPU must have bf16.

Against DDP with bf16 autocast:
- zero2/zero3 autocast train like it: the loss of every step (relative 2e-4) and the grad norm (2e-3); bf16 products
  summed in another order are the only difference [test_deepspeed_autocast_trains_like_ddp_autocast]
- the saved weights, norm-wise: ZeRO-2 α 1e-7 and every other tensor together 3e-6, and 3 times closer to DDP with
  autocast than to fp32 DDP (so autocast is on; seen 7e-7 against 7e-6). ZeRO-3 α 3e-7 and the rest 1.5e-5: it
  gathers nn.Linear weights and reduces their gradients in bf16 (DeepSpeed's lower_precision_safe_modules default;
  seen 4.7e-6) [test_deepspeed_autocast_saves_the_weights_of_ddp_autocast]
- the control: DeepSpeed's bf16 mode (deepspeed_zero2.yaml, --bf16 true) is outside both bounds — the last loss is
  more than 5e-4 off and the weights more than 1e-4 — so the bounds tell the two apart
  [test_deepspeed_bf16_mode_is_outside_the_autocast_bounds]
- `--bf16 true` beside an autocast config is refused on every rank in one line (DeepSpeed would silently run its bf16
  mode) [test_bf16_flag_beside_deepspeed_autocast_is_refused_in_one_line]
"""

import sys

import pytest
import torch

from .distributed_runs import (
    DDP_LAUNCHER, MAX_STEPS, RECIPE, RECIPES, RUN_OVERRIDES, assert_refused_on_both_ranks, free_port, launch_two_ranks,
    log_history, saved_weights, sft_arguments,
)
from .test_engines import ENGINE_PACKAGES, _cpu_has_bf16, require

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SFT_RECIPE = (str(RECIPES / "sft.py"),)


def deepspeed_launcher(config: str) -> tuple:
    # no --mixed_precision: accelerate refuses it beside a DeepSpeed config file
    return ("--config_file", str(RECIPES / "accelerate" / f"{config}.yaml"))


def launch(workspace, output_dir, launcher, *extra):
    return launch_two_ranks(workspace, RECIPE, output_dir, *RUN_OVERRIDES, "--report_to", "none", *extra,
                            launcher=launcher, entry=SFT_RECIPE)


@pytest.fixture(scope="module", autouse=True)
def needs_deepspeed_and_bf16():
    require(ENGINE_PACKAGES["zero2"])
    if not _cpu_has_bf16():
        pytest.skip("this CPU has no bf16 support")


@pytest.fixture(scope="module")
def ddp_autocast(workspace):
    output_dir = workspace.root / "ddp_bf16_autocast"
    launcher = tuple("bf16" if value == "no" and DDP_LAUNCHER[index - 1] == "--mixed_precision" else value
                     for index, value in enumerate(DDP_LAUNCHER))
    launch(workspace, output_dir, launcher, "--bf16", "true")
    return output_dir


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def autocast_run(request, workspace):
    output_dir = workspace.root / f"{request.param}_autocast"
    launch(workspace, output_dir, deepspeed_launcher(f"deepspeed_{request.param}_autocast"), "--bf16", "false")
    return output_dir


def step_values(output_dir, key: str) -> list[float]:
    return [entry[key] for entry in log_history(output_dir) if key in entry and "train_runtime" not in entry]


def relative_differences(output_dir, reference_dir) -> tuple[float, float]:
    """(α, every other tensor): ‖Δ‖ / ‖reference‖ over the concatenated tensors of the two saved models."""
    weights, reference = saved_weights(output_dir), saved_weights(reference_dir)
    assert sorted(weights) == sorted(reference)
    differences = []
    for is_alpha in (True, False):
        keys = [key for key in reference if key.endswith("router.alpha") == is_alpha]
        assert keys
        got = torch.cat([weights[key].float().flatten() for key in keys])
        expected = torch.cat([reference[key].float().flatten() for key in keys])
        differences.append(((got - expected).norm() / expected.norm()).item())
    return tuple(differences)


def test_deepspeed_autocast_trains_like_ddp_autocast(autocast_run, ddp_autocast):
    for key, tolerance in (("loss", 2e-4), ("grad_norm", 2e-3)):
        reference = step_values(ddp_autocast, key)
        assert len(reference) == MAX_STEPS, key
        assert step_values(autocast_run, key) == pytest.approx(reference, rel=tolerance), key


def test_deepspeed_autocast_saves_the_weights_of_ddp_autocast(autocast_run, ddp_autocast, ddp_run):
    alpha, others = relative_differences(autocast_run, ddp_autocast)
    _, others_to_fp32 = relative_differences(autocast_run, ddp_run.output_dir)
    print(f"autocast vs DDP autocast: alpha {alpha:.2e}, others {others:.2e}; vs fp32 DDP: others {others_to_fp32:.2e}")
    if autocast_run.name.startswith("zero2"):
        assert alpha <= 1e-7 and others <= 3e-6, (alpha, others)
        assert others_to_fp32 > 3 * others, "autocast is not on: the run is as close to fp32 DDP"
    else:  # ZeRO-3 also gathers nn.Linear weights and reduces their gradients in bf16 (DeepSpeed's default)
        assert alpha <= 3e-7 and others <= 1.5e-5, (alpha, others)


def test_deepspeed_bf16_mode_is_outside_the_autocast_bounds(workspace, ddp_autocast):
    output_dir = workspace.root / "zero2_bf16_mode"
    launch(workspace, output_dir, (*deepspeed_launcher("deepspeed_zero2"), "--mixed_precision", "bf16"), "--bf16", "true")
    last, reference = step_values(output_dir, "loss")[-1], step_values(ddp_autocast, "loss")[-1]
    assert abs(last - reference) / reference > 5e-4, (last, reference)
    _, others = relative_differences(output_dir, ddp_autocast)
    assert others > 1e-4, others


def test_bf16_flag_beside_deepspeed_autocast_is_refused_in_one_line(workspace):
    output_dir = workspace.root / "zero2_autocast_bf16_flag"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *deepspeed_launcher("deepspeed_zero2_autocast"),
        "--num_processes", "2", "--main_process_port", str(free_port()), *SFT_RECIPE,
        *sft_arguments(workspace, RECIPE, output_dir, "--max_steps", "1", "--bf16", "true"),
    ]
    assert_refused_on_both_ranks(
        command, output_dir, "polyglu sft: error: --bf16 true next to a DeepSpeed config that enables torch_autocast"
    )
    assert not (output_dir / "model.safetensors").exists()
