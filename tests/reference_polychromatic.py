"""Test oracle: a plain, independent re-implementation of the reference PolychromaticLM (PolyGLU) forward pass.

Written from /work/shared/REFERENCE.md only (the reference code itself is not used or copied):

* (a) checkpoint formats and the reference ``model`` state-dict key names / shapes,
* (b) the math of every module (RMSNorm, RoPE, GQA with QK-norm, pre-norm blocks, tied head, init),
* (c) PolyGLU routing (full-sequence unmasked mean pooling, gate_net, alpha + beta*f, (Gumbel-)softmax over K=4
  activations in the order ReLU, tanh, SiLU, GELU(erf), one routing vector per (sequence, neuron)).

It is deliberately written as a few small functions with explicit shapes, for clarity rather than speed. Nothing here
imports ``modeling_polyglu``: the oracle must stay independent of the code it is used to test.

Public helpers:

* :func:`reference_logits` — logits of the reference model for a reference-format state dict.
* :func:`make_reference_state_dict` — random reference-format weights (reference init, routing moved off init).
* :func:`write_reference_checkpoint` — writes the "portable" / "sft" ``.pt`` formats or a ``.safetensors`` file.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

# Constants of the reference that are not stored in any checkpoint (REFERENCE.md (a), last bullet of "Files").
RMS_EPS = 1e-6
ROPE_THETA = 10000.0
NUM_ACTIVATIONS = 4  # K, hard-coded in the reference
GATE_NET_WIDTH = 32  # router hidden width, hard-coded in the reference
INIT_STD = 0.02

# Activation order of the reference (index k): 0 ReLU, 1 tanh, 2 SiLU, 3 GELU (exact erf form).
ACTIVATIONS = (
    torch.relu,
    torch.tanh,
    F.silu,
    lambda x: F.gelu(x, approximate="none"),
)
ACTIVATION_NAMES = ("relu", "tanh", "silu", "gelu")

GLOBAL_KEYS = ("rope.cosines", "rope.sins", "embeddings.weight", "rmsnorm.gama", "output_head.weight")
# Per-layer key suffixes, in the order of the REFERENCE.md (a) table (17 per layer).
LAYER_KEYS = (
    "rmsnorm_1.gama",
    "rmsnorm_2.gama",
    "polyglu.alpha",
    "polyglu.beta",
    "polyglu.W_gate.weight",
    "polyglu.W_up.weight",
    "polyglu.W_down.weight",
    "polyglu.gate_net.0.weight",
    "polyglu.gate_net.0.bias",
    "polyglu.gate_net.2.weight",
    "polyglu.gate_net.2.bias",
    "gqa.rmsnorm_q.gama",
    "gqa.rmsnorm_k.gama",
    "gqa.W_q.weight",
    "gqa.W_k.weight",
    "gqa.W_v.weight",
    "gqa.W_o.weight",
)
_LAYER_KEY_RE = re.compile(r"^model_core\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (each runs entirely in the dtype of its inputs; no fp32 up-casts, as in the reference)
# ---------------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """y = (x / sqrt(mean(x^2, last dim) + eps)) * gain, computed in x's dtype; eps inside the sqrt, gain applied last."""
    mean_square = torch.mean(x * x, dim=-1, keepdim=True)
    return (x / torch.sqrt(mean_square + eps)) * gain


