"""`polyglu sft` with tensor parallelism on CPU ranks — a test-only launcher (users on GPUs need none of this).

    torchrun --nproc_per_node 2 tests/training/tensor_parallel_on_cpu.py --use_cpu true \
        --model_init_kwargs '{"tp_plan": "auto"}' <polyglu sft arguments>

The model is sharded at load time (`from_pretrained(..., tp_plan="auto")` through SFTConfig.model_init_kwargs) and the
Trainer hands accelerate a ParallelismConfig with its tp_size. accelerate 1.15 and 1.16 accept that only for GPU-like
distributed types (it raises for MULTI_CPU), so this script counts MULTI_CPU as one, which is what a GPU launch is;
with TP enabled accelerate then leaves the model unwrapped, as on GPUs. It prints how the loaded model is sharded.
"""

import sys

import accelerate.accelerator
from accelerate.utils import DistributedType

import modeling_polyglu.training.sft as sft

_multi_device = accelerate.accelerator.Accelerator.multi_device.fget
_load_model_and_tokenizer = sft.load_model_and_tokenizer


def _multi_device_with_cpu_ranks(self):
    return _multi_device(self) or (self.use_distributed and self.distributed_type == DistributedType.MULTI_CPU)


def _load_and_report_sharding(model_args, training_args):
    model, tokenizer = _load_model_and_tokenizer(model_args, training_args)
    parameters = list(model.parameters())
    sharded = sum(type(parameter).__name__ == "DTensor" for parameter in parameters)
    print(f"Tensor parallel on CPU: tp_size {model.tp_size}, {sharded}/{len(parameters)} parameters are DTensors", flush=True)
    return model, tokenizer


accelerate.accelerator.Accelerator.multi_device = property(_multi_device_with_cpu_ranks)
sft.load_model_and_tokenizer = _load_and_report_sharding

if __name__ == "__main__":
    from modeling_polyglu.cli import main

    sys.exit(main(["sft", *sys.argv[1:]]))
