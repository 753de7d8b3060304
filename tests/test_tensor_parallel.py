"""Tensor parallelism (`tp_plan="auto"`): two gloo ranks on CPU under torchrun equal the unsharded model.

For every ffn_type (swiglu = Qwen3 included), with routers moved far from their start and in training mode (PolyGLU's
Gumbel noise on, seeded alike): forward logits (1e-5) and every parameter's gradient after one backward and after a
second micro-batch accumulated into it (1e-4 relative to the largest entry) equal one unsharded process
[test_tensor_parallel_equals_unsharded]. This checks the plan: q_norm/k_norm replicated with summed gradients
(without it their gradients are one rank's partial sum), α split on d_ff, the routers' replicated parameters and
inputs with summed gradients, and each rank's noise being its slice of the unsharded draw. The accumulated case is
what transformers' `replicated_with_grad_allreduce` (Qwen3's q_norm/k_norm style) gets wrong: it all-reduces
`.grad` after every backward, so the first micro-batch is counted again (relative error ~1 on those weights).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modeling_polyglu import FFN_TYPES

from .training.distributed_runs import free_port
from .tensor_parallel_child import second_micro_batch_loss
from .utils import tiny_model

CHILD = Path(__file__).with_name("tensor_parallel_child.py")


def test_tensor_parallel_equals_unsharded(tmp_path):
    # tiny-debug has 4 heads and 2 KV heads: each rank gets 2 query heads and 1 KV head, d_ff 64 -> 32
    checkpoints, models, input_ids = [], {}, torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    for ffn_type in FFN_TYPES:
        model = tiny_model(ffn_type=ffn_type, seed=1)
        model.save_pretrained(tmp_path / ffn_type)
        save_file({"input_ids": input_ids}, str(tmp_path / ffn_type / "inputs.safetensors"))
        checkpoints.append(str(tmp_path / ffn_type))
        models[ffn_type] = model
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(CHILD.parents[1]), os.environ.get("PYTHONPATH")])))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(CHILD), str(tmp_path), *checkpoints,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for ffn_type, model in models.items():
        sharded = load_file(str(tmp_path / f"{ffn_type}.safetensors"))
        model.train()
        torch.manual_seed(0)
        logits = model(input_ids=input_ids, use_cache=False).logits
        logits.mean().backward()
        torch.testing.assert_close(sharded["logits"], logits.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{ffn_type}: {m}")
        parameters = dict(model.named_parameters())
        assert {key[len("grad."):] for key in sharded if key.startswith("grad.")} == set(parameters), ffn_type
        assert_gradients_equal(sharded, "grad", parameters, ffn_type)
        torch.manual_seed(1)
        second_micro_batch_loss(model(input_ids=input_ids.flip(-1), use_cache=False).logits).backward()
        assert_gradients_equal(sharded, "accumulated", parameters, ffn_type)


def assert_gradients_equal(sharded: dict, prefix: str, parameters: dict, ffn_type: str) -> None:
    for name, parameter in parameters.items():
        expected = parameter.grad
        scale = expected.abs().max().clamp_min(1e-12)
        error = float((sharded[f"{prefix}.{name}"] - expected).abs().max() / scale)
        assert error <= 1e-4, f"{ffn_type} {name}: {prefix} gradient relative error {error:.2e}"
