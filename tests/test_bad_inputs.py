"""Bad configurations, hand-edited checkpoints, unsupported caches and random command lines.

Property-based (hypothesis): every valid tiny PolyGLUConfig builds and round-trips through to_dict; every invalid
value of a validated field raises a ValueError that names the field; any command line `polyglu` is given ends in
an exit code and at most one error line, never a traceback.
"""

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.cli import main
from modeling_polyglu.configuration_polyglu import (
    ACTIVATION_NAMES,
    FFN_TYPES,
    POSITIVE_INTEGER_FIELDS,
    ROUTING_POOLINGS,
    PolyGLUConfig,
)

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_configs(draw):
    heads_kv = draw(st.integers(1, 3))
    layers = draw(st.integers(1, 3))
    activations = draw(st.lists(st.sampled_from(ACTIVATION_NAMES), min_size=1, max_size=4, unique=True))
    values = dict(
        vocab_size=draw(st.integers(1, 100)), hidden_size=draw(st.integers(1, 64)),
        intermediate_size=draw(st.integers(1, 64)), num_hidden_layers=layers,
        num_key_value_heads=heads_kv, num_attention_heads=heads_kv * draw(st.integers(1, 3)),
        head_dim=2 * draw(st.integers(1, 16)), max_position_embeddings=draw(st.integers(1, 4096)),
        activations=activations, routing_tau=draw(st.floats(1e-3, 1e3)),
        routing_pooling=draw(st.sampled_from(ROUTING_POOLINGS)), router_hidden_size=draw(st.integers(1, 64)),
        ffn_types=draw(st.none() | st.lists(st.sampled_from(FFN_TYPES), min_size=layers, max_size=layers)),
        router_init_strength=draw(st.floats(-20, 20)),
    )
    return values


@FAST
@given(valid_configs())
def test_every_valid_config_builds_and_round_trips(values):
    config = PolyGLUConfig(**values)
    again = PolyGLUConfig(**config.to_dict())
    for name, value in values.items():
        assert getattr(again, name) == value


NOT_POSITIVE_INTEGERS = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none(),
)
INVALID_VALUES = {
    **{name: NOT_POSITIVE_INTEGERS for name in POSITIVE_INTEGER_FIELDS},
    # None is valid for these two: derived from the attention heads, as in Qwen3Config
    **{name: NOT_POSITIVE_INTEGERS.filter(lambda value: value is not None) for name in ("num_key_value_heads", "head_dim")},
    "routing_tau": st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan), st.text(max_size=4),
                             st.booleans(), st.none()),
    "rms_norm_eps": st.one_of(st.floats(max_value=0), st.just(math.inf), st.text(max_size=2)),
    "router_init_strength": st.one_of(st.just(math.inf), st.just(-math.inf), st.just(math.nan), st.text(max_size=2)),
    "activations": st.one_of(
        st.sampled_from(ACTIVATION_NAMES),  # a bare string
        st.lists(st.sampled_from(ACTIVATION_NAMES), min_size=1, max_size=3).map(lambda names: names + names[:1]),  # repeat
        st.lists(st.text(min_size=1, max_size=5).filter(lambda t: t not in ACTIVATION_NAMES), min_size=1, max_size=2),
        st.just([]),
    ),
    "ffn_type": st.text(max_size=8).filter(lambda t: t not in FFN_TYPES),
    "ffn_types": st.one_of(st.sampled_from(FFN_TYPES), st.lists(st.sampled_from(FFN_TYPES), min_size=3, max_size=4)),
    "routing_pooling": st.text(max_size=8).filter(lambda t: t not in ROUTING_POOLINGS),
}
FIELD_NAMED = {"activations": ("activations",), "ffn_types": ("ffn_types",)}


@FAST
@given(st.data())
def test_every_invalid_field_value_is_a_value_error_naming_the_field(data):
    name = data.draw(st.sampled_from(sorted(INVALID_VALUES)))
    value = data.draw(INVALID_VALUES[name])
    if name == "head_dim" and isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    with pytest.raises(ValueError) as raised:
        PolyGLUConfig(**{**TINY, name: value})
    assert any(label in str(raised.value) for label in FIELD_NAMED.get(name, (name,))), (name, value, raised.value)