def rope_tables(seq_len: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin tables [seq_len, head_dim/2]: freq_j = 1 / theta^(2j/d), angle[p, j] = p * freq_j."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    j = torch.arange(head_dim // 2, dtype=torch.float32)
    freqs = 1.0 / (theta ** (2.0 * j / head_dim))
    positions = torch.arange(seq_len, dtype=torch.float32)
    angles = torch.outer(positions, freqs)  # [S, d/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on x [B, T, H, d] with tables [>=T, d/2]; positions are 0..T-1 (no offset)."""
    seq_len, half = x.shape[1], x.shape[-1] // 2
    cos_t = cos[:seq_len][None, :, None, :]  # [1, T, 1, d/2], broadcast over B and H
    sin_t = sin[:seq_len][None, :, None, :]
    a = x[..., :half]
    b = x[..., half:]
    return torch.cat([a * cos_t - b * sin_t, a * sin_t + b * cos_t], dim=-1)


def attention(x: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """GQA with QK-norm (per head, before RoPE), repeat_interleave KV expansion, causal softmax, output projection."""
    batch, seq_len, _ = x.shape
    q = F.linear(x, layer["gqa.W_q.weight"]).view(batch, seq_len, n_heads, head_dim)
    k = F.linear(x, layer["gqa.W_k.weight"]).view(batch, seq_len, n_kv_heads, head_dim)
    v = F.linear(x, layer["gqa.W_v.weight"]).view(batch, seq_len, n_kv_heads, head_dim)

    q = rms_norm(q, layer["gqa.rmsnorm_q.gama"])  # over head_dim, one gain shared by all heads
    k = rms_norm(k, layer["gqa.rmsnorm_k.gama"])  # V is not normalised

    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    n_rep = n_heads // n_kv_heads
    k = torch.repeat_interleave(k, n_rep, dim=2)  # query head h uses kv head h // n_rep
    v = torch.repeat_interleave(v, n_rep, dim=2)

    q = q.transpose(1, 2)  # [B, H, T, d]
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)

    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)  # [B, H, T, T]
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # in the model dtype
    context = torch.matmul(probs, v)  # [B, H, T, d]
    context = context.transpose(1, 2).reshape(batch, seq_len, n_heads * head_dim)
    return F.linear(context, layer["gqa.W_o.weight"])


def routing_logits(x: torch.Tensor, layer: dict) -> torch.Tensor:
    """ℓ [B, F, K] = alpha[None] + beta[None, None, :] * gate_net(mean of x over ALL T positions)[:, None, :]."""
    pooled = torch.mean(x, dim=1)  # [B, D]: whole sequence, no mask (future tokens and pads included)
    hidden = F.linear(pooled, layer["polyglu.gate_net.0.weight"], layer["polyglu.gate_net.0.bias"])
    hidden = torch.relu(hidden)
    f = F.linear(hidden, layer["polyglu.gate_net.2.weight"], layer["polyglu.gate_net.2.bias"])  # [B, K]
    alpha = layer["polyglu.alpha"]  # [F, K]
    beta = layer["polyglu.beta"]  # [K]
    return alpha[None, :, :] + beta[None, None, :] * f[:, None, :]


def routing_weights(logits: torch.Tensor, tau: float, noise_free: bool = True) -> torch.Tensor:
    """g [B, F, K]: noise-free softmax(ℓ / τ) (Gumbel G = 0), or the reference's stochastic gumbel_softmax(ℓ, τ)."""
    if noise_free:
        return torch.softmax(logits / tau, dim=-1)
    # Looked up at call time, exactly like the reference (so a monkey-patch of F.gumbel_softmax takes effect here too).
    return torch.nn.functional.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)


