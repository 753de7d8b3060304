"""`polyglu sft` full fine-tuning saves like its source (dtype, shards, routers fp32) and writes a model card."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.char_tokenizer import build_chat_tokenizer
from modeling_polyglu.conversion.qwen3 import convert_qwen3
from modeling_polyglu.training import saving
from modeling_polyglu.training.saving import _shard_plan, resave_like_source
from modeling_polyglu.training.sft import build_parser, run_sft

from ..conversion.test_qwen3 import tensors_of
from ..utils import tiny_chat_qwen3, write_addition_dialogues


@pytest.fixture(scope="module")
def bf16_sharded_polyglu(tmp_path_factory):
    root = tmp_path_factory.mktemp("saving")
    tokenizer = build_chat_tokenizer(["0123456789+=? whatis"])
    qwen3 = tiny_chat_qwen3(tokenizer).to(torch.bfloat16)
    qwen3.save_pretrained(root / "qwen3", max_shard_size="40KB")
    tokenizer.save_pretrained(root / "qwen3")
    convert_qwen3(root / "qwen3", root / "polyglu", "polyglu", verify=False, log=lambda *a: None)
    write_addition_dialogues(root / "data.jsonl", 40)
    return root


def test_full_fine_tuning_saves_in_the_source_dtype_and_shards_with_a_card(bf16_sharded_polyglu, tmp_path):
    source, output = bf16_sharded_polyglu / "polyglu", tmp_path / "out"
    arguments = [
        "--model_name_or_path", str(source), "--dataset_name", str(bf16_sharded_polyglu / "data.jsonl"),
        "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--routing_monitor_steps", "0", "--disable_tqdm", "true",
    ]
    trainer = run_sft(*build_parser().parse_args_and_config(args=arguments), quiet=True)
    saved = tensors_of(output)
    assert len(list(output.glob("*.safetensors"))) == len(list(source.glob("*.safetensors"))) > 1
    assert (output / "model.safetensors.index.json").is_file() and not list(output.glob(".resave-*"))
    assert all((tensor.dtype == torch.float32) == (".router." in name) for name, tensor in saved.items())
    trained = dict(trainer.model.named_parameters())
    for name, tensor in saved.items():  # the trained values, rounded once to the source dtype
        assert torch.equal(tensor, trained[name].detach().to(tensor.dtype)), name
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    card = (output / "README.md").read_text()
    assert "fine-tuned with polyglu sft" in card and "base_model" not in card.split("---")[1]
    reloaded = PolyGLUForCausalLM.from_pretrained(output)
    assert reloaded.model.layers[0].mlp.router.alpha.dtype == torch.float32


def test_resave_splits_and_joins_shards(tmp_path):
    tensors = {f"model.layers.{i}.w": torch.randn(64, 64) for i in range(4)}
    tensors["model.layers.0.mlp.router.alpha"] = torch.randn(8, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    resave_like_source(tmp_path, "float16", max_shard_bytes=2 * 64 * 64 * 2)
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    saved = tensors_of(tmp_path)
    assert saved["model.layers.0.mlp.router.alpha"].dtype == torch.float32
    assert torch.equal(saved["model.layers.3.w"], tensors["model.layers.3.w"].half())
    resave_like_source(tmp_path, None, max_shard_bytes=2**30)
    assert [path.name for path in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert _shard_plan([("a", 10), ("b", 30), ("c", 5)], 20) == [["a"], ["b"], ["c"]]


def loadable_weights(directory):
    """The tensors transformers would load from `directory` (model.safetensors before an index), or None where the
    set it would pick is incomplete."""
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = json.loads(index.read_text())["weight_map"]
    if not all((directory / name).is_file() for name in set(weight_map.values())):
        return None
    tensors = {}
    for name in set(weight_map.values()):
        tensors.update(load_file(str(directory / name)))
    return tensors if set(weight_map) <= set(tensors) else None


@pytest.mark.parametrize("first_shard_bytes, then_shard_bytes", [(2**30, 2 * 64 * 64 * 2), (2 * 64 * 64 * 4, 2**30)],
                         ids=["single_to_shards", "shards_to_single"])
def test_a_resave_stopped_at_any_file_operation_leaves_complete_weights(tmp_path, monkeypatch, first_shard_bytes,
                                                                       then_shard_bytes):
    tensors = {f"model.layers.{i}.w": torch.randn(64, 64) for i in range(4)}
    operations = 0
    while True:  # stop the resave at its 1st, 2nd, ... rename or removal, until one runs through
        directory = tmp_path / f"stopped_at_{operations}"
        directory.mkdir()
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text("{}")
        resave_like_source(directory, None, max_shard_bytes=first_shard_bytes)
        calls = {"left": operations}

        def stop_when_due(original):
            def operation(*args, **kwargs):
                if calls["left"] == 0:
                    raise KeyboardInterrupt
                calls["left"] -= 1
                return original(*args, **kwargs)
            return operation

        with monkeypatch.context() as patch:
            patch.setattr(saving.os, "replace", stop_when_due(saving.os.replace))
            patch.setattr(saving.Path, "unlink", stop_when_due(saving.Path.unlink))
            try:
                resave_like_source(directory, "float16", max_shard_bytes=then_shard_bytes)
                finished = True
            except KeyboardInterrupt:
                finished = False
        loaded = loadable_weights(directory)
        assert loaded is not None and sorted(loaded) == sorted(tensors), f"stopped after {operations} operations"
        assert len({tensor.dtype for tensor in loaded.values()}) == 1, "a mix of the old and the new weights"
        if finished:
            break
        operations += 1
    assert operations >= 3 and {tensor.dtype for tensor in loaded.values()} == {torch.float16}
