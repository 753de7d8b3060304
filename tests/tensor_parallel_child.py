"""One rank of the tensor-parallel check (run by tests/test_tensor_parallel.py under `torchrun --nproc_per_node 2`).

    tensor_parallel_child.py OUTPUT_DIR CHECKPOINT...

Each checkpoint is loaded with `tp_plan="auto"` (gloo on CPU) and runs, in training mode (PolyGLU's Gumbel noise on,
the RNG seeded alike on every rank), one forward on the saved `input_ids` and one backward of the mean logit, then a second micro-batch (the ids
reversed, the mean squared logit) accumulated into the same gradients; rank 0 writes the logits and every
parameter's whole gradient after each backward (DTensor gradients assembled with full_tensor) to
OUTPUT_DIR/<checkpoint name>.safetensors.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modeling_polyglu  # noqa: F401  registers the Auto classes


def whole(tensor: torch.Tensor) -> torch.Tensor:
    # a copy: .grad accumulates in place, so a view taken after the first backward would change with the second
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone().contiguous()


def second_micro_batch_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient points elsewhere than the first backward's mean logit."""
    return logits.float().square().mean()


def main(output_dir: str, checkpoints: list[str]) -> None:
    dist.init_process_group("gloo")
    for checkpoint in checkpoints:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto", dtype=torch.float32)
        model.train()
        input_ids = load_file(str(Path(checkpoint) / "inputs.safetensors"))["input_ids"]
        torch.manual_seed(0)  # the same noise draw on every rank and in the unsharded reference
        logits = model(input_ids=input_ids, use_cache=False).logits
        logits.float().mean().backward()
        results = {"logits": whole(logits)}
        for name, parameter in model.named_parameters():
            results[f"grad.{name}"] = whole(parameter.grad)
        # a second micro-batch accumulated into the same .grad, as under gradient accumulation
        torch.manual_seed(1)
        second_micro_batch_loss(model(input_ids=input_ids.flip(-1), use_cache=False).logits).backward()
        for name, parameter in model.named_parameters():
            results[f"accumulated.{name}"] = whole(parameter.grad)
        if dist.get_rank() == 0:
            save_file(results, str(Path(output_dir) / f"{Path(checkpoint).name}.safetensors"))
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
