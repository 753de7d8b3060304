"""Child process of test_triton_mixing_kernel.py: compiles the Triton programs for NVIDIA GPUs without one.

    python triton_compile_child.py ARCH [ARCH ...] [--only WORD,...]   e.g. 90 (Hopper) 80 (Ampere); --only keeps
                                                                      the variants whose name contains a WORD

The interpreter that runs the value tests executes the programs as Python; the GPU compiler is stricter (static
types of loop-carried values, constexpr-only control flow where required, register allocation). Triton compiles
to a cubin from the kernel source and a target alone, without a driver, so every variant the host code launches
is compiled here through ptxas. Runs without TRITON_INTERPRET (the programs must be JIT functions). Prints one
JSON line: {"triton": version, "compiled": [[arch, variant, cubin bytes], ...]}.
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_polyglu import triton_mixing_kernel as kernels  # noqa: E402

DICTIONARY_CODES = kernels._packed_codes(("relu", "tanh", "silu", "gelu"))
SWIGLU_CODES = kernels._packed_codes(("silu",))
INTEGER_ARGUMENTS = {"R", "T", "F", "static_k_stride", "static_sequence_stride"}
TABLE_POINTERS = {"weights_ptr", "soft_ptr", "static_logits_ptr", "static_factor_ptr", "token_logits_ptr",
                  "token_factor_ptr", "row_partial_ptr", "column_partial_ptr"}


def forward(name, **overrides):
    """A forward variant: the 4-activation dictionary, gated, row-wise soft unless overridden."""
    constexprs = dict(BLOCK_T=8, BLOCK_F=256, CODES=DICTIONARY_CODES, K=4, MODE=1, HARD=False, HAS_UP=True)
    return (f"forward {name}", kernels._mix_forward_kernel, {**constexprs, **overrides})


def backward(name, **overrides):
    """A backward variant: as forward, with every gradient and the row sums of the logit gradient."""
    constexprs = dict(BLOCK_T=8, BLOCK_F=128, ROW_STEPS=16, CODES=DICTIONARY_CODES, K=4, K_POW2=4, MODE=1,
                      HARD=False, SOFTMAX=True, HAS_UP=True, NEEDS_GATE=True, NEEDS_UP=True, NEEDS_LOGIT_GRADS=True,
                      NEEDS_ROW_SUMS=True, NEEDS_COLUMN_SUMS=False)
    return (f"backward {name}", kernels._mix_backward_kernel, {**constexprs, **overrides})


# (name, program, constexprs): the variants mix_forward / mix_backward launch for the ffn types
VARIANTS = [
    forward("swiglu", CODES=SWIGLU_CODES, K=1, MODE=0),
    forward("moa (row-wise)"),
    forward("polyglu", MODE=2),
    forward("polyglu hard", MODE=2, HARD=True),
    backward("swiglu", CODES=SWIGLU_CODES, K=1, K_POW2=1, MODE=0, SOFTMAX=False, NEEDS_LOGIT_GRADS=False,
             NEEDS_ROW_SUMS=False),
    backward("moa (row-wise softmax)"),
    backward("moa hard, frozen routers (row-wise, no logit gradients)", HARD=True, NEEDS_LOGIT_GRADS=False,
             NEEDS_ROW_SUMS=False),
    backward("la (row-wise linear, no up)", SOFTMAX=False, HAS_UP=False, NEEDS_UP=False),
    backward("polyglu", MODE=2, NEEDS_COLUMN_SUMS=True),
    backward("polyglu hard", MODE=2, HARD=True, NEEDS_COLUMN_SUMS=True),
]


def signature(program, constexprs: dict) -> dict:
    """Argument types: bf16 activations, fp32 tables, i32 sizes, an fp32 temperature, and the constexprs."""
    types = {}
    for name in program.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in TABLE_POINTERS:
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16"
        elif name in INTEGER_ARGUMENTS:
            types[name] = "i32"
        elif name == "inv_tau":
            types[name] = "fp32"
        else:
            raise KeyError(f"no type for argument {name!r} of {program.__name__}")
    return types


def main(arguments: list) -> None:
    words = arguments[arguments.index("--only") + 1].split(",") if "--only" in arguments else [""]
    architectures = [a for i, a in enumerate(arguments) if a != "--only" and (i == 0 or arguments[i - 1] != "--only")]
    variants = [v for v in VARIANTS if any(word in v[0] for word in words)]
    compiled = []
    for arch in architectures:
        for name, program, constexprs in variants:
            source = ASTSource(fn=program, signature=signature(program, constexprs), constexprs=constexprs)
            binary = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                                    options={"num_warps": 4, "enable_fp_fusion": True})
            compiled.append([int(arch), name, len(binary.asm["cubin"])])
    print(json.dumps({"triton": triton.__version__, "compiled": compiled}))


if __name__ == "__main__":
    main(sys.argv[1:])
