"""`polyglu convert qwen3`: function-preserving retrofit of Qwen3 checkpoints, streaming, bad input, interruption.

transformers' own Qwen3ForCausalLM (tiny, random, saved locally) is the source and the reference for the deviation.
"""

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.char_tokenizer import build_char_tokenizer
from modeling_polyglu.cli import main
from modeling_polyglu.conversion.qwen3 import convert_qwen3, parse_layers

QWEN3_DIMS = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
)
ROUTED = ["polyglu", "moa", "dualglu", "la"]
QUIET = dict(log=lambda *args: None)


def save_qwen3(directory, tied=False, shard="60KB", dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{**QWEN3_DIMS, **overrides}, tie_word_embeddings=tied)).to(dtype)
    model.save_pretrained(directory, max_shard_size=shard)
    build_char_tokenizer(["abcdefghijklmnopqrstuvwxyz .,?0123456789"]).save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3") / "src"
    save_qwen3(directory)
    return directory


def tensors_of(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.parametrize("ffn_type", ["swiglu"] + ROUTED)
def test_retrofit_preserves_the_function_and_routers_get_gradients(qwen3_dir, tmp_path, ffn_type):
    report = convert_qwen3(qwen3_dir, tmp_path / "out", ffn_type, **QUIET)
    print(f"{ffn_type}: max|Δlogit|={report.max_abs_logit_diff:.3e} KL={report.mean_kl:.3e} "
          f"router grad={report.router_grad_norm:.3e}")
    assert report.mean_kl <= 1e-4
    assert report.max_abs_logit_diff < 1e-2
    if ffn_type == "swiglu":
        assert report.max_abs_logit_diff == 0.0
    else:
        assert report.router_grad_norm > 0.0
    assert not report.warnings


@pytest.mark.parametrize("ffn_type", ["dynamic_geglu", "geglu", "mlp_gelu"])
def test_non_preserving_variants_convert_with_a_warning_and_the_measured_deviation(qwen3_dir, tmp_path, ffn_type):
    lines = []
    report = convert_qwen3(qwen3_dir, tmp_path / "out", ffn_type, log=lines.append)
    assert any(line.startswith("warning:") and "cannot reproduce SwiGLU" in line for line in lines)
    assert report.max_abs_logit_diff > 1e-4  # it really is a different function
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Warning:" in card and f"{report.max_abs_logit_diff:.3e}" in card


def test_only_chosen_layers_get_routers_and_every_source_tensor_is_copied(qwen3_dir, tmp_path):
    report = convert_qwen3(qwen3_dir, tmp_path / "out", "polyglu", layers="top:1", **QUIET)
    assert report.converted_layers == [2]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ffn_types"] == ["swiglu", "swiglu", "polyglu"]
    source, converted = tensors_of(qwen3_dir), tensors_of(tmp_path / "out")
    for name, tensor in source.items():
        assert torch.equal(converted[name], tensor), name
    new = sorted(set(converted) - set(source))
    assert new and all(name.startswith("model.layers.2.mlp.router.") for name in new)
    assert all(converted[name].dtype == torch.float32 for name in new)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(converted)


def test_output_is_a_complete_loadable_repo(qwen3_dir, tmp_path):
    convert_qwen3(qwen3_dir, tmp_path / "out", "moa", verify=False, **QUIET)
    names = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"config.json", "modeling_polyglu.py", "configuration_polyglu.py", "activation_mixing.py",
            "cpu_mixing_kernel.py", "triton_mixing_kernel.py", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    card = (tmp_path / "out" / "README.md").read_text()
    front_matter = card.split("---")[1]
    for key in ("library_name: transformers", "pipeline_tag: text-generation", "tags:"):
        assert key in front_matter
    assert "base_model" not in front_matter  # a local folder name is not a Hub id
    assert 'AutoTokenizer.from_pretrained("REPO_OR_PATH", trust_remote_code=True)' in card and "revision=" in card
    assert "| routing τ |" in card and "| activations |" in card and "routing pooling" not in card  # polyglu only
    assert "Verification was skipped" in card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["PolyGLUForCausalLM"]  # what save_pretrained writes; vLLM picks the class by it
    model = PolyGLUForCausalLM.from_pretrained(tmp_path / "out")
    assert model.model.layers[0].mlp.ffn_type == "moa"


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_and_tied_sources(tmp_path, tied):
    source = tmp_path / "src"
    save_qwen3(source, tied=tied, dtype=torch.bfloat16, shard="10GB")
    report = convert_qwen3(source, tmp_path / "out", "polyglu", **QUIET)
    assert report.mean_kl <= 1e-4
    converted = tensors_of(tmp_path / "out")
    assert converted["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert converted["model.layers.0.mlp.router.alpha"].dtype == torch.float32
    assert ("lm_head.weight" in converted) == (not tied)
    loaded = PolyGLUForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.router.alpha.dtype == torch.float32


def test_layers_option_is_validated():
    assert parse_layers("0,2-3", 5) == [0, 2, 3]
    assert parse_layers("bottom:2", 5) == [0, 1]
    for bad in ("top:0", "top:9", "7", "x"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 5)


def _cli_error(capsys, argv):
    capsys.readouterr()  # drop what building the fixture printed
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    return error


def _corrupt(directory, how):
    shard = sorted(directory.glob("model*.safetensors"))[0]
    if how == "garbage":
        shard.write_bytes(b"\x00not a safetensors file at all" * 10)
    elif how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    return shard


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_dir", "config.json: not found"),
        ("llama", "model_type is 'llama', expected 'qwen3'"),
        ("garbage", "not a readable safetensors file"),
        ("truncated", "truncated"),
        ("wrong_shape", "has shape"),
        ("missing_tensor", "missing"),
        ("extra_tensor", "unexpected tensor"),
        ("missing_shard", "listed in model.safetensors.index.json but missing"),
        ("bin_only", "re-save it with safetensors"),
    ],
)
def test_bad_sources_fail_in_one_line_and_leave_nothing(tmp_path, capsys, breakage, message):
    source = tmp_path / "src"
    if breakage != "missing_dir":
        save_qwen3(source, shard="10GB" if breakage in ("truncated", "wrong_shape", "missing_tensor", "extra_tensor") else "60KB")
    if breakage == "llama":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif breakage in ("garbage", "truncated"):
        _corrupt(source, breakage)
    elif breakage in ("wrong_shape", "missing_tensor", "extra_tensor"):
        tensors = tensors_of(source)
        if breakage == "wrong_shape":
            tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
        elif breakage == "missing_tensor":
            del tensors["model.layers.1.self_attn.k_norm.weight"]
        else:
            tensors["model.layers.1.mlp.experts.weight"] = torch.zeros(2)
        from safetensors.torch import save_file

        save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    elif breakage == "missing_shard":
        sorted(source.glob("model-*.safetensors"))[1].unlink()
    elif breakage == "bin_only":
        for path in source.glob("*.safetensors*"):
            path.unlink()
        (source / "pytorch_model.bin").write_bytes(b"pickle")
    error = _cli_error(capsys, ["convert", "qwen3", "--src", str(source), "--dst", str(tmp_path / "dst"), "--ffn-type", "polyglu"])
    assert message in error
    assert sorted(path.name for path in tmp_path.iterdir()) == (["src"] if breakage != "missing_dir" else [])


