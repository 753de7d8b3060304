"""Common model checks in the spirit of transformers' ModelTesterMixin, run for every feed-forward variant.

Every test is parametrized over `ALL_VARIANTS` (each ffn_type plus the options that change the computation).

Covered ModelTesterMixin checks (our test names in brackets):
- save/load round trip, safetensors format [test_save_and_reload_gives_identical_logits]
- loading checkpoints with missing weights ("fast init"): missing tensors come from `_init_weights`, never from
  uninitialised memory [test_missing_mlp_weights_are_initialised_as_init_weights_defines,
  test_swiglu_checkpoint_loads_into_variant]
- loading in half precision with `_keep_in_fp32_modules_strict` [test_bf16_loading_keeps_routers_in_fp32]
- hidden states and attention outputs [test_hidden_states_output, test_eager_attention_output]
- attention implementations agree (eager vs sdpa), with and without padding [test_eager_and_sdpa_logits_agree]
- gradient checkpointing, default and reentrant [test_gradient_checkpointing_matches_plain_backward]
- training: loss, gradients on every parameter, optimisation [test_training_step_*, test_optimizer_steps_*]
- resize_token_embeddings, tied and untied heads [test_resize_token_embeddings_*]
- tied weights [test_lm_head_is_tied_to_input_embeddings]
- batching equivalence, with right and left padding [test_batch_matches_rows_run_alone]
- return_dict=False tuples, equal in structure to `to_tuple()` of the dict output, for the base model and both
  heads [test_return_dict_false_returns_tuple, test_tuple_output_equals_to_tuple_of_dict_output]
- router parameters created fp32 under a half default dtype, `_keep_in_fp32_modules_strict` naming only modules
  the model has [test_router_parameters_are_created_in_fp32_whatever_the_default_dtype,
  test_keep_in_fp32_modules_strict_names_only_existing_modules]
- inputs_embeds instead of input_ids, and get/set_input_embeddings [test_inputs_embeds_match_input_ids]
- determinism of eval forward [test_eval_forward_is_deterministic]
- config save/load (ConfigTester's JSON round trip) [test_config_round_trips_through_json]
- sequence classification head [test_sequence_classification_head]
- Auto class registration [test_auto_classes_resolve_to_polyglu]

Deliberately skipped:
- torchscript tracing: transformers 5 dropped TorchScript support, and the cache/routing code branches on data.
- fx tracing (HFTracer): only covers transformers' own architectures; pooling and cache adoption are data-dependent.
- torch.compile fullgraph: the model declares `_can_compile_fullgraph = False` (routing pooling branches on data).
- pruning heads / head masking: removed from transformers 5; the model has no head-mask inputs.
- model parallelism, device_map offload and multi-GPU (DataParallel, tensor/pipeline parallel): need several
  accelerators; this suite runs on one CPU.
- flash attention and fp16/bf16 numerical parity on GPU: need CUDA; bf16 loading is covered on CPU instead.
- generation (GenerationTesterMixin, cache equivalence): belongs to the generation tests, not to this mixin.
- problem_type regression/multi-label of the classification head: the loss is transformers' shared
  `loss_function`, not model code; single-label classification is covered.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import modeling_polyglu  # noqa: F401  (registers the Auto classes)
from modeling_polyglu import PolyGLUConfig, PolyGLUForCausalLM, PolyGLUForSequenceClassification, PolyGLUModel

from .utils import ALL_VARIANTS, randomize_routers, tiny_config, tiny_model, variant_id

TINY = tiny_config()
VOCAB_SIZE = TINY.vocab_size
PAD_TOKEN_ID = TINY.pad_token_id
FIRST_ORDINARY_TOKEN = 3  # 0, 1 and 2 are pad, bos and eos in the tiny preset
DUALGLU_ACTIVATIONS = ("silu", "gelu")  # documented: DualGLU always mixes these two
INPUT_DEPENDENT_FFN_TYPES = ("polyglu", "moa", "dynamic_geglu")

parametrize_variants = pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
pytestmark = [
    parametrize_variants,
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def variant_kwargs(variant, **overrides) -> dict:
    ffn_type, options = variant
    return {"ffn_type": ffn_type, **options, **overrides}


def build(variant, seed=0, **overrides) -> PolyGLUForCausalLM:
    return tiny_model(seed, **variant_kwargs(variant, **overrides))


def random_ids(batch, length, seed=0, high=VOCAB_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_TOKEN, high, (batch, length), generator=generator)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def has_input_dependent_router(variant) -> bool:
    ffn_type, options = variant
    if ffn_type == "dualglu":
        return options.get("dualglu_mixing", "dynamic") == "dynamic"
    return ffn_type in INPUT_DEPENDENT_FFN_TYPES


def router_parameters(model) -> dict:
    return {name: parameter for name, parameter in model.named_parameters() if ".router." in name}


def save_without(model, directory, drop) -> list:
    """Save `model`, then rewrite its safetensors file without the tensors whose name satisfies `drop`."""
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    dropped = sorted(name for name in tensors if drop(name))
    save_file({name: t for name, t in tensors.items() if name not in dropped}, path, metadata={"format": "pt"})
    return dropped


def expected_router_initialisation(variant, config) -> dict:
    """Per routing parameter (relative to `mlp.router.`), the value `_init_weights` must give it, derived from the
    config alone; the string "normal" means drawn from N(0, initializer_range)."""
    ffn_type, options = variant
    activations = list(DUALGLU_ACTIVATIONS if ffn_type == "dualglu" else config.activations)
    k = len(activations)
    preference = torch.zeros(k)
    one_hot = torch.zeros(k)
    if config.router_init_activation is not None:
        preference[activations.index(config.router_init_activation)] = config.router_init_strength
        one_hot[activations.index(config.router_init_activation)] = 1.0
    if ffn_type == "polyglu":
        return {
            "alpha": preference.expand(config.intermediate_size, k),
            "beta": torch.ones(k),
            "proj_in.weight": "normal",
            "proj_in.bias": torch.zeros(config.router_hidden_size),
            "proj_out.weight": "normal",
            "proj_out.bias": torch.zeros(k),
        }
    mixing = options.get("dualglu_mixing", "dynamic")
    if ffn_type == "moa" or (ffn_type == "dualglu" and mixing == "dynamic"):
        return {"weight": "normal", "bias": preference}
    if ffn_type == "dualglu" and mixing == "learned_static":
        return {"weights": preference}
    if ffn_type == "la":
        return {"weights": one_hot if config.router_init_activation is not None else torch.full((k,), 1.0 / k)}
    if ffn_type == "dynamic_geglu":
        return {
            "scale": torch.tensor([config.dynamic_geglu_scale_init]),
            "bias": torch.tensor([config.dynamic_geglu_bias_init]),
            "norm.weight": torch.ones(config.hidden_size),
            "norm.bias": torch.zeros(config.hidden_size),
        }
    return {}  # fixed activations and DualGLU's static ½/½ have no routing parameters


def assert_drawn_from_initializer_normal(name, tensor, std):
    assert torch.isfinite(tensor).all(), name
    measured = tensor.float().std().item()
    assert 0.5 * std < measured < 1.5 * std, f"{name}: std {measured}, expected about {std}"
    assert tensor.abs().max().item() < 6 * std, f"{name}: max |value| {tensor.abs().max().item()}"


def assert_routers_initialised(model, variant):
    config = model.config
    expected = expected_router_initialisation(variant, config)
    for layer_idx, layer in enumerate(model.model.layers):
        actual = {name: p.detach() for name, p in layer.mlp.named_parameters() if name.startswith("router.")}
        assert sorted(actual) == sorted(f"router.{name}" for name in expected), f"layer {layer_idx}"
        for name, value in expected.items():
            tensor = actual[f"router.{name}"]
            label = f"layers.{layer_idx}.mlp.router.{name}"
            if isinstance(value, str):
                assert_drawn_from_initializer_normal(label, tensor, config.initializer_range)
            else:
                torch.testing.assert_close(tensor.float(), value, atol=0, rtol=0, msg=lambda m: f"{label}: {m}")


def assert_sane(model):
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), f"{name} is not finite"
        assert parameter.abs().max().item() < 10, f"{name} holds {parameter.abs().max().item()} (uninitialised?)"


def padded_batch(rows, side):
    """Stack token rows of different lengths with pad tokens on `side`; returns (input_ids, attention_mask)."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def left_padding_position_ids(attention_mask):
    # what generate() passes: real tokens count from 0 after the padding
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def loss_and_gradients(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------


def test_save_and_reload_gives_identical_logits(variant, tmp_path):
    model = build(variant)
    input_ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()

    reloaded, info = PolyGLUForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not reloaded.training
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    for key, value in variant_kwargs(variant).items():
        assert getattr(reloaded.config, key) == value
    original_state = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    with torch.no_grad():
        actual = reloaded(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preferred_activation", [None, "gelu"], ids=["unbiased", "prefer_gelu"])
def test_missing_mlp_weights_are_initialised_as_init_weights_defines(variant, preferred_activation, tmp_path):
    model = build(variant, router_init_activation=preferred_activation)
    dropped = save_without(model, tmp_path, lambda name: ".mlp." in name)

    reloaded, info = PolyGLUForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(dropped)
    assert_sane(reloaded)
    assert_routers_initialised(reloaded, variant)
    original = dict(model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(parameter, original[name]), f"{name} was not loaded from the checkpoint"
        elif name.endswith("_proj.weight") and ".router." not in name:
            assert_drawn_from_initializer_normal(name, parameter.detach(), reloaded.config.initializer_range)
    with torch.no_grad():
        assert torch.isfinite(reloaded(random_ids(2, 6)).logits).all()


def test_swiglu_checkpoint_loads_into_variant(variant, tmp_path):
    swiglu = tiny_model(0, randomize=False, ffn_type="swiglu")
    swiglu.save_pretrained(tmp_path)
    kwargs = variant_kwargs(variant)

    retrofitted, info = PolyGLUForCausalLM.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert retrofitted.config.ffn_type == kwargs["ffn_type"]
    assert info["missing_keys"] == set(router_parameters(retrofitted))
    has_gate = hasattr(retrofitted.model.layers[0].mlp, "gate_proj")
    expected_unexpected = set() if has_gate else {n for n in swiglu.state_dict() if "gate_proj" in n}
    assert info["unexpected_keys"] == expected_unexpected
    assert_sane(retrofitted)
    assert_routers_initialised(retrofitted, variant)
    swiglu_parameters = dict(swiglu.named_parameters())
    for name, parameter in retrofitted.named_parameters():
        if ".router." not in name:
            assert torch.equal(parameter, swiglu_parameters[name]), name
    with torch.no_grad():
        assert torch.isfinite(retrofitted(random_ids(2, 6)).logits).all()


def test_bf16_loading_keeps_routers_in_fp32(variant, tmp_path):
    model = build(variant)
    model.save_pretrained(tmp_path)

    half = PolyGLUForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, parameter in half.named_parameters():
        expected_dtype = torch.float32 if ".router." in name else torch.bfloat16
        assert parameter.dtype == expected_dtype, f"{name} is {parameter.dtype}"
    input_ids = random_ids(2, 7)
    with torch.no_grad():
        half_logits = half(input_ids).logits
        full_logits = model(input_ids).logits
    assert half_logits.dtype == torch.bfloat16
    assert torch.isfinite(half_logits).all()
    assert relative_error(half_logits.float(), full_logits) < 0.05


def test_config_round_trips_through_json(variant, tmp_path):
    config = tiny_config(**variant_kwargs(variant, routing_tau=0.7))
    config.save_pretrained(tmp_path)
    reloaded = PolyGLUConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.uses_noncausal_routing == (variant == ("polyglu", {"routing_pooling": "sequence"}))


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------


def test_hidden_states_output(variant):
    model = build(variant)
    batch, length = 2, 6
    input_ids = random_ids(batch, length)
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
        last_hidden_state = model.model(input_ids).last_hidden_state
        embeddings = model.get_input_embeddings()(input_ids)
    hidden_states = outputs.hidden_states
    assert len(hidden_states) == model.config.num_hidden_layers + 1
    for layer_output in hidden_states:
        assert layer_output.shape == (batch, length, model.config.hidden_size)
    torch.testing.assert_close(hidden_states[0], embeddings, atol=0, rtol=0)
    torch.testing.assert_close(hidden_states[-1], last_hidden_state, atol=1e-6, rtol=0)
    assert not torch.equal(hidden_states[1], hidden_states[0])


def test_eager_attention_output(variant):
    model = build(variant, attn_implementation="eager")
    batch, length = 2, 6
    with torch.no_grad():
        attentions = model(random_ids(batch, length), output_attentions=True).attentions
    config = model.config
    assert len(attentions) == config.num_hidden_layers
    future = torch.ones(length, length, dtype=torch.bool).triu(diagonal=1)
    for weights in attentions:
        assert weights.shape == (batch, config.num_attention_heads, length, length)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, config.num_attention_heads, length))
        assert (weights[..., future] == 0).all(), "a token attends to a later token"


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_eager_and_sdpa_logits_agree(variant, padded):
    eager = build(variant, attn_implementation="eager")
    sdpa = build(variant, attn_implementation="sdpa")
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    if padded:
        input_ids, attention_mask = padded_batch([random_ids(1, 8, seed=1)[0], random_ids(1, 5, seed=2)[0]], "left")
    else:
        input_ids, attention_mask = random_ids(2, 8), None
    with torch.no_grad():
        eager_logits = eager(input_ids, attention_mask=attention_mask).logits
        sdpa_logits = sdpa(input_ids, attention_mask=attention_mask).logits
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], atol=1e-5, rtol=1e-5)


