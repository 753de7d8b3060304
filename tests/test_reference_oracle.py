"""Self-tests of the reference oracle (tests/reference_polychromatic.py) against facts stated in REFERENCE.md.

The real reference code is not available, so these check what can be checked without it: the state-dict layout and
parameter counts of (a), the non-causal pooling flaw F1/F2, noise-free vs Gumbel routing of (c), the RoPE tables of (b),
and agreement of the oracle with alternate formulations of its blocks, plus the checkpoint writers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from . import reference_polychromatic as ref
from .reference_polychromatic import make_reference_state_dict, reference_logits, write_reference_checkpoint

TAU = 0.1


def _ids(batch=2, length=24, vocab=64, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _layer(state_dict, i=0):
    return {suffix: state_dict[f"model_core.{i}.{suffix}"] for suffix in ref.LAYER_KEYS}


# ------------------------------------------------------------------------------------------------ (a) layout and counts


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_key_count_is_5_plus_17_layers(layers):
    state_dict = make_reference_state_dict(layers=layers)
    assert len(state_dict) == 5 + 17 * layers
    assert state_dict["output_head.weight"] is state_dict["embeddings.weight"]
    assert ref.infer_dims(state_dict) == {
        "vocab_size": 64, "hidden": 32, "d_ff": 48, "num_activations": 4, "layers": layers, "heads": 4,
        "kv_heads": 2, "head_dim": 8, "seq_len": 64, "gate_width": 32,
    }


def test_released_model_parameter_counts():
    shapes = ref.reference_shapes(151669, 1024, 4096, 28, 16, 8, 4096)
    assert len(shapes) == 481
    count = lambda keys: sum(math.prod(shapes[key]) for key in keys)  # noqa: E731
    unique = [key for key in shapes if not key.startswith("rope.") and key != "output_head.weight"]
    assert count(unique) == 597_153_888
    assert count(["embeddings.weight"]) == 155_309_056
    assert count([key for key in shapes if key.startswith("model_core.0.")]) == 15_780_136
    assert count([key for key in shapes if any(part in key for part in ("alpha", "beta", "gate_net"))]) == 1_380_960


def test_reference_init_without_routing_perturbation():
    state_dict = make_reference_state_dict(layers=2, nontrivial_routing=False)
    layer = _layer(state_dict, 1)
    assert torch.equal(layer["polyglu.alpha"], torch.zeros(48, 4))
    assert torch.equal(layer["polyglu.beta"], torch.ones(4))
    assert torch.equal(layer["polyglu.gate_net.0.bias"], torch.zeros(32))
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in state_dict.items() if k.endswith(".gama"))
    assert layer["gqa.W_q.weight"].std().item() == pytest.approx(0.02, rel=0.2)
    assert layer["polyglu.gate_net.0.weight"].std().item() == pytest.approx(0.02, rel=0.2)
    assert layer["polyglu.W_down.weight"].std().item() == pytest.approx(0.02 / 2, rel=0.2)  # x 1/sqrt(2L)


# ------------------------------------------------------------------------------------------------ (c) pooling flaws F1/F2


def test_appending_tokens_changes_earlier_logits():
    state_dict = make_reference_state_dict()
    ids = _ids(length=48)
    prefix = reference_logits(state_dict, ids[:, :16], TAU)
    full = reference_logits(state_dict, ids, TAU)
    assert (full[:, :16] - prefix).abs().max().item() > 1e-3
    padded = reference_logits(state_dict, torch.cat([ids[:, :16], torch.zeros(2, 16, dtype=torch.long)], 1), TAU)
    assert (padded[:, :16] - prefix).abs().max().item() > 1e-3  # F2: pads enter the mean


def test_model_is_causal_when_routing_ignores_the_input():
    state_dict = dict(make_reference_state_dict())
    for i in range(2):  # f = gate_net(h̄) becomes the constant bias output
        key = f"model_core.{i}.polyglu.gate_net.0.weight"
        state_dict[key] = torch.zeros_like(state_dict[key])
    ids = _ids(length=48)
    prefix = reference_logits(state_dict, ids[:, :16], TAU)
    full = reference_logits(state_dict, ids, TAU)
    torch.testing.assert_close(full[:, :16], prefix, rtol=0, atol=1e-6)


def test_rows_of_a_batch_are_independent():
    state_dict = make_reference_state_dict()
    ids = _ids(batch=3)
    batched = reference_logits(state_dict, ids, TAU)
    for row in range(3):
        torch.testing.assert_close(batched[row], reference_logits(state_dict, ids[row], TAU), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ one-hot vs soft routing


def _one_hot_alpha(state_dict, margin=1000.0):
    """alpha forces neuron n onto activation n % 4 whatever the input."""
    state_dict = dict(state_dict)
    for i in range(2):
        alpha = torch.zeros(48, 4)
        alpha[torch.arange(48), torch.arange(48) % 4] = margin
        state_dict[f"model_core.{i}.polyglu.alpha"] = alpha
    return state_dict


def test_one_hot_routing_is_a_fixed_per_neuron_glu_and_ignores_noise():
    state_dict = _one_hot_alpha(make_reference_state_dict())
    layer = _layer(state_dict)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3))
    gate = x @ layer["polyglu.W_gate.weight"].T
    activated = torch.empty_like(gate)
    for n in range(48):  # ReLU, tanh, SiLU, GELU(erf) by alpha's column index
        activated[..., n] = [torch.relu, torch.tanh, F.silu, F.gelu][n % 4](gate[..., n])
    expected = (activated * (x @ layer["polyglu.W_up.weight"].T)) @ layer["polyglu.W_down.weight"].T
    torch.testing.assert_close(ref.polyglu_ffn(x, layer, TAU), expected, rtol=1e-5, atol=1e-7)

    ids = _ids()
    torch.manual_seed(0)
    noisy = reference_logits(state_dict, ids, TAU, noise_free=False)
    assert torch.equal(noisy, reference_logits(state_dict, ids, TAU))  # one-hot: Gumbel noise is a no-op


def test_soft_routing_noise_and_the_noise_free_patch(monkeypatch):
    state_dict = make_reference_state_dict()
    ids = _ids()
    clean = reference_logits(state_dict, ids, 1.0)
    torch.manual_seed(0)
    noisy_a = reference_logits(state_dict, ids, 1.0, noise_free=False)
    noisy_b = reference_logits(state_dict, ids, 1.0, noise_free=False)
    assert (noisy_a - clean).abs().max().item() > 1e-3
    assert (noisy_a - noisy_b).abs().max().item() > 1e-3
    # REFERENCE.md (c): patching gumbel_softmax to softmax(ℓ/τ) gives exactly the noise-free logits
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", lambda logits, tau=1.0, hard=False, dim=-1: (logits / tau).softmax(dim))
    assert torch.equal(reference_logits(state_dict, ids, 1.0, noise_free=False), clean)


def test_routing_temperature_limits():
    layer = _layer(make_reference_state_dict())
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4))
    logits = ref.routing_logits(x, layer)
    hot = ref.routing_weights(logits, 1e-4)
    assert torch.equal(hot.argmax(-1), logits.argmax(-1)) and hot.max(-1).values.min().item() > 0.99
    uniform = ref.routing_weights(logits, 1e6)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 0.25), rtol=0, atol=1e-4)
    # nontrivial routing really is per-neuron and per-sequence
    assert (hot[0].argmax(-1) != hot[0, 0].argmax(-1)).any()
    soft = ref.routing_weights(logits, TAU)
    assert (soft[0] - soft[1]).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ (b) RoPE tables


def test_rope_tables_match_a_float64_recomputation():
    state_dict = make_reference_state_dict(seq_len=64)
    j = torch.arange(4, dtype=torch.float64)
    angles = torch.arange(64, dtype=torch.float64)[:, None] / 10000.0 ** (2 * j / 8)[None, :]
    assert state_dict["rope.cosines"].dtype == torch.float32 and state_dict["rope.cosines"].shape == (64, 4)
    torch.testing.assert_close(state_dict["rope.cosines"].double(), torch.cos(angles), rtol=0, atol=1e-5)
    torch.testing.assert_close(state_dict["rope.sins"].double(), torch.sin(angles), rtol=0, atol=1e-5)
    ids = _ids()
    assert torch.equal(reference_logits(state_dict, ids, TAU), reference_logits(state_dict, ids, TAU, rope_from_state_dict=False))


def test_bf16_checkpoint_tables_are_rounded():
    state_dict = make_reference_state_dict(dtype=torch.bfloat16)
    exact_cos, _ = ref.rope_tables(64, 8)
    error = (state_dict["rope.cosines"].float() - exact_cos).abs().max().item()
    assert 0 < error <= 2.0**-9
    ids = _ids()
    stored = reference_logits(state_dict, ids, TAU)  # fp32 computation of the up-cast bf16 weights
    exact = reference_logits(state_dict, ids, TAU, rope_from_state_dict=False)
    assert 0 < (stored - exact).abs().max().item() < 0.1
    low = reference_logits(state_dict, ids, TAU, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), stored, rtol=0, atol=0.1)


def test_sequence_longer_than_rope_table_fails():
    state_dict = make_reference_state_dict(seq_len=16)
    with pytest.raises(ValueError):
        reference_logits(state_dict, _ids(length=17), TAU)


# ------------------------------------------------------------------------------------------------ alternate formulations


def _loop_polyglu_ffn(x, layer, tau, noise_free=True):
    """PolyGLU as an explicit per-activation loop with a per-(sequence, neuron) softmax written out by hand."""
    pooled = x.sum(dim=1) / x.shape[1]
    f = torch.relu(pooled @ layer["polyglu.gate_net.0.weight"].T + layer["polyglu.gate_net.0.bias"])
    f = f @ layer["polyglu.gate_net.2.weight"].T + layer["polyglu.gate_net.2.bias"]  # [B, K]
    gate = torch.einsum("btd,fd->btf", x, layer["polyglu.W_gate.weight"])
    up = torch.einsum("btd,fd->btf", x, layer["polyglu.W_up.weight"])
    mixed = torch.zeros_like(gate)
    for b in range(x.shape[0]):
        scaled = (layer["polyglu.alpha"] + layer["polyglu.beta"] * f[b]) / tau  # [F, K]
        weights = torch.exp(scaled - scaled.max(dim=-1, keepdim=True).values)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        for k, activation in enumerate((torch.relu, torch.tanh, F.silu, lambda t: F.gelu(t, approximate="none"))):
            mixed[b] += weights[:, k] * activation(gate[b])
    return torch.einsum("btf,df->btd", mixed * up, layer["polyglu.W_down.weight"])


def _loop_attention(x, layer, cos, sin, n_heads, n_kv_heads, head_dim):
    """Attention per query head with kv head h // n_rep, complex-number RoPE on (x_j, x_{j+d/2}) pairs, explicit norms."""
    batch, length, _ = x.shape
    half, n_rep = head_dim // 2, n_heads // n_kv_heads
    rotation = torch.complex(cos[:length], sin[:length])  # [T, d/2]

    def project(name, heads, gain=None):
        out = (x @ layer[name].T).view(batch, length, heads, head_dim)
        if gain is not None:
            out = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
            z = torch.complex(out[..., :half], out[..., half:]) * rotation[None, :, None, :]
            out = torch.cat([z.real, z.imag], dim=-1)
        return out

    q = project("gqa.W_q.weight", n_heads, layer["gqa.rmsnorm_q.gama"])
    k = project("gqa.W_k.weight", n_kv_heads, layer["gqa.rmsnorm_k.gama"])
    v = project("gqa.W_v.weight", n_kv_heads)
    heads = []
    for h in range(n_heads):
        scores = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h // n_rep]) / math.sqrt(head_dim)
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
        scores = torch.where(allowed, scores, torch.tensor(float("-inf")))
        heads.append(torch.einsum("bij,bjd->bid", scores.softmax(-1), v[:, :, h // n_rep]))
    return torch.cat(heads, dim=-1) @ layer["gqa.W_o.weight"].T


def test_polyglu_block_matches_the_loop_formulation():
    state_dict = make_reference_state_dict()
    x = torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(5))
    for tau in (TAU, 1.0):
        for i in range(2):
            layer = _layer(state_dict, i)
            torch.testing.assert_close(ref.polyglu_ffn(x, layer, tau), _loop_polyglu_ffn(x, layer, tau), rtol=1e-5, atol=1e-7)


def test_whole_oracle_matches_alternate_blocks(monkeypatch):
    state_dict = make_reference_state_dict(nontrivial_norms=True)
    ids = _ids(length=32)
    expected = reference_logits(state_dict, ids, TAU)
    monkeypatch.setattr(ref, "polyglu_ffn", _loop_polyglu_ffn)
    monkeypatch.setattr(ref, "attention", _loop_attention)
    torch.testing.assert_close(reference_logits(state_dict, ids, TAU), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ checkpoint writers


@pytest.mark.parametrize("kind", ["portable", "sft", "safetensors"])
def test_checkpoint_round_trip(tmp_path, kind):
    tau = 1 - 0.9 * 19530 / 19531
    state_dict = make_reference_state_dict(dtype=torch.bfloat16)
    path = tmp_path / ("model.safetensors" if kind == "safetensors" else "ckpt.pt")
    write_reference_checkpoint(path, state_dict, kind, tau, step=7)
    if kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as handle:
            assert float(handle.metadata()["tau"]) == tau
        loaded, loaded_tau = load_file(str(path)), tau
    else:
        checkpoint = torch.load(path, weights_only=True)
        expected_keys = {"model", "optimizer", "scheduler", "step", "tau"} if kind == "portable" else {"model", "step", "tau", "epoch"}
        assert set(checkpoint) == expected_keys and checkpoint["step"] == 7 and checkpoint["tau"] == tau
        if kind == "portable":
            assert checkpoint["scheduler"]["last_epoch"] == 7
        loaded, loaded_tau = checkpoint["model"], checkpoint["tau"]
        # tied: saved once, loaded back as one shared storage
        assert loaded["output_head.weight"].untyped_storage().data_ptr() == loaded["embeddings.weight"].untyped_storage().data_ptr()
    assert list(loaded) == list(state_dict) or kind == "safetensors"
    assert set(loaded) == set(state_dict)
    assert all(loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], state_dict[key]) for key in state_dict)
    ids = _ids()
    assert torch.equal(reference_logits(loaded, ids, loaded_tau), reference_logits(state_dict, ids, tau))
