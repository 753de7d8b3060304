#!/usr/bin/env bash
# The GPU check of the Triton mixing kernel (one NVIDIA GPU; prepared for an H200 with torch 2.11 / triton 3.6),
# in at most 8 minutes, every stage under its own time limit:
#   1. installs the carried wheels in .whl/ (liger-kernel, for the comparison rows) that are not installed yet
#   2. the kernel tests on CUDA tensors, compiled by Triton (not the interpreter): tests/test_triton_mixing_kernel.py
#   3. polyglu bench --suite ffn --device cuda: bf16 d 1024/4096 and 4096/14336, 8x2048 tokens, forward+backward time
#      and saved bytes against eager SwiGLU, Liger's SwiGLU, the Triton kernel and the torch.compile path
#   4. polyglu bench --suite step --device cuda: a training step of the polyglu-qwen3-0.6b preset vs its swiglu twin
#   5. in the time left of the 8 minutes: polyglu bench --suite kernel --device cuda, the mixing op alone against
#      Liger's SiLU·mul (bandwidth) and over a sweep of tile sizes (POLYGLU_TRITON_TILES), to tune the defaults with
# Writes into $OUT (default benchmarks/results/gpu): tests.txt, ffn.json, ffn.log, step.json, step.log, kernel.json,
# kernel.log and summary.json (each stage's exit status, the versions, the ratios the issue's targets name, and the
# kernel suite's ratios to Liger and to the default tiles).
#
# Wheels travel to the device machine in .whl/ (git-ignored), fetched here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled programs, not the interpreter
started=$SECONDS
stage() { echo "== $1 ($((SECONDS - started)) s)"; }

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; run it on a machine with an NVIDIA GPU" >&2
    exit 2
fi

stage "carried wheels"
missing=()
for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$name" 2>/dev/null \
        || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${missing[@]}" \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
echo "installed from .whl: ${missing[*]:-nothing}"

stage "kernel tests on CUDA (compiled)"
# each test compiles its own program variants (~2 s each, one core): spread them over 4 workers where xdist exists
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 4)
timeout 170 "$PYTHON" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_triton_mixing_kernel.py 2>&1 \
    | tee "$OUT/tests.txt"
tests_status=${PIPESTATUS[0]}

stage "ffn suite on CUDA"
timeout 200 "$PYTHON" -m modeling_polyglu.benchmarks.runner --suite ffn --device cuda \
    --ffn-types polyglu,moa,dualglu,la,dynamic_geglu --repeats 5 --json "$OUT/ffn.json" 2>&1 | tee "$OUT/ffn.log"
ffn_status=${PIPESTATUS[0]}

stage "step suite on CUDA"
timeout 80 "$PYTHON" -m modeling_polyglu.benchmarks.runner --suite step --device cuda \
    --ffn-types polyglu,moa --repeats 3 --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
step_status=${PIPESTATUS[0]}

stage "kernel suite on CUDA, in the time left"
left=$((465 - (SECONDS - started)))
kernel_status=-1  # not run
if [ "$left" -ge 45 ]; then
    timeout "$left" "$PYTHON" -m modeling_polyglu.benchmarks.runner --suite kernel --device cuda \
        --ffn-types polyglu,moa,dualglu --repeats 5 --json "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.log"
    kernel_status=${PIPESTATUS[0]}
else
    echo "not run: ${left} s left of the 8 minutes" | tee "$OUT/kernel.log"
fi

stage "summary"
"$PYTHON" - "$OUT" "$tests_status" "$ffn_status" "$step_status" "$kernel_status" <<'PYTHON'
import json, sys
from pathlib import Path

import torch
import triton

out, tests, ffn, step, kernel = Path(sys.argv[1]), *map(int, sys.argv[2:6])
summary = {"exit_status": {"tests": tests, "ffn": ffn, "step": step, "kernel (-1: not run)": kernel},
           "gpu": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "triton": triton.__version__, "targets": {}}
lines = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
summary["tests"] = lines[-1] if lines else None
if (out / "ffn.json").exists():
    for case in json.loads((out / "ffn.json").read_text())["suites"]["ffn"]["cases"]:
        rows = {row["contender"]: row for row in case["rows"]}
        summary["targets"][case["case"]] = {
            name: {key: rows[name].get(key) for key in ("time_vs_liger", "saved_vs_liger", "time_vs_swiglu")}
            for name in ("polyglu", "moa", "dualglu", "swiglu[triton]", "polyglu[torch.compile]") if name in rows}
if (out / "step.json").exists():
    rows = json.loads((out / "step.json").read_text())["suites"]["step"]["rows"]
    summary["targets"]["step"] = {row["contender"]: row["time_vs_swiglu"] for row in rows}
if (out / "kernel.json").exists():
    summary["kernel"] = {
        case["case"]: {row["contender"]: {key: row.get(key) for key in ("time_vs_liger", "time_vs_default", "bandwidth_gbs")}
                       for row in case["rows"]}
        for case in json.loads((out / "kernel.json").read_text())["suites"]["kernel"]["cases"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
print(json.dumps(summary, indent=2, allow_nan=True))
PYTHON
stage "done"
[ "$tests_status" -eq 0 ] && [ "$ffn_status" -eq 0 ] && [ "$step_status" -eq 0 ]