def test_return_dict_false_returns_tuple(variant):
    model = build(variant)
    input_ids = random_ids(2, 6)
    with torch.no_grad():
        expected = model(input_ids)
        as_tuple = model(input_ids, return_dict=False)
        with_labels = model(input_ids, labels=input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(with_labels, tuple)
    torch.testing.assert_close(as_tuple[0], expected.logits, atol=0, rtol=0)
    assert with_labels[0].dim() == 0
    torch.testing.assert_close(with_labels[1], expected.logits, atol=0, rtol=0)


def assert_same_structure_and_values(from_tuple, from_dict, path="output"):
    """The `return_dict=False` output must be `to_tuple()` of the dict output, nested containers included."""
    assert type(from_tuple) is type(from_dict) or not isinstance(from_tuple, (tuple, list, dict)), (
        f"{path}: {type(from_tuple).__name__} where {type(from_dict).__name__} is expected"
    )
    if isinstance(from_tuple, (tuple, list)):
        assert len(from_tuple) == len(from_dict), path
        for index, (a, b) in enumerate(zip(from_tuple, from_dict)):
            assert_same_structure_and_values(a, b, f"{path}[{index}]")
    elif isinstance(from_tuple, torch.Tensor):
        torch.testing.assert_close(from_tuple, from_dict, atol=0, rtol=0, msg=lambda m: f"{path}: {m}")
    else:
        assert type(from_tuple) is type(from_dict), path


@pytest.mark.parametrize("model_class", [PolyGLUModel, PolyGLUForCausalLM, PolyGLUForSequenceClassification])
@pytest.mark.parametrize(
    "extra",
    [{}, {"labels": True}, {"output_hidden_states": True, "output_attentions": True}, {"use_cache": True}],
    ids=["plain", "labels", "hidden-states-attentions", "cache"],
)
def test_tuple_output_equals_to_tuple_of_dict_output(variant, model_class, extra):
    config = tiny_config(**variant_kwargs(variant), attn_implementation="eager")
    torch.manual_seed(0)
    model = randomize_routers(model_class(config)).eval()
    input_ids = random_ids(2, 6)
    kwargs = dict(extra)
    if kwargs.pop("labels", False):
        if model_class is PolyGLUModel:
            pytest.skip("the base model takes no labels")
        kwargs["labels"] = input_ids if model_class is PolyGLUForCausalLM else torch.tensor([0, 1])
    if model_class is PolyGLUForCausalLM:
        kwargs["output_routing_weights"] = True
    with torch.no_grad():
        from_tuple = model(input_ids, return_dict=False, **kwargs)
        from_dict = model(input_ids, return_dict=True, **kwargs).to_tuple()
    assert isinstance(from_tuple, tuple)
    assert_same_structure_and_values(from_tuple, from_dict)


def test_router_parameters_are_created_in_fp32_whatever_the_default_dtype(variant):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # what from_config(dtype=...) and from_pretrained construct under
    try:
        model = PolyGLUForCausalLM(tiny_config(**variant_kwargs(variant)))
    finally:
        torch.set_default_dtype(previous)
    for name, tensor in model.state_dict().items():
        expected = torch.float32 if ".router." in name else torch.float16
        assert tensor.dtype == expected, f"{name} is {tensor.dtype}"


@pytest.mark.parametrize("model_class", [PolyGLUModel, PolyGLUForCausalLM, PolyGLUForSequenceClassification])
def test_keep_in_fp32_modules_strict_names_only_existing_modules(variant, model_class):
    model = model_class(tiny_config(**variant_kwargs(variant)))
    names = list(model.state_dict())
    kept = set(model._keep_in_fp32_modules_strict)
    assert kept == ({"router"} if router_parameters(model) else set())
    for module in kept:
        assert any(re.search(rf"(?:^|\.){module}(?:\.|$)", name) for name in names), module


def test_inputs_embeds_match_input_ids(variant):
    model = build(variant)
    input_ids = random_ids(2, 6)
    embeddings = model.get_input_embeddings()
    assert embeddings is model.model.embed_tokens
    with torch.no_grad():
        from_ids = model(input_ids).logits
        from_embeds = model(inputs_embeds=embeddings(input_ids)).logits
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=0)

    replacement = torch.nn.Embedding(VOCAB_SIZE, model.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement


def test_eval_forward_is_deterministic(variant):
    model = build(variant)
    input_ids = random_ids(2, 6)
    with torch.no_grad():
        first, second = model(input_ids).logits, model(input_ids).logits
    assert torch.isfinite(first).all()
    torch.testing.assert_close(second, first, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_batch_matches_rows_run_alone(variant, padding):
    # sequence-pooled routing is non-causal, but with a padding mask it must still ignore the pads
    model = build(variant)
    lengths = [7, 7, 7] if padding == "none" else [7, 5, 3]
    rows = [random_ids(1, length, seed=10 + i)[0] for i, length in enumerate(lengths)]
    if padding == "none":
        input_ids, attention_mask, position_ids = torch.stack(rows), None, None
    else:
        input_ids, attention_mask = padded_batch(rows, padding)
        position_ids = left_padding_position_ids(attention_mask) if padding == "left" else None
    with torch.no_grad():
        batch_logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            real = slice(None) if attention_mask is None else attention_mask[i].bool()
            torch.testing.assert_close(
                batch_logits[i][real], alone, atol=1e-5, rtol=1e-5, msg=lambda m: f"row {i}: {m}"
            )


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing_kwargs", [None, {"use_reentrant": True}], ids=["default", "reentrant"])
def test_gradient_checkpointing_matches_plain_backward(variant, checkpointing_kwargs):
    input_ids = random_ids(2, 7)
    plain = build(variant, routing_noise="none").train()
    checkpointed = build(variant, routing_noise="none").train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    mlp_calls = []
    checkpointed.model.layers[0].mlp.register_forward_pre_hook(lambda *args: mlp_calls.append(1))

    expected_loss, expected_gradients = loss_and_gradients(plain, input_ids)
    loss, gradients = loss_and_gradients(checkpointed, input_ids)
    assert len(mlp_calls) == 2, "the layer was not recomputed in backward: checkpointing is not active"
    assert relative_error(loss, expected_loss) <= 1e-5
    assert sorted(gradients) == sorted(expected_gradients)
    for name, expected in expected_gradients.items():
        assert relative_error(gradients[name], expected) <= 1e-5, name


def test_training_step_gives_finite_loss_and_gradients(variant):
    model = build(variant).train()
    input_ids = random_ids(2, 7)
    outputs = model(input_ids, labels=input_ids)
    loss = outputs.loss
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    shifted = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, VOCAB_SIZE), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, shifted, atol=1e-6, rtol=1e-6)

    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
    routers = router_parameters(model)
    if has_input_dependent_router(variant):
        assert routers, "an input-dependent mixer without routing parameters"
    for name, parameter in routers.items():
        assert parameter.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("optimizer_class, lr", [(torch.optim.SGD, 0.1), (torch.optim.AdamW, 1e-2)], ids=["sgd", "adamw"])
