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


_GENERATE_SCRIPT = r"""
import json, sys
sys.modules["modeling_polyglu"] = None  # the package is "not installed"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

source, prompts, max_new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
tokenizer.padding_side = "left"
texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
with torch.no_grad():
    generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
answers = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"answers": answers, "module": type(model).__module__}))
"""


def _run_child(script: str, arguments: list[str], env: Optional[dict], timeout: float, cwd: str) -> str:
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    completed = subprocess.run(
        [sys.executable, "-c", script, *arguments], capture_output=True, text=True, cwd=cwd, env=child_env, timeout=timeout
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Loading {arguments[0]} with trust_remote_code failed:\n{completed.stderr[-4000:]}")
    # the result is the last line of JSON the child printed (libraries may print before it)
    return [line for line in completed.stdout.splitlines() if line.startswith("{")][-1]


def generate_in_fresh_process(source, prompts: list[str], max_new_tokens: int = 16, env: Optional[dict] = None, timeout: float = 600):
    """Greedy chat answers to `prompts` from a fresh interpreter that cannot import modeling_polyglu."""
    if Path(source).exists():
        source = Path(source).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        line = _run_child(_GENERATE_SCRIPT, [str(source), json.dumps(prompts), str(max_new_tokens)], env, timeout, scratch)
    return json.loads(line)


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
        # the child runs in a scratch directory, not the checkout, so the package cannot come from the cwd
        arguments = [str(source), str(inputs_path), str(outputs_path), revision or ""]
        info = json.loads(_run_child(_CHILD_SCRIPT, arguments, env, timeout, scratch))
        return load_file(str(outputs_path))["logits"], info
