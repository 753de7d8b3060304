"""Saved checkpoints load with trust_remote_code in a fresh interpreter where modeling_polyglu is not importable."""

import json
import os

import pytest
import torch

from modeling_polyglu.conversion.remote_code import load_in_fresh_process

from .utils import tiny_model

REMOTE_FILES = {
    "configuration_polyglu.py", "modeling_polyglu.py", "activation_mixing.py", "cpu_mixing_kernel.py",
    "triton_mixing_kernel.py",
}


def environment_without_triton(directory) -> dict:
    """The child's environment with `import triton` failing: the remote code must not need it (GPU kernel only)."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text('import sys\nsys.modules["triton"] = None  # "not installed"\n')
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in [str(directory), environment.get("PYTHONPATH")] if p)
    return environment


@pytest.mark.parametrize("ffn_type", ["polyglu", "moa"])
def test_fresh_process_loads_saved_model_with_identical_logits(tmp_path, ffn_type):
    model = tiny_model(ffn_type=ffn_type)
    model.save_pretrained(tmp_path)
    saved = {path.name for path in tmp_path.iterdir()}
    assert REMOTE_FILES <= saved
    assert "model.safetensors" in saved
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    input_ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    remote_logits, info = load_in_fresh_process(tmp_path, input_ids, env=environment_without_triton(tmp_path / "env"))
    with torch.no_grad():
        local_logits = model(input_ids, use_cache=False).logits
    print(f"remote-code {ffn_type}: max|Δlogit| = {(remote_logits - local_logits).abs().max().item():.2e}")
    assert torch.equal(remote_logits, local_logits)
    assert info["module"].startswith("transformers_modules.")
    assert (info["config"], info["base"], info["causal_lm"]) == ("PolyGLUConfig", "PolyGLUModel", "PolyGLUForCausalLM")


def test_remote_loaded_model_saves_again_with_its_code(tmp_path):
    """A model loaded through remote code (no package) re-saves a loadable checkpoint — what fine-tuners do."""
    from transformers import AutoModelForCausalLM

    first, second = tmp_path / "first", tmp_path / "second"
    tiny_model(ffn_type="polyglu").save_pretrained(first)
    remote_model = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)
    remote_model.save_pretrained(second)
    assert REMOTE_FILES <= {path.name for path in second.iterdir()}
    input_ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    logits_second, _ = load_in_fresh_process(second, input_ids)
    logits_first, _ = load_in_fresh_process(first, input_ids)
    assert torch.equal(logits_first, logits_second)