def test_optimizer_steps_lower_the_loss(variant, optimizer_class, lr):
    model = build(variant)
    input_ids = random_ids(3, 8)
    initial_routers = {name: p.detach().clone() for name, p in router_parameters(model).items()}
    with torch.no_grad():
        initial_loss = model(input_ids, labels=input_ids).loss.item()

    optimizer = optimizer_class(model.parameters(), lr=lr)
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final_loss = model(input_ids, labels=input_ids).loss.item()

    assert final_loss < initial_loss - 0.01, f"loss {initial_loss} -> {final_loss}"
    if optimizer_class is torch.optim.AdamW:
        # AdamW's step size does not depend on the gradient's scale; SGD steps on a saturated router (Dynamic GEGLU's
        # sigmoid after randomize_routers: gradients ~1e-9) fall below float32 resolution
        for name, parameter in router_parameters(model).items():
            assert not torch.equal(parameter, initial_routers[name]), f"{name} was not updated"


# ----------------------------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------------------------


def test_lm_head_is_tied_to_input_embeddings(variant, tmp_path):
    model = build(variant)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    reloaded = PolyGLUForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("new_size", [VOCAB_SIZE + 24, VOCAB_SIZE - 28], ids=["bigger", "smaller"])
def test_resize_token_embeddings_keeps_tied_head(variant, new_size):
    model = build(variant)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()

    model.resize_token_embeddings(new_size)
    embeddings = model.get_input_embeddings().weight
    assert model.config.vocab_size == new_size
    assert embeddings.shape == (new_size, model.config.hidden_size)
    assert model.lm_head.weight is embeddings
    kept = min(new_size, VOCAB_SIZE)
    torch.testing.assert_close(embeddings[:kept].detach(), old_embeddings[:kept], atol=0, rtol=0)
    input_ids = random_ids(2, 6, high=new_size)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 6, new_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("new_size", [VOCAB_SIZE + 24, VOCAB_SIZE - 28], ids=["bigger", "smaller"])
