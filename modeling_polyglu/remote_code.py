"""Check that a saved model loads with trust_remote_code in a fresh interpreter where this package is absent.

`load_in_fresh_process(path, input_ids)` starts a new Python process that makes `import modeling_polyglu` fail,
loads the directory (or Hub repo id) with AutoConfig, AutoModel and AutoModelForCausalLM (trust_remote_code=True)
and returns the causal LM's logits for `input_ids` together with the class names it loaded.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

_CHILD_SCRIPT = r"""
import json, sys
sys.modules["modeling_polyglu"] = None  # the package is "not installed": importing it raises ImportError
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

source, inputs_path, outputs_path, revision = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] or None
config = AutoConfig.from_pretrained(source, trust_remote_code=True, revision=revision)
base = AutoModel.from_pretrained(source, trust_remote_code=True, revision=revision)
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, revision=revision).eval()
input_ids = load_file(inputs_path)["input_ids"]
with torch.no_grad():
    logits = model(input_ids, use_cache=False).logits
save_file({"logits": logits.contiguous()}, outputs_path)
print(json.dumps({
    "config": type(config).__name__, "base": type(base).__name__, "causal_lm": type(model).__name__,
    "module": type(model).__module__,
}))
"""


def load_in_fresh_process(
    source, input_ids: torch.Tensor, revision: Optional[str] = None, env: Optional[dict] = None, timeout: float = 600
):
    """Return (logits, info) computed by a fresh interpreter that cannot import modeling_polyglu."""
    if Path(source).exists():
        source = Path(source).resolve()  # the child runs in a scratch directory
    with tempfile.TemporaryDirectory() as scratch:
        inputs_path = Path(scratch) / "inputs.safetensors"
        outputs_path = Path(scratch) / "outputs.safetensors"
        save_file({"input_ids": input_ids.contiguous()}, str(inputs_path))
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        completed = subprocess.run(
            [sys.executable, "-c", _CHILD_SCRIPT, str(source), str(inputs_path), str(outputs_path), revision or ""],
            capture_output=True,
            text=True,
            cwd=scratch,  # not the checkout, so the package cannot be imported from the working directory
            env=child_env,
            timeout=timeout,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"Loading {source} with trust_remote_code failed:\n{completed.stderr[-4000:]}")
        info = json.loads(completed.stdout.strip().splitlines()[-1])
        return load_file(str(outputs_path))["logits"], info
