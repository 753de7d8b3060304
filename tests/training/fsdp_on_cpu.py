"""`polyglu sft` (or `pretrain`) with FSDP2 forced on for CPU ranks — a test-only launcher (GPUs need none of this).

accelerate 1.15 and 1.16 turn FSDP on only for GPU-like distributed types: with CPU ranks the state stays MULTI_CPU,
the FSDP plugin is dropped without a warning and the Trainer wraps the model in DDP. This script restores what
accelerate does on GPUs — distributed type FSDP with the launcher's plugin — right after the state is built, then
runs `polyglu sft` (or `polyglu pretrain` when the first argument is `pretrain`):

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/training/fsdp_on_cpu.py [pretrain] --use_cpu true <polyglu sft / pretrain arguments>
"""

import sys

import accelerate.accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__
_fsdp2_prepare_model = accelerate.accelerator.fsdp2_prepare_model


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # every later AcceleratorState() copies PartialState's type over its own; accelerate syncs the two on GPUs too
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _prepare_model_and_report_sharding(accelerator, model, *args, **kwargs):
    model = _fsdp2_prepare_model(accelerator, model, *args, **kwargs)
    parameters = list(model.parameters())
    sharded = sum(type(parameter).__name__ == "DTensor" for parameter in parameters)
    print(f"FSDP2 on CPU: {sharded}/{len(parameters)} parameters are DTensors", flush=True)
    return model


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
accelerate.accelerator.fsdp2_prepare_model = _prepare_model_and_report_sharding  # where Accelerator looks it up

if __name__ == "__main__":
    if sys.argv[1:2] == ["pretrain"]:
        from modeling_polyglu.training.pretrain import main as pretrain_main

        sys.exit(pretrain_main(sys.argv[2:]))
    from modeling_polyglu.training.sft import main

    sys.exit(main())
