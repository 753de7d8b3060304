"""The routing probe's statistics against a direct computation from the routing weights the model returns."""

import math

import pytest
import torch
import torch.nn.functional as F

from modeling_polyglu.activation_mixing import mixing_weights
from modeling_polyglu.training.routing_stats import RoutingProbe, _LayerSums, concatenate_snapshot, probe_batches

from ..utils import tiny_model


def naive_softmax_statistics(weights: torch.Tensor, real: torch.Tensor) -> dict:
    """Entropy / ln K, argmax and mean usage of [B, T, F, K] weights over the real tokens, one decision at a time."""
    selected = weights[real.bool()].double()  # [N, F, K]
    k = selected.shape[-1]
    entropy = -(selected * torch.log(torch.where(selected > 0, selected, torch.ones_like(selected)))).sum(-1)
    choices = selected.argmax(-1)
    return {
        "entropy": float(entropy.mean()) / math.log(k),
        "usage_argmax": [float((choices == index).double().mean()) for index in range(k)],
        "usage_mean": [float(selected[..., index].mean()) for index in range(k)],
    }


def test_mixing_weights_are_the_softmax_of_the_logits_along_the_activations():
    generator = torch.Generator().manual_seed(3)
    static = torch.randn(1, 1, 37, 4, generator=generator)
    token = torch.randn(2, 5, 1, 4, generator=generator) * 3
    for tau in (1.0, 0.3):
        weights = mixing_weights(static, token, tau=tau)
        assert weights.shape == (2, 5, 37, 4) and weights.is_contiguous()
        torch.testing.assert_close(weights, torch.softmax((static + token) / tau, dim=-1), rtol=0, atol=1e-6)
    hard = mixing_weights(static, token, hard=True)
    torch.testing.assert_close(hard, F.one_hot((static + token).argmax(-1), 4).float(), rtol=0, atol=0)
    torch.testing.assert_close(mixing_weights(None, token[:, :, 0]), torch.softmax(token[:, :, 0], -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ffn_type", ["polyglu", "moa"])
def test_probe_statistics_match_a_direct_computation(ffn_type):
    torch.manual_seed(0)
    model = tiny_model(ffn_type=ffn_type).eval()
    for layer in model.model.layers:  # routers away from their init so usage and entropy differ across activations
        for parameter in layer.mlp.router.parameters():
            parameter.data.normal_(0.0, 1.0)
    generator = torch.Generator().manual_seed(1)
    token_lists = [torch.randint(3, model.config.vocab_size, (length,), generator=generator).tolist() for length in (9, 4, 7)]
    batches = probe_batches(token_lists, batch_size=2, pad_token_id=0)
    metrics, snapshot = RoutingProbe(max_neurons=8).measure(model, batches)

    per_layer = []
    for batch in batches:
        with torch.no_grad():
            outputs = model(**batch, output_routing_weights=True, use_cache=False)
        for index, weights in enumerate(outputs.routing_weights):
            if weights.dim() == 3:
                weights = weights.unsqueeze(2)  # one decision per token
            if len(per_layer) <= index:
                per_layer.append([])
            per_layer[index].append(weights[batch["attention_mask"].bool()])
    activations = model.model.layers[0].mlp.activations
    entropies = []
    for index, pieces in enumerate(per_layer):
        selected = torch.cat(pieces)  # [N, F or 1, K] over all real tokens of all batches
        expected = naive_softmax_statistics(selected.unsqueeze(0), torch.ones(1, selected.shape[0]))
        prefix = f"routing/layer_{index}"
        assert metrics[f"{prefix}/entropy"] == pytest.approx(expected["entropy"], rel=1e-5)
        for k, name in enumerate(activations):
            assert metrics[f"{prefix}/usage_argmax/{name}"] == pytest.approx(expected["usage_argmax"][k], abs=1e-12)
            assert metrics[f"{prefix}/usage_mean/{name}"] == pytest.approx(expected["usage_mean"][k], rel=1e-5)
        assert metrics[f"{prefix}/nonfinite"] == 0.0
        entropies.append(expected["entropy"])
    assert 0.05 < metrics["routing/entropy"] < 0.95, "routing too uniform or too peaked to test the statistics"
    assert metrics["routing/entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)

    # against its own snapshot nothing has changed; with the routers moved, the flips are the changed argmax choices
    unchanged, _ = RoutingProbe(max_neurons=8).measure(model, batches, concatenate_snapshot(snapshot))
    assert unchanged["routing/flip_rate"] == 0.0 and unchanged["routing/kl_from_initial"] == pytest.approx(0.0, abs=1e-6)
    for layer in model.model.layers:
        for parameter in layer.mlp.router.parameters():
            parameter.data.add_(torch.randn_like(parameter))
    moved, _ = RoutingProbe(max_neurons=8).measure(model, batches, concatenate_snapshot(snapshot))
    assert 0.0 < moved["routing/flip_rate"] < 1.0 and moved["routing/kl_from_initial"] > 1e-3


def test_nonfinite_routing_weights_are_counted_and_zeroed():
    probe = RoutingProbe(max_neurons=4)
    probabilities = torch.full((3, 5, 2), 0.5)
    probabilities[0, 1] = float("nan")  # 2 NaNs
    probabilities[2, 4, 0] = float("inf")  # 1 inf
    sums = _LayerSums(2)
    probe._softmax_layer(0, probabilities, sums, None, {}, 0)
    assert float(sums.values["nonfinite"]) == 3.0
    assert math.isfinite(float(sums.values["entropy"])) and math.isfinite(float(sums.values["usage_mean"].sum()))
    clean = _LayerSums(2)
    probe._softmax_layer(0, torch.full((3, 5, 2), 0.5), clean, None, {}, 0)
    assert float(clean.values["nonfinite"]) == 0.0
    assert float(clean.values["entropy"]) == pytest.approx(15 * math.log(2), rel=1e-6)


def test_probe_computes_only_the_last_position_of_the_head():
    model = tiny_model(ffn_type="polyglu").eval()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    try:
        RoutingProbe().measure(model, probe_batches([[5, 6, 7, 8, 9]], 8, 0))
    finally:
        hook.remove()
    assert seen == [1]