@pytest.mark.parametrize("values, message", [
    ({"activations": ["relu", "relu"]}, "activations lists relu more than once"),
    ({"activations": "relu"}, "activations must be a list of names, e.g. ['relu']"),
    ({"intermediate_size": 0}, "intermediate_size must be an integer >= 1"),
    ({"hidden_size": -4}, "hidden_size must be an integer >= 1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1"),
    ({"routing_tau": math.inf}, "routing_tau must be a finite number > 0"),
    ({"routing_tau": "0.5"}, "routing_tau must be a finite number > 0, got '0.5'"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"router_hidden_size": 3.5}, "router_hidden_size must be an integer >= 1"),
])
def test_the_reported_config_mistakes_name_their_field(values, message):
    with pytest.raises(ValueError) as raised:
        PolyGLUConfig(**{**TINY, **values})
    assert message in str(raised.value)


def test_a_string_tau_in_a_hand_edited_config_json_is_refused_on_load(tmp_path):
    PolyGLUConfig(**TINY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "routing_tau": "0.1"}))
    with pytest.raises(ValueError, match="routing_tau must be a finite number"):
        PolyGLUConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("edited, saved_as", [("swiglu", "polyglu"), ("moa", "polyglu"), ("polyglu", "a fixed-activation variant")])
def test_loading_weights_of_another_ffn_type_warns_naming_it(tmp_path, edited, saved_as):
    original = "swiglu" if edited == "polyglu" else "polyglu"
    torch.manual_seed(0)
    PolyGLUForCausalLM(PolyGLUConfig(**TINY, ffn_type=original)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "ffn_type": edited}))
    with pytest.warns(UserWarning, match=f"are '{edited}' in config.json but their weights are {saved_as}"):
        PolyGLUForCausalLM.from_pretrained(tmp_path)


def test_a_matching_checkpoint_loads_without_the_warning(tmp_path, recwarn):
    PolyGLUForCausalLM(PolyGLUConfig(**TINY, ffn_type="moa")).save_pretrained(tmp_path)
    model, info = PolyGLUForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not [w for w in recwarn if "config.json but their weights" in str(w.message)]


@pytest.mark.parametrize("variant", [{"ffn_type": "swiglu"}, {"ffn_type": "moa"}, {"ffn_type": "polyglu", "routing_pooling": "token"}])
def test_a_static_cache_without_routing_state_generates_what_the_dynamic_one_does(variant):
    torch.manual_seed(0)
    model = PolyGLUForCausalLM(PolyGLUConfig(**TINY, **variant)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


OPTION_VALUES = st.one_of(st.text(max_size=6), st.sampled_from(["-1", "0", "nan", "1e999", "all", "top:0", "."]))
OPTIONS = {
    "qwen3": ["--src", "--dst", "--ffn-type", "--layers", "--router-init-activation", "--router-init-strength",
              "--probe-file", "--seed"],
    "polychromatic": ["--src", "--dst", "--tokenizer", "--tau", "--max-position-embeddings", "--routing-pooling"],
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_convert_command_line_ends_in_an_exit_code_and_one_error_line(data, tmp_path_factory, capsys):
    kind = data.draw(st.sampled_from(sorted(OPTIONS)))
    chosen = data.draw(st.lists(st.sampled_from(OPTIONS[kind]), max_size=5, unique=True))
    argv = ["convert", kind]
    for option in chosen:
        argv += [option, data.draw(OPTION_VALUES)]
    argv += data.draw(st.lists(st.sampled_from(["--overwrite", "--no-verify", "--bogus"]), max_size=2, unique=True))
    root = tmp_path_factory.mktemp("cli")
    argv = [str(root / value) if previous in ("--src", "--dst") else value for previous, value in zip([""] + argv, argv)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: usage line and error line
        code = exit_.code
    error = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith("polyglu")
    assert len([line for line in error.splitlines() if "error:" in line]) == 1