def test_existing_destination_needs_overwrite(qwen3_dir, tmp_path, capsys):
    destination = tmp_path / "dst"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    error = _cli_error(capsys, ["convert", "qwen3", "--src", str(qwen3_dir), "--dst", str(destination), "--ffn-type", "la"])
    assert "already exists" in error and "--overwrite" in error
    assert (destination / "keep.txt").read_text() == "mine"
    (destination / "config.json").write_text("{}")  # a model directory: --overwrite may replace it
    assert main(["convert", "qwen3", "--src", str(qwen3_dir), "--dst", str(destination), "--ffn-type", "la", "--overwrite", "--no-verify"]) == 0
    assert not (destination / "keep.txt").exists() and json.loads((destination / "config.json").read_text())["ffn_type"] == "la"


def test_a_missing_probe_file_is_refused_before_any_shard_is_converted(qwen3_dir, tmp_path, capsys, monkeypatch):
    from modeling_polyglu.conversion import qwen3

    def no_shard_may_be_read(*args, **kwargs):
        raise AssertionError("a shard was read before the probe file was checked")

    monkeypatch.setattr(qwen3, "iter_shard_tensors", no_shard_may_be_read)
    destination = tmp_path / "dst"
    error = _cli_error(capsys, ["convert", "qwen3", "--src", str(qwen3_dir), "--dst", str(destination), "--ffn-type",
                                "polyglu", "--probe-file", str(tmp_path / "probe.txt")])
    assert error == (f"polyglu convert: error: --probe-file {tmp_path / 'probe.txt'}: no such file; pass a text file to "
                     "measure the deviation on, or leave it out for the built-in text.")
    assert not destination.exists()


# `polyglu ...` (after the signal number) that sends itself the signal while it writes its third safetensors file
_SIGNALLED_AT_THIRD_SHARD = """
import os, sys
import safetensors.torch

original_save_file = safetensors.torch.save_file
written = []

def save_file(*args, **kwargs):
    original_save_file(*args, **kwargs)
    written.append(args[1])
    if len(written) == 3:
        print("signalled while writing shard 3", file=sys.stderr, flush=True)
        os.kill(os.getpid(), int(sys.argv[1]))

safetensors.torch.save_file = save_file
from modeling_polyglu.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_conversion_leaves_nothing_behind(tmp_path, sig):
    source = tmp_path / "src"
    save_qwen3(source, shard="40KB", hidden_size=128, intermediate_size=512, num_hidden_layers=6)
    destination = tmp_path / "dst"
    # the signal is raised as the third shard is written: polling the staging folder from outside could miss it
    process = subprocess.run(
        [sys.executable, "-c", _SIGNALLED_AT_THIRD_SHARD, str(int(sig)), "convert", "qwen3", "--src", str(source),
         "--dst", str(destination), "--ffn-type", "polyglu"],
        capture_output=True, text=True, timeout=120,
    )
    assert "signalled while writing shard 3" in process.stderr, process.stderr[-3000:]
    assert process.returncode != 0
    assert not destination.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_a_source_from_the_hub_cache_is_named_by_its_hub_id(qwen3_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "0123abc"
    shutil.copytree(qwen3_dir, snapshot)
    convert_qwen3(snapshot, tmp_path / "out", "polyglu", verify=False, **QUIET)
    front_matter = (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert "base_model: Qwen/Qwen3-0.6B" in front_matter
