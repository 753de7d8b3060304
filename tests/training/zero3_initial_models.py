"""Build `polyglu pretrain`'s and `polyglu compare`'s initial models on two ZeRO-3 ranks and save them whole.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no \
        tests/training/zero3_initial_models.py OUTPUT.safetensors

Rank 0 writes every parameter gathered (`new/...`: a polyglu model from `new_model`, `paired/...`: the same variant
given the swiglu reference's tensors by `paired_initial_model`, both under seed 3) and `partitioned`: 1 when every
parameter of both models was a ZeRO-3 partition as soon as it was built, with no rank holding a whole tensor.
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from modeling_polyglu.training.compare import paired_initial_model, with_fields
from modeling_polyglu.training.engines import close_process_group, full_parameter
from modeling_polyglu.training.pretrain import PretrainArguments, build_config, new_model
from modeling_polyglu.training.pretrain_data import build_ascii_tokenizer

SEED = 3


def built_partitioned(model) -> bool:
    return all(hasattr(p, "ds_id") and p.numel() < p.ds_numel for p in model.parameters())


def main(output_path: str) -> None:
    training_args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")  # turns ZeRO-3 init on
    config = with_fields(build_config(PretrainArguments(), build_ascii_tokenizer()), ffn_type="polyglu")
    models = {
        "new": new_model(config, SEED),
        "paired": paired_initial_model(config, with_fields(config, ffn_type="swiglu"), SEED),
    }
    tensors = {"partitioned": torch.tensor(int(all(built_partitioned(model) for model in models.values())))}
    for prefix, model in models.items():
        for name, parameter in model.named_parameters():
            tensors[f"{prefix}/{name}"] = full_parameter(parameter).contiguous()
    if training_args.process_index == 0:
        save_file(tensors, output_path)
    close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
