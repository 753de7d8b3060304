"""Routing semantics: pooling (causal, sequence, token), noise, hard routing, inspection, τ and configuration.

Models are tiny (tests/utils.py) with router parameters moved far from init, run in eval mode and fp32 unless a
test is about training mode. Independent oracles re-implement the reference formula (REFERENCE.md (c)) with
plain torch ops.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import modeling_polyglu.modeling_polyglu as modeling
from modeling_polyglu import PolyGLUConfig, PolyGLUForCausalLM
from modeling_polyglu.modeling_polyglu import RoutingContext

from .utils import ALL_VARIANTS, tiny_config, tiny_model, variant_id

PAD = 0
FIXED_FFN_TYPES = ("swiglu", "geglu", "reglu", "glu", "bilinear", "mlp_relu", "mlp_gelu")
SOFTMAX_FFN_TYPES = ("polyglu", "moa", "dualglu")
REFERENCE_ACTIVATIONS = (
    torch.relu,
    torch.tanh,
    F.silu,
    lambda x: F.gelu(x, approximate="none"),
)
SILU_INDEX = 2  # in the default dictionary relu, tanh, silu, gelu


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, tiny_config().vocab_size, (batch, length), generator=generator)


def random_hidden(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, tiny_config().hidden_size, generator=generator)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() derives from a 2-D mask."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def logits_of(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False, **kwargs).logits


def routing_weights_of(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, use_cache=False, output_routing_weights=True, **kwargs).routing_weights


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def padded_batch(real_length: int, total_length: int, side: str, seed: int = 0):
    """Row 0: `real_length` tokens padded to `total_length` on `side`; row 1: a full row. Returns the batch,
    its mask and row 0's real tokens alone."""
    alone = random_ids(1, real_length, seed)
    full_row = random_ids(1, total_length, seed + 1)
    pads = torch.full((1, total_length - real_length), PAD)
    row = torch.cat([pads, alone], dim=1) if side == "left" else torch.cat([alone, pads], dim=1)
    input_ids = torch.cat([row, full_row])
    attention_mask = (torch.arange(total_length) >= total_length - real_length).long()
    if side == "right":
        attention_mask = attention_mask.flip(0)
    attention_mask = torch.stack([attention_mask, torch.ones(total_length, dtype=torch.long)])
    return input_ids, attention_mask, alone


def padded_row_difference(model, side: str) -> float:
    input_ids, attention_mask, alone = padded_batch(7, 11, side, seed=3)
    positions = positions_from_mask(attention_mask)
    batch_logits = logits_of(model, input_ids, attention_mask=attention_mask, position_ids=positions)
    alone_logits = logits_of(model, alone)
    return max_abs(batch_logits[0][attention_mask[0].bool()], alone_logits[0])


def packed_documents(seed: int = 0):
    """Two rows of 12 tokens, each two documents, position ids restarting at every document."""
    lengths = [(5, 7), (8, 4)]
    documents = [
        [random_ids(1, n, seed + 10 * row + i) for i, n in enumerate(pair)] for row, pair in enumerate(lengths)
    ]
    input_ids = torch.cat([torch.cat(row, dim=1) for row in documents])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in pair]) for pair in lengths])
    return input_ids, position_ids, documents


def packed_difference(model) -> float:
    input_ids, position_ids, documents = packed_documents()
    packed = logits_of(model, input_ids, position_ids=position_ids, attention_mask=None)
    worst = 0.0
    for row, row_documents in enumerate(documents):
        start = 0
        for document in row_documents:
            end = start + document.shape[1]
            worst = max(worst, max_abs(packed[row, start:end], logits_of(model, document)[0]))
            start = end
    return worst


def ignore_padding_in_pooling(monkeypatch):
    """Make the routers pool over padding too: the failure the padding tests must detect."""
    causal_mean, document_mean = modeling.causal_document_mean, modeling.document_mean
    monkeypatch.setattr(modeling, "causal_document_mean", lambda values, mask, *rest: causal_mean(values, None, *rest))
    monkeypatch.setattr(modeling, "document_mean", lambda values, mask, *rest: document_mean(values, None, *rest))


