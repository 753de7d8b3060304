"""Session fixtures of the two-rank training tests: one tiny workspace and one DDP run, shared by
test_sft_distributed.py (DDP itself) and test_engines.py (DeepSpeed, FSDP2 and Ray compared with it)."""

from types import SimpleNamespace

import pytest

from .distributed_runs import RECIPE, RUN_OVERRIDES, build_workspace, launch_two_ranks


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A converted tiny PolyGLU model (from a random Qwen3) and a 64-conversation JSONL file."""
    return build_workspace(tmp_path_factory.mktemp("sft_distributed"))


@pytest.fixture(scope="session")
def ddp_run(workspace):
    """recipes/polyglu_full.yaml (τ anneal 1.0 -> 0.1) for 5 steps on 2 DDP ranks; checkpoint (trainer_state.json) at step 5."""
    output_dir = workspace.root / "ddp_full"
    launch_two_ranks(workspace, RECIPE, output_dir, *RUN_OVERRIDES, "--report_to", "tensorboard")
    return SimpleNamespace(output_dir=output_dir, tensorboard_dir=workspace.root / "ddp_full_tensorboard")
