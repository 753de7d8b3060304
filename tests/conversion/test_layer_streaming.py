"""Layer-streamed forward and router gradient (conversion verification) against whole models loaded by from_pretrained."""

import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_polyglu import PolyGLUConfig, PolyGLUForCausalLM
from modeling_polyglu.conversion import layer_streaming
from modeling_polyglu.conversion.layer_streaming import LayerStreamedCausalLM, logit_deviation

from modeling_polyglu.conversion.qwen3 import convert_qwen3

from .test_qwen3 import QUIET, save_qwen3


def materialised_layers(streamed) -> int:
    return sum(not next(layer.parameters()).is_meta for layer in streamed.layers)


@pytest.mark.parametrize("tied, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_streamed_qwen3_gives_from_pretrained_logits_with_one_layer_in_memory(tmp_path, monkeypatch, tied, dtype):
    save_qwen3(tmp_path / "src", tied=tied, dtype=dtype)
    monkeypatch.setattr(layer_streaming, "CHUNK_BYTES", 4096)  # the embeddings and head are read in row chunks
    input_ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    whole = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = whole(input_ids, use_cache=False).logits
    streamed = LayerStreamedCausalLM(Qwen3ForCausalLM, Qwen3Config.from_pretrained(str(tmp_path / "src")), tmp_path / "src")
    seen = []
    for layer in streamed.layers:
        layer.register_forward_hook(lambda *args: seen.append(materialised_layers(streamed)), prepend=True)
    logits = streamed.logits(input_ids)
    assert seen == [1] * len(streamed.layers)  # only the running layer holds weights
    assert materialised_layers(streamed) == 0
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    max_diff, kl = logit_deviation(expected, logits, chunk=7)
    assert max_diff <= 1e-5 and abs(kl) < 1e-9


@pytest.mark.parametrize("ffn_type", ["polyglu", "moa"])
def test_streamed_router_gradient_equals_the_whole_model_backward(tmp_path, ffn_type):
    save_qwen3(tmp_path / "src")
    convert_qwen3(tmp_path / "src", tmp_path / "dst", ffn_type, router_init_activation=None, verify=False, **QUIET)
    input_ids = torch.randint(0, 64, (1, 33), generator=torch.Generator().manual_seed(1))
    whole = PolyGLUForCausalLM.from_pretrained(str(tmp_path / "dst"), dtype=torch.float32).eval()
    output = whole(input_ids, labels=input_ids, use_cache=False)
    output.loss.backward()
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for n, p in whole.named_parameters() if ".router." in n))
    streamed = LayerStreamedCausalLM(PolyGLUForCausalLM, PolyGLUConfig.from_pretrained(str(tmp_path / "dst")), tmp_path / "dst")
    torch.testing.assert_close(streamed.logits(input_ids), output.logits.detach(), rtol=0, atol=1e-5)
    gradient_norm = streamed.router_gradient_norm(input_ids)
    assert expected > 0 and gradient_norm == pytest.approx(expected, rel=1e-4)
    assert materialised_layers(streamed) == 0