def polyglu_ffn(x: torch.Tensor, layer: dict, tau: float, noise_free: bool = True) -> torch.Tensor:
    """out = W_down((Σ_k g_k σ_k(W_gate x)) ⊙ W_up x) with one routing vector per (sequence, neuron)."""
    g = routing_weights(routing_logits(x, layer), tau, noise_free)  # [B, F, K]
    gate = F.linear(x, layer["polyglu.W_gate.weight"])  # [B, T, F]
    up = F.linear(x, layer["polyglu.W_up.weight"])  # [B, T, F]
    # All four activations are always computed; stacked [B, T, F, K], weighted by g unsqueezed to [B, 1, F, K].
    activated = torch.stack([activation(gate) for activation in ACTIVATIONS], dim=-1)
    mixed = torch.sum(g[:, None, :, :] * activated, dim=-1)  # [B, T, F]
    return F.linear(mixed * up, layer["polyglu.W_down.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# State-dict handling
# ---------------------------------------------------------------------------------------------------------------------


def infer_dims(state_dict: dict) -> dict:
    """Dims from shapes as REFERENCE.md (a) prescribes: V, D from embeddings; F, K from alpha; d from rmsnorm_q;
    Hq = rows(W_q)/d; Hkv = rows(W_k)/d; S from rope.cosines (None when absent); L from the largest layer index."""
    layer_indices = set()
    for key in state_dict:
        match = _LAYER_KEY_RE.match(key)
        if match:
            layer_indices.add(int(match.group(1)))
    if not layer_indices:
        raise KeyError("no model_core.{i}.* keys: not a reference PolychromaticLM state dict")
    n_layers = max(layer_indices) + 1
    vocab_size, hidden = state_dict["embeddings.weight"].shape
    d_ff, k = state_dict["model_core.0.polyglu.alpha"].shape
    head_dim = state_dict["model_core.0.gqa.rmsnorm_q.gama"].shape[0]
    q_rows = state_dict["model_core.0.gqa.W_q.weight"].shape[0]
    kv_rows = state_dict["model_core.0.gqa.W_k.weight"].shape[0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise ValueError(f"W_q/W_k rows ({q_rows}, {kv_rows}) are not multiples of head_dim {head_dim}")
    n_heads, n_kv_heads = q_rows // head_dim, kv_rows // head_dim
    seq_len = state_dict["rope.cosines"].shape[0] if "rope.cosines" in state_dict else None
    return {
        "vocab_size": vocab_size,
        "hidden": hidden,
        "d_ff": d_ff,
        "num_activations": k,
        "layers": n_layers,
        "heads": n_heads,
        "kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "seq_len": seq_len,
        "gate_width": state_dict["model_core.0.polyglu.gate_net.0.weight"].shape[0],
    }


def _check_state_dict(state_dict: dict, dims: dict) -> None:
    expected = {"embeddings.weight", "rmsnorm.gama"}
    expected |= {f"model_core.{i}.{suffix}" for i in range(dims["layers"]) for suffix in LAYER_KEYS}
    optional = {"rope.cosines", "rope.sins", "output_head.weight"}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - optional)
    if missing or unexpected:
        raise KeyError(f"not a reference state dict: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if dims["num_activations"] != NUM_ACTIVATIONS:
        raise ValueError(f"the reference hard-codes K={NUM_ACTIVATIONS} activations, alpha has K={dims['num_activations']}")
    if dims["heads"] % dims["kv_heads"]:
        raise ValueError(f"heads {dims['heads']} not a multiple of kv_heads {dims['kv_heads']}")
    # The reference GQA recomputes head_dim as D // Hq; it only works when that equals the RoPE/QK-norm head_dim.
    if dims["hidden"] // dims["heads"] != dims["head_dim"]:
        raise ValueError(
            f"reference GQA uses head_dim = D // Hq = {dims['hidden'] // dims['heads']}, but rmsnorm_q has {dims['head_dim']}"
        )


def reference_logits(
    state_dict: dict,
    input_ids: torch.Tensor,
    tau: float,
    *,
    noise_free: bool = True,
    dtype: torch.dtype = torch.float32,
    rope_from_state_dict: bool = True,
) -> torch.Tensor:
    """Logits [B, T, V] of the reference PolychromaticLM for a reference-format ``model`` state dict.

    input_ids: LongTensor [B, T] (a 1-D [T] input is treated as one sequence and gives [T, V]).
    tau: the routing temperature (the checkpoint's top-level ``tau``; it is not part of the state dict).
    noise_free: True -> routing softmax(ℓ/τ) (the deterministic centre, Gumbel G = 0, how the reference is compared);
        False -> the reference's literal ``torch.nn.functional.gumbel_softmax(ℓ, tau)`` (fresh noise on every call).
    dtype: every weight, buffer and activation is cast to / computed in this dtype (bf16 reproduces the reference's
        all-bf16 eval; bf16 -> fp32 is an exact up-cast).
    rope_from_state_dict: True -> use the stored ``rope.cosines`` / ``rope.sins`` (bf16-rounded in real checkpoints);
        False -> recompute float32 tables with theta 10000, then cast to ``dtype``.
    """
    squeeze = input_ids.dim() == 1
    if squeeze:
        input_ids = input_ids[None, :]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    dims = infer_dims(state_dict)
    _check_state_dict(state_dict, dims)
    seq_len = input_ids.shape[1]
    head_dim = dims["head_dim"]
    if dims["seq_len"] is not None and seq_len > dims["seq_len"]:
        raise ValueError(f"sequence length {seq_len} exceeds the reference's RoPE table length {dims['seq_len']}")

    def weight(key: str) -> torch.Tensor:
        return state_dict[key].detach().to(dtype)

    if rope_from_state_dict:
        if "rope.cosines" not in state_dict or "rope.sins" not in state_dict:
            raise KeyError("rope_from_state_dict=True but the state dict has no rope.cosines / rope.sins")
        cos, sin = weight("rope.cosines"), weight("rope.sins")
        if cos.shape[-1] != head_dim // 2:
            raise ValueError(f"rope tables have {cos.shape[-1]} columns, expected head_dim/2 = {head_dim // 2}")
    else:
        table_len = dims["seq_len"] if dims["seq_len"] is not None else seq_len
        cos, sin = rope_tables(table_len, head_dim)
        cos, sin = cos.to(dtype), sin.to(dtype)

    x = F.embedding(input_ids, weight("embeddings.weight"))  # [B, T, D]; no scaling
    for i in range(dims["layers"]):
        layer = {suffix: weight(f"model_core.{i}.{suffix}") for suffix in LAYER_KEYS}
        h = rms_norm(x, layer["rmsnorm_1.gama"])
        x = x + attention(h, layer, cos, sin, dims["heads"], dims["kv_heads"], head_dim)
        h = rms_norm(x, layer["rmsnorm_2.gama"])
        x = x + polyglu_ffn(h, layer, tau, noise_free)
    x = rms_norm(x, weight("rmsnorm.gama"))
    head_key = "output_head.weight" if "output_head.weight" in state_dict else "embeddings.weight"
    logits = F.linear(x, weight(head_key))  # tied head, no bias, no scaling
    return logits[0] if squeeze else logits


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic reference checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def reference_shapes(vocab_size: int, hidden: int, d_ff: int, layers: int, heads: int, kv_heads: int,
                     seq_len: int) -> dict:
    """Key -> shape of a reference ``model`` state dict, in the order of the REFERENCE.md (a) table."""
    head_dim = hidden // heads
    k, width = NUM_ACTIVATIONS, GATE_NET_WIDTH
    per_layer = {
        "rmsnorm_1.gama": (hidden,),
        "rmsnorm_2.gama": (hidden,),
        "polyglu.alpha": (d_ff, k),
        "polyglu.beta": (k,),
        "polyglu.W_gate.weight": (d_ff, hidden),
        "polyglu.W_up.weight": (d_ff, hidden),
        "polyglu.W_down.weight": (hidden, d_ff),
        "polyglu.gate_net.0.weight": (width, hidden),
        "polyglu.gate_net.0.bias": (width,),
        "polyglu.gate_net.2.weight": (k, width),
        "polyglu.gate_net.2.bias": (k,),
        "gqa.rmsnorm_q.gama": (head_dim,),
        "gqa.rmsnorm_k.gama": (head_dim,),
        "gqa.W_q.weight": (heads * head_dim, hidden),
        "gqa.W_k.weight": (kv_heads * head_dim, hidden),
        "gqa.W_v.weight": (kv_heads * head_dim, hidden),
        "gqa.W_o.weight": (hidden, heads * head_dim),
    }
    assert tuple(per_layer) == LAYER_KEYS
    shapes = {"rope.cosines": (seq_len, head_dim // 2), "rope.sins": (seq_len, head_dim // 2),
              "embeddings.weight": (vocab_size, hidden)}
    for i in range(layers):
        for suffix, shape in per_layer.items():
            shapes[f"model_core.{i}.{suffix}"] = shape
    shapes["rmsnorm.gama"] = (hidden,)
    shapes["output_head.weight"] = (vocab_size, hidden)
    return shapes


def make_reference_state_dict(
    vocab_size: int = 64,
    hidden: int = 32,
    d_ff: int = 48,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seq_len: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    nontrivial_routing: bool = True,
    *,
    nontrivial_norms: bool = False,
) -> dict:
    """Random reference-format ``model`` state dict (key order of REFERENCE.md (a)).

    Reference init (REFERENCE.md (b) Init): every Linear weight incl. both gate_net layers ~ N(0, 0.02), biases 0,
    embedding N(0, 0.02) (tied: ``output_head.weight`` IS ``embeddings.weight``, the same tensor object), W_o and W_down
    scaled by 1/sqrt(2L), alpha 0, beta 1, every gama 1. RoPE tables are computed in float32 as the reference does.
    Everything is drawn in float32 from a seeded generator and then cast to ``dtype`` (as ``create_model`` casts).

    nontrivial_routing: move routing far from init so it is per-neuron and input-dependent: alpha ~ N(0, 2^2) per
        (neuron, k), beta ~ N(1, 1), gate_net weights ~ N(0, 0.5^2) and gate_net biases ~ N(0, 0.5^2).
    nontrivial_norms (extra, default off): gains ~ N(1, 0.25^2) instead of 1, so that an importer swapping
        rmsnorm_1/rmsnorm_2, rmsnorm_q/rmsnorm_k or mis-mapping the final norm is detectable.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")
    head_dim = hidden // heads
    shapes = reference_shapes(vocab_size, hidden, d_ff, layers, heads, kv_heads, seq_len)
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean

    state = {}
    cos, sin = rope_tables(seq_len, head_dim)
    state["rope.cosines"] = cos.to(dtype)
    state["rope.sins"] = sin.to(dtype)
    embeddings = normal(shapes["embeddings.weight"], std=INIT_STD).to(dtype)
    state["embeddings.weight"] = embeddings
    residual_scale = 1.0 / math.sqrt(2 * layers)
    for i in range(layers):
        prefix = f"model_core.{i}."
        for suffix in LAYER_KEYS:
            shape = shapes[prefix + suffix]
            if suffix.endswith(".gama"):
                value = normal(shape, 1.0, 0.25) if nontrivial_norms else torch.ones(shape)
            elif suffix == "polyglu.alpha":
                value = normal(shape, 0.0, 2.0) if nontrivial_routing else torch.zeros(shape)
            elif suffix == "polyglu.beta":
                value = normal(shape, 1.0, 1.0) if nontrivial_routing else torch.ones(shape)
            elif suffix.startswith("polyglu.gate_net."):
                if nontrivial_routing:
                    value = normal(shape, 0.0, 0.5)
                elif suffix.endswith(".bias"):
                    value = torch.zeros(shape)
                else:
                    value = normal(shape, 0.0, INIT_STD)
            else:  # the other Linear weights
                value = normal(shape, 0.0, INIT_STD)
                if suffix in ("gqa.W_o.weight", "polyglu.W_down.weight"):
                    value = value * residual_scale
            state[prefix + suffix] = value.to(dtype)
    state["rmsnorm.gama"] = (normal((hidden,), 1.0, 0.25) if nontrivial_norms else torch.ones(hidden)).to(dtype)
    state["output_head.weight"] = embeddings  # the same tensor object: saved once as shared storage
    assert list(state) == list(shapes), "key order drifted from reference_shapes"
    return state


def _plain_optimizer_state(state_dict: dict) -> dict:
    """A plain (tensors/dicts/lists only) stand-in for the optimizer entry; real checkpoints hold DeepSpeed objects."""
    names = [key for key in state_dict if not key.startswith("rope.") and key != "output_head.weight"]
    decay, no_decay = [], []
    for index, name in enumerate(names):
        (no_decay if state_dict[name].dim() == 1 or "alpha" in name else decay).append(index)
    state = {
        index: {
            "exp_avg": torch.zeros(state_dict[name].shape, dtype=torch.float32),
            "exp_avg_sq": torch.zeros(state_dict[name].shape, dtype=torch.float32),
        }
        for index, name in enumerate(names)
    }
    common = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": False}
    return {
        "state": state,
        "param_groups": [dict(common, weight_decay=0.1, params=decay), dict(common, weight_decay=0.0, params=no_decay)],
    }


def write_reference_checkpoint(path, state_dict: dict, kind: str, tau: float, step: int = 100) -> None:
    """Write ``state_dict`` in one of the reference formats of REFERENCE.md (a).

    kind="portable": torch.save({"model", "optimizer" (plain stand-in), "scheduler": {"last_epoch": step}, "step", "tau"}).
    kind="sft": torch.save({"model", "step", "tau", "epoch"}).
    kind="safetensors": the same key names as a safetensors file (tied tensors cloned, since safetensors refuses shared
        storage), with metadata {"tau": str(tau)}.
    Tensors are written as given (no dtype change); the tied ``output_head.weight`` stays shared in the ``.pt`` kinds.
    """
    path = str(path)
    if kind == "portable":
        checkpoint = {
            "model": state_dict,
            "optimizer": _plain_optimizer_state(state_dict),
            "scheduler": {"last_epoch": step},
            "step": step,
            "tau": tau,
        }
        torch.save(checkpoint, path)
    elif kind == "sft":
        torch.save({"model": state_dict, "step": step, "tau": tau, "epoch": 0}, path)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        tensors = {key: value.detach().clone().contiguous() for key, value in state_dict.items()}
        save_file(tensors, path, metadata={"tau": str(tau)})
    else:
        raise ValueError(f"kind must be 'portable', 'sft' or 'safetensors', got {kind!r}")
