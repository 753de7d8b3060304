"""The Triton kernel's checks that need a process of their own: the interpreter run and the GPU compile.

* test_triton_mixing_kernel.py in Triton's interpreter: a child pytest started with TRITON_INTERPRET=1 (the
  variable must be set before triton is first imported, which importing this package does); on a CUDA machine, or
  in a session started with the variable, that module runs in this process instead;
* every program compiled for sm_90 (Hopper) by triton_compile_child.py, without a GPU: what the interpreter lets
  through (static types, constexpr control flow, register allocation) fails there.

That a checkpoint loads where triton cannot be imported is checked by test_remote_code.py.

Skipped without triton (or numpy) unless POLYGLU_REQUIRE_TRITON=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .utils import require_usable_triton

REPO_ROOT = Path(__file__).resolve().parent.parent
INTERPRETER_NEEDED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

require_usable_triton()


def child_environment(**changes) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), environment.get("PYTHONPATH")] if p)
    environment.update(changes)
    return environment


@pytest.mark.skipif(not INTERPRETER_NEEDED, reason="test_triton_mixing_kernel.py runs in this process")
def test_the_kernel_tests_pass_in_tritons_interpreter():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_triton_mixing_kernel.py"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_environment(TRITON_INTERPRET="1"), timeout=900,
    )
    lines = completed.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    print(f"interpreter child: {summary}")
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
    assert " passed" in summary, summary
    # the only tests that may skip here are those that need two GPUs
    skips = [line for line in lines if line.startswith("SKIPPED")]
    assert all("needs two CUDA devices" in line for line in skips), skips


def test_the_programs_compile_for_hopper_without_a_gpu():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "triton_compile_child.py"), "90", "--only", "polyglu,moa"],
        capture_output=True, text=True, env=child_environment(), timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    compiled = {name for _, name, _ in report["compiled"]}
    assert {"forward polyglu", "forward polyglu hard", "backward polyglu", "backward polyglu hard",
            "forward moa (row-wise)", "backward moa (row-wise softmax)"} <= compiled
    assert all(size > 0 for _, _, size in report["compiled"])