def test_resize_token_embeddings_keeps_untied_head_separate(variant, new_size):
    model = build(variant, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    old_head = model.lm_head.weight.detach().clone()
    old_embeddings = model.model.embed_tokens.weight.detach().clone()

    model.resize_token_embeddings(new_size)
    head, embeddings = model.lm_head.weight, model.model.embed_tokens.weight
    assert head.shape == embeddings.shape == (new_size, model.config.hidden_size)
    assert head is not embeddings and head.data_ptr() != embeddings.data_ptr()
    kept = min(new_size, VOCAB_SIZE)
    torch.testing.assert_close(head[:kept].detach(), old_head[:kept], atol=0, rtol=0)
    torch.testing.assert_close(embeddings[:kept].detach(), old_embeddings[:kept], atol=0, rtol=0)
    input_ids = random_ids(2, 6, high=new_size)
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (2, 6, new_size) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------------------
# heads and Auto classes
# ----------------------------------------------------------------------------------------------------------------


def test_sequence_classification_head(variant):
    torch.manual_seed(0)
    config = tiny_config(**variant_kwargs(variant, num_labels=3, pad_token_id=PAD_TOKEN_ID))
    model = randomize_routers(PolyGLUForSequenceClassification(config)).eval()
    rows = [random_ids(1, length, seed=20 + i)[0] for i, length in enumerate([7, 4, 6])]
    input_ids, attention_mask = padded_batch(rows, "right")
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask, labels=labels)
        alone = model(rows[1][None]).logits[0]
    assert outputs.logits.shape == (3, 3)
    assert torch.isfinite(outputs.loss)
    torch.testing.assert_close(outputs.loss, F.cross_entropy(outputs.logits, labels), atol=1e-6, rtol=1e-6)
    # the padded row is classified from its last real token
    torch.testing.assert_close(outputs.logits[1], alone, atol=1e-5, rtol=1e-5)


def test_auto_classes_resolve_to_polyglu(variant, tmp_path):
    kwargs = variant_kwargs(variant)
    assert type(AutoConfig.for_model("polyglu", **kwargs)) is PolyGLUConfig
    tiny_config(**kwargs).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is PolyGLUConfig and config.ffn_type == kwargs["ffn_type"]

    for auto_class, expected_class in [
        (AutoModel, PolyGLUModel),
        (AutoModelForCausalLM, PolyGLUForCausalLM),
        (AutoModelForSequenceClassification, PolyGLUForSequenceClassification),
    ]:
        model = auto_class.from_config(config)
        assert type(model) is expected_class, auto_class.__name__
        assert model.base_model.layers[0].mlp.ffn_type == kwargs["ffn_type"]