def reference_pooled(hidden: torch.Tensor, pooling: str, token_mask=None) -> torch.Tensor:
    """What the router sees, [B, T, D] or [B, 1, D] (sequence: one vector per row, as in the reference)."""
    weights = torch.ones(hidden.shape[:2]) if token_mask is None else token_mask.float()
    weighted = hidden * weights[..., None]
    if pooling == "token":
        return hidden
    if pooling == "sequence":
        return (weighted.sum(1) / weights.sum(1, keepdim=True))[:, None]
    counts = weights.cumsum(1).clamp(min=1.0)
    return weighted.cumsum(1) / counts[..., None]


def reference_logits(mlp, pooled: torch.Tensor) -> torch.Tensor:
    """ℓ = α + β · f(pooled), f = proj_in → ReLU → proj_out, broadcast to [B, T or 1, F, K]."""
    router = mlp.router
    hidden = torch.relu(F.linear(pooled, router.proj_in.weight, router.proj_in.bias))
    dynamic = F.linear(hidden, router.proj_out.weight, router.proj_out.bias)
    return router.alpha[None, None] + (router.beta * dynamic)[:, :, None, :]


def reference_mlp(mlp, hidden: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
    """down(Σ_k w_k act_k(gate x) ⊙ up x) with the reference's activation order."""
    gate = F.linear(hidden, mlp.gate_proj.weight)
    up = F.linear(hidden, mlp.up_proj.weight)
    activations = torch.stack([activation(gate) for activation in REFERENCE_ACTIVATIONS], dim=-1)
    return F.linear((routing * activations).sum(-1) * up, mlp.down_proj.weight)


def unit_scale_projections(mlp, seed: int = 0):
    """Redraw gate/up/down at O(1/sqrt(fan_in)) so the mlp output is O(1) and tolerances mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            if hasattr(mlp, name):
                weight = getattr(mlp, name).weight
                weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
    return mlp


def run_mlp(mlp, hidden, **kwargs):
    with torch.no_grad():
        return mlp(hidden, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# causal pooling: causality, padding, packing (with the sequence-pooling and broken-pooling controls)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["causal", "token"])
def test_appending_tokens_keeps_earlier_logits(pooling):
    model = tiny_model(routing_pooling=pooling)
    input_ids = random_ids(2, 12)
    difference = max_abs(logits_of(model, input_ids)[:, :7], logits_of(model, input_ids[:, :7]))
    print(f"\n[routing] {pooling} pooling, append 5 tokens: max|Δ earlier logits| = {difference:.3e}")
    assert difference <= 1e-5


def test_sequence_pooling_appending_tokens_changes_earlier_logits():
    model = tiny_model(routing_pooling="sequence")
    input_ids = random_ids(2, 12)
    difference = max_abs(logits_of(model, input_ids)[:, :7], logits_of(model, input_ids[:, :7]))
    print(f"\n[routing] sequence pooling, append 5 tokens: max|Δ earlier logits| = {difference:.3e}")
    assert difference > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["causal", "sequence", "token"])
def test_padded_row_matches_row_alone(pooling, side):
    model = tiny_model(routing_pooling=pooling)
    difference = padded_row_difference(model, side)
    print(f"\n[routing] {pooling} pooling, {side} padding: max|Δlogit| vs row alone = {difference:.3e}")
    assert difference <= 1e-5


@pytest.mark.parametrize(("pooling", "side"), [("causal", "left"), ("sequence", "left"), ("sequence", "right")])
def test_padding_tests_detect_pooled_padding(pooling, side, monkeypatch):
    model = tiny_model(routing_pooling=pooling)
    ignore_padding_in_pooling(monkeypatch)
    assert padded_row_difference(model, side) > 1e-3


@pytest.mark.parametrize("pooling", ["causal", "sequence", "token"])
def test_packed_documents_match_documents_alone(pooling):
    model = tiny_model(routing_pooling=pooling)
    difference = packed_difference(model)
    print(f"\n[routing] {pooling} pooling, packed rows: max|Δlogit| vs documents alone = {difference:.3e}")
    assert difference <= 1e-4


@pytest.mark.parametrize("pooling", ["causal", "sequence"])
def test_packing_test_detects_pooling_across_documents(pooling, monkeypatch):
    model = tiny_model(routing_pooling=pooling)
    monkeypatch.setattr(modeling, "document_starts_from_position_ids", lambda position_ids: None)
    assert packed_difference(model) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# the mlp against an independent re-implementation of the reference formula
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("pooling", ["sequence", "token", "causal"])
def test_polyglu_mlp_matches_reference_formula(pooling, layer):
    tau = 1.7
    model = tiny_model(routing_pooling=pooling, routing_tau=tau)
    mlp = unit_scale_projections(model.model.layers[layer].mlp)
    hidden = random_hidden(3, 6, seed=layer)
    output, weights = run_mlp(mlp, hidden, output_routing_weights=True)
    with torch.no_grad():
        expected_weights = torch.softmax(reference_logits(mlp, reference_pooled(hidden, pooling)) / tau, dim=-1)
        expected = reference_mlp(mlp, hidden, expected_weights)
    mixed_fraction = (expected_weights.max(-1).values < 0.9).float().mean()
    assert mixed_fraction > 0.2, "routing is nearly one-hot; the mixture would be barely tested"
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights.expand_as(weights), rtol=0, atol=1e-6)


def test_sequence_pooling_excludes_padding_given_a_mask():
    mlp = unit_scale_projections(tiny_model(routing_pooling="sequence").model.layers[0].mlp)
    hidden = random_hidden(2, 7, seed=4)
    token_mask = torch.ones(2, 7)
    token_mask[0, :3] = 0
    token_mask[1, 5:] = 0
    masked = run_mlp(mlp, hidden, routing_context=RoutingContext(token_mask=token_mask))
    with torch.no_grad():
        routing = torch.softmax(reference_logits(mlp, reference_pooled(hidden, "sequence", token_mask)), dim=-1)
        expected = reference_mlp(mlp, hidden, routing)
    real = token_mask.bool()
    torch.testing.assert_close(masked[real], expected[real], rtol=0, atol=1e-5)
    assert max_abs(masked[real], run_mlp(mlp, hidden)[real]) > 1e-3


def test_token_pooling_routes_each_token_on_its_own_input():
    mlp = unit_scale_projections(tiny_model(routing_pooling="token").model.layers[1].mlp)
    hidden = random_hidden(2, 6, seed=5)
    together = run_mlp(mlp, hidden)
    one_at_a_time = torch.cat([run_mlp(mlp, hidden[:, t : t + 1]) for t in range(hidden.shape[1])], dim=1)
    torch.testing.assert_close(together, one_at_a_time, rtol=0, atol=1e-6)
    # the same oracle tells causal pooling apart
    causal_mlp = unit_scale_projections(tiny_model(routing_pooling="causal").model.layers[1].mlp)
    causal_alone = torch.cat([run_mlp(causal_mlp, hidden[:, t : t + 1]) for t in range(hidden.shape[1])], dim=1)
    assert max_abs(run_mlp(causal_mlp, hidden), causal_alone) > 1e-3


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_mlp_alone_equals_the_mlp_inside_the_model(variant):
    ffn_type, options = variant
    model = tiny_model(ffn_type=ffn_type, **options)
    unit_scale_projections(model.model.layers[1].mlp)
    captured = {}

    def capture(module, args, output):
        captured["input"], captured["output"] = args[0], output

    handle = model.model.layers[1].mlp.register_forward_hook(capture)
    logits_of(model, random_ids(2, 8, seed=6))
    handle.remove()
    alone = run_mlp(model.model.layers[1].mlp, captured["input"])
    assert alone.shape == captured["input"].shape
    torch.testing.assert_close(alone, captured["output"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# determinism and Gumbel noise
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_eval_mode_is_deterministic(variant):
    ffn_type, options = variant
    model = tiny_model(ffn_type=ffn_type, **options)
    input_ids = random_ids(2, 8, seed=7)
    assert torch.equal(logits_of(model, input_ids), logits_of(model, input_ids))


def test_training_mode_gumbel_noise_changes_outputs():
    model = tiny_model(routing_noise="gumbel").train()
    input_ids = random_ids(2, 8, seed=8)
    assert max_abs(logits_of(model, input_ids), logits_of(model, input_ids)) > 1e-4


def test_training_mode_without_noise_is_deterministic():
    model = tiny_model(routing_noise="none").train()
    input_ids = random_ids(2, 8, seed=8)
    first = logits_of(model, input_ids)
    assert torch.equal(first, logits_of(model, input_ids))
    assert torch.equal(first, logits_of(model.eval(), input_ids))


def test_gumbel_noise_is_shared_over_tokens_and_drawn_per_sequence():
    model = tiny_model(routing_pooling="token", routing_noise="gumbel").train()
    # identical tokens give identical router inputs at every position, so only the noise can vary
    input_ids = torch.full((2, 8), 17)
    for weights in routing_weights_of(model, input_ids):
        torch.testing.assert_close(weights, weights[:, :1].expand_as(weights), rtol=0, atol=1e-5)
        assert max_abs(weights[0], weights[1]) > 1e-2


def test_recovered_gumbel_noise_is_constant_over_tokens_with_logistic_spread():
    tau = 0.8
    mlp = tiny_model(routing_pooling="token", routing_noise="gumbel", routing_tau=tau).model.layers[0].mlp.train()
    hidden = random_hidden(3, 6, seed=9)
    torch.manual_seed(0)
    _, weights = run_mlp(mlp, hidden, output_routing_weights=True)
    with torch.no_grad():
        clean = reference_logits(mlp, hidden)  # [B, T, F, K]
    # softmax is shift invariant: τ·log w_k − ℓ_k equals G_k up to a per-(token, neuron) constant
    recovered = tau * torch.log(weights.double()) - clean.double()
    noise_differences = recovered[..., 1:] - recovered[..., :1]  # G_k − G_0: Logistic(0, 1), var π²/3
    first_token = noise_differences[:, :1].expand_as(noise_differences)
    torch.testing.assert_close(noise_differences, first_token, rtol=0, atol=1e-4)
    per_sequence = noise_differences[:, 0]
    assert max_abs(per_sequence[0], per_sequence[1]) > 1.0
    assert 1.5 < per_sequence.std().item() < 2.2
    assert abs(per_sequence.mean().item()) < 0.5


def noisy_logits(model, input_ids, seed: int) -> torch.Tensor:
    """Training-mode logits with the global RNG at `seed`, as data-parallel ranks seeded alike start a step."""
    torch.manual_seed(seed)
    return logits_of(model, input_ids)


def test_data_parallel_replicas_draw_their_rows_of_one_noise_draw():
    model = tiny_model(routing_noise="gumbel").train()
    input_ids = random_ids(4, 8, seed=10)
    whole_batch = noisy_logits(model, input_ids, seed=3)
    for replica in range(2):
        model.set_routing_noise_replica(replica, 2)
        rows = slice(2 * replica, 2 * replica + 2)
        torch.testing.assert_close(noisy_logits(model, input_ids[rows], seed=3), whole_batch[rows], rtol=0, atol=1e-5)
    # the control: a rank not told its replica draws the first rows' noise for its own rows
    model.set_routing_noise_replica(0, 1)
    assert max_abs(noisy_logits(model, input_ids[2:], seed=3), whole_batch[2:]) > 1e-3
    # eval mode draws no noise, whatever the replica
    model.set_routing_noise_replica(1, 2)
    torch.testing.assert_close(logits_of(model.eval(), input_ids[2:]), logits_of(model, input_ids)[2:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("index, count", [(2, 2), (-1, 2), (0, 0), (1.0, 2)])
def test_an_impossible_noise_replica_is_refused(index, count):
    with pytest.raises(ValueError, match="0 <= index < count"):
        tiny_model().set_routing_noise_replica(index, count)


# ---------------------------------------------------------------------------------------------------------------
# hard routing, routing-weight inspection, τ
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn_type", SOFTMAX_FFN_TYPES)
def test_hard_routing_weights_are_one_hot_in_eval(ffn_type):
    model = tiny_model(ffn_type=ffn_type, routing_hard=True)
    for weights in routing_weights_of(model, random_ids(2, 8, seed=10)):
        assert torch.all((weights == 0) | (weights == 1))
        assert torch.all(weights.sum(-1) == 1)


def test_hard_routing_applies_the_argmax_activation_per_token_and_neuron():
    mlp = unit_scale_projections(tiny_model(routing_hard=True).model.layers[1].mlp)
    hidden = random_hidden(2, 6, seed=11)
    output, weights = run_mlp(mlp, hidden, output_routing_weights=True)
    with torch.no_grad():
        choice = reference_logits(mlp, reference_pooled(hidden, "causal")).argmax(-1)  # [B, T, F]
        gate = F.linear(hidden, mlp.gate_proj.weight)
        chosen = torch.zeros_like(gate)
        for k, activation in enumerate(REFERENCE_ACTIVATIONS):
            chosen = torch.where(choice == k, activation(gate), chosen)
        expected = F.linear(chosen * F.linear(hidden, mlp.up_proj.weight), mlp.down_proj.weight)
    assert choice.unique().numel() > 1, "a single winning activation would not test per-neuron selection"
    torch.testing.assert_close(weights, F.one_hot(choice, 4).float(), rtol=0, atol=0)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
def test_output_routing_weights_per_layer(variant):
    ffn_type, options = variant
    model = tiny_model(ffn_type=ffn_type, **options)
    batch, length = 2, 8
    input_ids = random_ids(batch, length, seed=12)
    with torch.no_grad():
        assert model(input_ids, use_cache=False).routing_weights is None
    all_weights = routing_weights_of(model, input_ids)
    assert len(all_weights) == model.config.num_hidden_layers
    num_activations = 2 if ffn_type == "dualglu" else len(model.config.activations)
    for weights in all_weights:
        if ffn_type in FIXED_FFN_TYPES:
            assert weights is None
            continue
        assert weights is not None
        if ffn_type == "polyglu":
            assert weights.shape == (batch, length, model.config.intermediate_size, num_activations)
        elif ffn_type in ("moa", "dualglu", "la"):
            assert weights.shape == (batch, length, num_activations)
        if ffn_type in SOFTMAX_FFN_TYPES:
            assert torch.all(weights >= 0)
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), rtol=0, atol=1e-5)


def test_set_routing_tau_changes_outputs_and_is_saved(tmp_path):
    model = tiny_model()
    input_ids = random_ids(2, 8, seed=13)
    before = logits_of(model, input_ids)
    model.set_routing_tau(0.1)
    assert model.config.routing_tau == 0.1
    after = logits_of(model, input_ids)
    assert max_abs(before, after) > 1e-3
    for invalid in (0, -1):
        with pytest.raises(ValueError, match="tau"):
            model.set_routing_tau(invalid)
    assert model.config.routing_tau == 0.1
    model.save_pretrained(tmp_path)
    assert PolyGLUConfig.from_pretrained(tmp_path).routing_tau == 0.1
    reloaded = PolyGLUForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(reloaded, input_ids), after, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected_in_message"),
    [
        ({"ffn_type": "swishglu"}, ["'swiglu'", "'polyglu'", "'moa'"]),
        ({"ffn_types": ["swiglu"]}, ["ffn_types", "num_hidden_layers"]),
        ({"ffn_types": ["swiglu", "polyglue"]}, ["'polyglu'", "'la'"]),
        ({"activations": ["relu", "softplus"]}, ["'relu'", "'tanh'", "'gelu_tanh'"]),
        ({"routing_pooling": "mean"}, ["'causal'", "'sequence'", "'token'"]),
        ({"dualglu_mixing": "adaptive"}, ["'dynamic'", "'learned_static'", "'static_equal'"]),
    ],
    ids=["ffn_type", "ffn_types-length", "ffn_types-entry", "activation", "routing_pooling", "dualglu_mixing"],
)
def test_config_rejects_invalid_values(overrides, expected_in_message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for fragment in expected_in_message:
        assert fragment in str(error.value)


def test_per_layer_ffn_types():
    model = tiny_model(ffn_types=["swiglu", "polyglu"])
    first, second = (unit_scale_projections(layer.mlp) for layer in model.model.layers)
    assert (first.ffn_type, second.ffn_type) == ("swiglu", "polyglu")
    router_layers = {name.split(".")[2] for name, _ in model.named_parameters() if ".router." in name}
    assert router_layers == {"1"}
    hidden = random_hidden(2, 5, seed=14)
    gated = F.silu(F.linear(hidden, first.gate_proj.weight)) * F.linear(hidden, first.up_proj.weight)
    swiglu = F.linear(gated, first.down_proj.weight)
    torch.testing.assert_close(run_mlp(first, hidden), swiglu, rtol=0, atol=1e-6)
    first_weights, second_weights = routing_weights_of(model, random_ids(2, 5, seed=15))
    assert first_weights is None and second_weights.shape[-2:] == (model.config.intermediate_size, 4)


# ---------------------------------------------------------------------------------------------------------------
# router initialisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn_type", SOFTMAX_FFN_TYPES)
def test_router_init_activation_prefers_silu(ffn_type):
    model = tiny_model(ffn_type=ffn_type, randomize=False, router_init_activation="silu", router_init_strength=12.0)
    silu_index = 0 if ffn_type == "dualglu" else SILU_INDEX
    for weights in routing_weights_of(model, random_ids(3, 8, seed=16)):
        assert weights[..., silu_index].min() > 0.99


def test_router_init_activation_makes_la_coefficients_one_hot():
    model = tiny_model(ffn_type="la", randomize=False, router_init_activation="silu")
    for layer in model.model.layers:
        silu_only = F.one_hot(torch.tensor(SILU_INDEX), 4).float()
        torch.testing.assert_close(layer.mlp.router.weights.detach(), silu_only, rtol=0, atol=0)


def test_fresh_polyglu_router_starts_unbiased():
    model = tiny_model(randomize=False)
    for layer in model.model.layers:
        router = layer.mlp.router
        assert torch.equal(router.alpha, torch.zeros(model.config.intermediate_size, 4))
        assert torch.equal(router.beta, torch.ones(4))


# ---------------------------------------------------------------------------------------------------------------
# sequence pooling and the cache
# ---------------------------------------------------------------------------------------------------------------


def test_sequence_pooling_config_disables_cache():
    config = tiny_config(routing_pooling="sequence")
    assert config.use_cache is False
    assert tiny_config(routing_pooling="causal").use_cache is True
    assert PolyGLUForCausalLM(config).generation_config.use_cache is False


def test_sequence_pooling_refuses_a_non_empty_cache():
    model = tiny_model(routing_pooling="sequence")
    input_ids = random_ids(1, 6, seed=17)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="sequence"):
        with torch.no_grad():
            model(input_ids[:, -1:], cache=cache, use_cache=True)


def test_sequence_pooling_generates_by_recomputing():
    model = tiny_model(routing_pooling="sequence")
    input_ids, attention_mask, _ = padded_batch(5, 8, "left", seed=18)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    generated = model.generate(input_ids, attention_mask=attention_mask, **settings)
    without_cache = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **settings)
    assert torch.equal(generated, without_cache)
    # greedy decoding by full recomputation, written out
    tokens, mask = input_ids, attention_mask
    for _ in range(6):
        logits = logits_of(model, tokens, attention_mask=mask, position_ids=positions_from_mask(mask))
        next_token = logits[:, -1].argmax(-1)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, tokens)


# ---------------------------------------------------------------------------------------------------------------
# memory: fp32 routers of a bf16 model keep no fp32 copy of the FFN input for backward
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16+fp32-under-autocast"])
def test_router_linear_has_the_value_and_gradients_of_the_plain_expression(autocast):
    """router_linear keeps the bf16 input instead of its fp32 copy; output and every gradient are unchanged."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=generator).to(torch.bfloat16)
    weight = torch.randn(5, 24, generator=generator)
    bias = torch.randn(5, generator=generator)
    results = []
    for function in (modeling.router_linear, lambda x, w, b: F.linear(x.float(), w, b)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = function(*leaves)
        output.backward(torch.linspace(-1, 1, output.numel()).view_as(output).to(output.dtype))
        results.append([output.detach(), *(leaf.grad for leaf in leaves)])
    for ours, plain in zip(*results):  # the same products in the same dtypes: equal to the bit (seen on CPU)
        assert ours.dtype == plain.dtype and torch.equal(ours, plain)


@pytest.mark.parametrize("ffn_type", SOFTMAX_FFN_TYPES)
def test_bf16_routed_ffns_keep_no_fp32_copy_of_their_input(ffn_type):
    """What autograd keeps for backward beyond swiglu's is far less than one fp32 copy of the [B, T, d] input (the
    routers are fp32; they keep the bf16 input the projections keep)."""
    from modeling_polyglu.benchmarks.harness import saved_tensor_bytes
    from modeling_polyglu.benchmarks.models import project_mlp

    batch, length, hidden, intermediate = 2, 16, 512, 256
    x = torch.randn(batch, length, hidden).to(torch.bfloat16).requires_grad_()
    saved = {}
    for name in ("swiglu", ffn_type):
        mlp = project_mlp(hidden, intermediate, name, torch.Generator().manual_seed(0)).to(torch.bfloat16).train()
        if hasattr(mlp, "router"):
            mlp.router.float()
        saved[name] = saved_tensor_bytes(lambda: mlp(x), exclude=list(mlp.parameters()))
    fp32_copy = batch * length * hidden * 4
    assert saved[ffn_type] - saved["swiglu"] < fp32_copy / 2, (saved, fp32_copy)
