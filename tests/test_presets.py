"""The presets in configuration/ build the models they claim to."""

import pytest
import torch

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.presets import list_presets, load_preset


def _meta_model(config):
    with torch.device("meta"):
        return PolyGLUForCausalLM(config)


def test_presets_are_listed():
    assert {"tiny-debug", "polyglu-qwen3-0.6b", "polychromatic-0.6b"} <= set(list_presets())


def test_polychromatic_preset_has_the_reference_parameter_count():
    config = load_preset("polychromatic-0.6b")
    model = _meta_model(config)
    assert model.num_parameters() == 597_153_888  # REFERENCE.md §a, measured on the reference code
    routing = sum(p.numel() for name, p in model.named_parameters() if ".router." in name)
    assert routing == 1_380_960
    assert config.routing_pooling == "sequence" and config.use_cache is False
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.tie_word_embeddings
    assert model.generation_config.use_cache is False


def test_polyglu_qwen3_preset_matches_qwen3_dims():
    config = load_preset("polyglu-qwen3-0.6b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1024, 3072, 28)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 128)
    model = _meta_model(config)
    backbone = sum(p.numel() for name, p in model.named_parameters() if ".router." not in name)
    assert backbone == 596_049_920  # Qwen3-0.6B with tied embeddings


def test_overrides_and_unknown_preset():
    assert load_preset("tiny-debug", ffn_type="moa").ffn_type == "moa"
    with pytest.raises(ValueError, match="Unknown preset 'nope'; available presets"):
        load_preset("nope")
