"""PolyGLU models: a self-contained Qwen3 decoder whose feed-forward layers mix activations.

The backbone (GQA attention with QK-norm, rotate-half RoPE, RMSNorm, tied or untied head) reproduces
transformers' Qwen3 with the same parameter names, so a Qwen3 state dict loads unchanged into a model with
`ffn_type="swiglu"` and gives the same logits. Each layer's `mlp` owns `gate_proj`/`up_proj`/`down_proj` and,
for the routed variants, one `router` submodule holding every routing parameter of the layer; the mixing math
lives in activation_mixing.py.

PolyGLU's causal routing pools the router's first-layer features (the mean commutes with that affine layer, so
pooling them equals pooling the router input) over the tokens seen so far of the current document; the running
sum lives in the cache (:class:`PolyGLUCache`, :class:`PolyGLUStaticCache`) so cached generation equals
recomputation. When vLLM builds the model, that state lives in vLLM's paged KV cache instead, through one extra
attention layer per router (see "Serving with vLLM" below).

This file is part of the remote code saved next to a checkpoint: it imports only torch, transformers and its
sibling files (vLLM only inside guarded imports, where vLLM builds the model), and uses only public transformers
surfaces.
"""

import dataclasses
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .activation_mixing import mix_activations, mix_activations_grouped, mix_activations_naive, mixing_weights
from .configuration_polyglu import DUALGLU_ACTIVATIONS, FFN_TYPES, FIXED_FFN_ACTIVATIONS, PolyGLUConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# transformers compatibility: what differs across the supported range is read here, once
# ----------------------------------------------------------------------------------------------------------------

# 5.24 renamed the KV cache from `past_key_values` to `cache`: the forward argument generate() passes, the output
# field, and the keyword of the mask helpers. The model accepts both names and writes the one this version reads.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
_MASK_PARAMETERS = frozenset(inspect.signature(create_causal_mask).parameters)  # read once, not per decoded token


def resolve_cache_argument(cache: Optional[Cache], past_key_values: Optional[Cache]) -> Optional[Cache]:
    """The KV cache a caller passed, under either name."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache once: as `cache` or as its older name `past_key_values`, not both.")
    return past_key_values


def cache_of(outputs) -> Optional[Cache]:
    """The cache held by a model output, whichever name this transformers gives the field."""
    return getattr(outputs, CACHE_NAME)


def mask_creation_kwargs(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """Keyword arguments for `create_causal_mask`, whose parameter names changed within transformers 5.x."""
    parameters = _MASK_PARAMETERS
    kwargs = {"config": config, "attention_mask": attention_mask}
    kwargs["cache" if "cache" in parameters else "past_key_values"] = cache
    kwargs["inputs_embeds" if "inputs_embeds" in parameters else "input_embeds"] = inputs_embeds
    if "position_ids" in parameters:
        kwargs["position_ids"] = position_ids
    if "cache_position" in parameters:
        past = cache.get_seq_length() if cache is not None else 0
        kwargs["cache_position"] = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
    return kwargs


# ----------------------------------------------------------------------------------------------------------------
# Backbone (Qwen3 math)
# ----------------------------------------------------------------------------------------------------------------


class PolyGLURMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the gain, as Qwen3 does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class PolyGLURotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE at arbitrary positions (any rope_type transformers knows)."""

    def __init__(self, config: PolyGLUConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PolyGLUConfig, device=None, seq_len=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotate q, k ([B, H, T, d]) by the cos/sin tables ([B, T, d])."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, d] -> [B, H_kv * n_rep, T, d]; query head h reads kv head h // n_rep."""
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class PolyGLUAttention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys before RoPE (Qwen3)."""

    def __init__(self, config: PolyGLUConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = PolyGLURMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = PolyGLURMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        # One plain lookup ("eager" is not registered, so it falls back to eager_attention_forward): vLLM's
        # Transformers backend finds the attention call by reading this source and replaces the implementation.
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation or "eager", eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


# ----------------------------------------------------------------------------------------------------------------
# Routing context and pooling (pure functions)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingContext:
    """What a router may need besides the hidden states of the current chunk.

    token_mask: [B, T] float, 1 for real tokens and 0 for padding (None: no padding).
    document_starts: [B, T] bool, True where a packed document begins (None: one document per row).
    noise_replica: (index, count) of this process among data-parallel replicas that share one RNG stream: training
        noise is drawn for the rows of all `count` batches and this one takes rows index·B … (index+1)·B.
    """

    token_mask: Optional[torch.Tensor] = None
    document_starts: Optional[torch.Tensor] = None
    noise_replica: tuple = (0, 1)


def document_starts_from_position_ids(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, T] bool, True where position ids do not step by +1 (transformers' packed-sequence rule); None if none."""
    previous = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=-1)
    starts = (position_ids - previous) != 1
    return starts if bool(starts.any()) else None


def _segment_ids(document_starts: torch.Tensor) -> torch.Tensor:
    """[B, T] long: index of the document each token belongs to, counted from 0 in every row."""
    return document_starts.long().cumsum(dim=-1) - document_starts[:, :1].long()


def causal_document_mean(
    values: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    document_starts: Optional[torch.Tensor] = None,
    past_sum: Optional[torch.Tensor] = None,
    past_count: Optional[torch.Tensor] = None,
):
    """Mean of `values` ([B, T, D]) over the real tokens ≤ t of t's document.

    `past_sum` [B, D] / `past_count` [B, 1] continue a document from a previous chunk (cached decoding; not
    combined with `document_starts`). A position with no real token so far gets 0.
    Returns (means [B, T, D], running_sum [B, D], running_count [B, 1]) — the latter for the cache.
    """
    weights = torch.ones(values.shape[:2], dtype=values.dtype, device=values.device) if token_mask is None else token_mask.to(values.dtype)
    weighted = values * weights.unsqueeze(-1)
    if document_starts is None:
        sums = weighted.cumsum(dim=1)
        counts = weights.cumsum(dim=1).unsqueeze(-1)
        if past_sum is not None:
            sums = sums + past_sum.unsqueeze(1)
            counts = counts + past_count.unsqueeze(1)
        means = sums / counts.clamp(min=1.0)
        return means, sums[:, -1], counts[:, -1]
    # Packed rows: subtract the running total at each document's start. Done in float64 where available so that
    # a late document's mean is as exact as if it sat in a row of its own.
    exact = torch.float32 if values.device.type == "mps" else torch.float64
    sums = weighted.to(exact).cumsum(dim=1)
    counts = weights.to(exact).cumsum(dim=1)
    batch, length = document_starts.shape
    positions = torch.arange(length, device=values.device).expand(batch, length)
    start_index = torch.where(document_starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    before = (start_index - 1).clamp(min=0)
    has_before = (start_index > 0).to(exact)
    base_sum = sums.gather(1, before.unsqueeze(-1).expand_as(sums)) * has_before.unsqueeze(-1)
    base_count = counts.gather(1, before) * has_before
    doc_sums = sums - base_sum
    doc_counts = (counts - base_count).unsqueeze(-1)
    means = (doc_sums / doc_counts.clamp(min=1.0)).to(values.dtype)
    return means, doc_sums[:, -1].to(values.dtype), doc_counts[:, -1].to(values.dtype)


def document_mean(
    values: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    document_starts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean of `values` ([B, T, D]) over all real tokens of t's document (non-causal), broadcast to [B, T, D]."""
    weights = torch.ones(values.shape[:2], dtype=values.dtype, device=values.device) if token_mask is None else token_mask.to(values.dtype)
    weighted = values * weights.unsqueeze(-1)
    if document_starts is None:
        totals = weighted.sum(dim=1, keepdim=True)
        counts = weights.sum(dim=1, keepdim=True).unsqueeze(-1)
        return (totals / counts.clamp(min=1.0)).expand_as(values)
    segments = _segment_ids(document_starts)
    num_segments = int(segments.max()) + 1
    totals = values.new_zeros(values.shape[0], num_segments, values.shape[-1])
    totals.scatter_add_(1, segments.unsqueeze(-1).expand_as(weighted), weighted)
    counts = values.new_zeros(values.shape[0], num_segments)
    counts.scatter_add_(1, segments, weights)
    means = totals / counts.clamp(min=1.0).unsqueeze(-1)
    return means.gather(1, segments.unsqueeze(-1).expand_as(values))


def gumbel_noise(shape, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples in fp32."""
    uniform = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    return -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))


def preference_logits(activations, preferred: Optional[str], strength: float) -> list[float]:
    """[K] logit bias: `strength` on the preferred activation, 0 elsewhere (all 0 when None).

    A list, not a tensor: routers are built on the meta device by from_pretrained, and their initial values must
    still be available when missing parameters are initialised.
    """
    if preferred is not None and preferred not in activations:
        raise ValueError(
            f"router_init_activation={preferred!r} is not in this layer's activations {list(activations)}; "
            "pick one of them or leave it unset."
        )
    return [float(strength) if name == preferred else 0.0 for name in activations]


def _like(values: list[float], parameter: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=parameter.dtype, device=parameter.device)


# ----------------------------------------------------------------------------------------------------------------
# Routers: each owns the routing parameters of one layer and returns factorised logits (see activation_mixing.py)
# ----------------------------------------------------------------------------------------------------------------

# Created in fp32 whatever the default dtype (`from_config(dtype=...)`, from_pretrained's construction), matching
# `_keep_in_fp32_modules_strict`, which only governs how loaded weights are cast.
ROUTER_DTYPE = torch.float32


def in_dtype_of(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`inputs` cast to the dtype of `module`'s weight (fp32 for routers, see ROUTER_DTYPE).

    Routers call their submodules rather than reading `module.weight` into functional calls: serving engines
    (vLLM's Transformers backend) and tensor-parallel plans replace those submodules with their own layers.
    """
    return inputs.to(module.weight.dtype)


class _RouterLinear(torch.autograd.Function):
    """``F.linear(x.to(weight.dtype), weight, bias)`` that keeps ``x`` for backward in its own dtype, not as a copy.

    A bf16 model's routers run in fp32: through the cast autograd would keep an fp32 copy of the FFN's [B, T, d]
    input beside the bf16 input the projections keep (+15% activation memory per routed FFN). This keeps the one
    the projections keep and casts again in backward. Under autocast it computes in the autocast dtype, as the
    plain expression does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        ctx.save_for_backward(x, weight)
        ctx.compute_dtype, ctx.bias_dtype = dtype, None if bias is None else bias.dtype
        with torch.autocast(device_type, enabled=False):
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad = grad_output.to(ctx.compute_dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(ctx.compute_dtype)).to(x.dtype)
        rows = grad.reshape(-1, grad.shape[-1])  # [N, out]
        if ctx.needs_input_grad[1]:
            grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1]).to(ctx.compute_dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def router_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A router's ``F.linear(x.to(weight.dtype), weight, bias)`` (fp32 routers: of a bf16 input); in training it
    keeps x for backward, not its cast copy (_RouterLinear). DeepSpeed's bf16 mode makes the weights bf16 too."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.dtype != weight.dtype:
        return _RouterLinear.apply(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias)


class RouterLinear(nn.Linear):
    """A router projection (fp32) of an input of any float dtype (see :func:`router_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_linear(x, self.weight, self.bias)


class PolyGLURouter(nn.Module):
    """ℓ[t, j, k] = α[j, k] + β[k] · f(pooled x_t)[k], f = Linear(d→w) → ReLU → Linear(w→K).

    Pooling (a mean over tokens) and the affine first layer commute, so the router pools the w features
    Linear(d→w)(x) instead of the d-wide inputs: the cache holds [B, w] running sums and nothing of size
    [B, T, d] is kept for backward. A position with no real token so far (left padding) gets zero features.
    """

    neuron_offset = 0  # first d_ff row of this rank's α slice under tensor parallelism (set by the TP style)

    def __init__(self, config: PolyGLUConfig, activations):
        super().__init__()
        self.config = config
        self.num_activations = len(activations)
        self.alpha = nn.Parameter(torch.zeros(config.intermediate_size, self.num_activations, dtype=ROUTER_DTYPE))
        self.beta = nn.Parameter(torch.ones(self.num_activations, dtype=ROUTER_DTYPE))
        self.proj_in = RouterLinear(config.hidden_size, config.router_hidden_size, dtype=ROUTER_DTYPE)
        self.proj_out = nn.Linear(config.router_hidden_size, self.num_activations, dtype=ROUTER_DTYPE)
        self.preference = preference_logits(activations, config.router_init_activation, config.router_init_strength)
        self.vllm_running_mean = None  # vLLM attention layers holding causal pooling's state, when vLLM serves it
        self.vllm_alpha_rows = None  # under vLLM tensor parallelism: the rows of α for this rank's slice of d_ff

    def initialize_parameters(self, initializer_range: float, children: bool = True):
        init.copy_(self.alpha, _like(self.preference, self.alpha).expand_as(self.alpha))
        init.ones_(self.beta)
        if children:  # what transformers' init gives a Linear: N(0, initializer_range), zero bias
            for linear in (self.proj_in, self.proj_out):
                init.normal_(linear.weight, mean=0.0, std=initializer_range)
                init.zeros_(linear.bias)

    def forward(self, hidden_states, routing_context, cache=None, layer_idx=None):
        pooling = self.config.routing_pooling
        context = routing_context or RoutingContext()
        # [B, T, w] fp32; a serving engine or an adapter may have replaced proj_in with a layer of its own
        proj_in_input = hidden_states if isinstance(self.proj_in, RouterLinear) else in_dtype_of(self.proj_in, hidden_states)
        projected = self.proj_in(proj_in_input).float()
        if pooling == "causal" and self.vllm_running_mean is not None:
            # served by vLLM: its paged KV cache holds the running mean of the features
            pooled = vllm_running_mean(self.vllm_running_mean, projected)
        elif pooling == "causal":
            past_sum = past_count = None
            if cache is not None:
                past_sum, past_count = cache.get_routing_state(layer_idx)
            pooled, running_sum, running_count = causal_document_mean(
                projected, context.token_mask, context.document_starts, past_sum, past_count
            )
            if cache is not None:
                cache.set_routing_state(layer_idx, running_sum, running_count)
        elif pooling == "sequence":
            pooled = document_mean(projected, context.token_mask, context.document_starts)
        else:
            pooled = projected
        return self._logits(F.relu(pooled), hidden_states, context)

    def _logits(self, hidden, hidden_states, context: RoutingContext):
        """(static [B|1, 1, F, K], token [B, T, 1, K]) logits from the router MLP's hidden layer [B, T, w]."""
        dynamic = self.proj_out(in_dtype_of(self.proj_out, hidden))
        token_logits = (self.beta.float() * dynamic).unsqueeze(2)  # [B, T, 1, K]
        alpha = self.alpha if self.vllm_alpha_rows is None else self.alpha[self.vllm_alpha_rows]
        static_logits = alpha.float()[None, None]  # [1, 1, F, K]
        if self.training and self.config.routing_noise == "gumbel":
            # One draw per sequence, neuron and activation, shared by all tokens (as the reference). Drawn for every
            # d_ff neuron and sliced: under tensor parallelism each rank's share of the unsharded draw. Drawn for the
            # rows of every data-parallel replica and sliced: replicas seeded alike (the Trainer's) get different
            # noise, and together draw what one process with their whole batch draws.
            replica, replicas = context.noise_replica
            batch = hidden_states.shape[0]
            noise_shape = (replicas * batch, 1, self.config.intermediate_size, self.num_activations)
            noise = gumbel_noise(noise_shape, hidden_states.device)[replica * batch : (replica + 1) * batch]
            static_logits = static_logits + noise[:, :, self.neuron_offset : self.neuron_offset + self.alpha.shape[0]]
        return static_logits, token_logits


class TokenRouter(nn.Module):
    """Per-token softmax logits W x + b (MoA; DualGLU's dynamic mixing)."""

    def __init__(self, config: PolyGLUConfig, activations):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(activations), config.hidden_size, dtype=ROUTER_DTYPE))
        self.bias = nn.Parameter(torch.zeros(len(activations), dtype=ROUTER_DTYPE))
        self.preference = preference_logits(activations, config.router_init_activation, config.router_init_strength)

    def initialize_parameters(self, initializer_range: float, children: bool = True):
        init.normal_(self.weight, mean=0.0, std=initializer_range)
        init.copy_(self.bias, _like(self.preference, self.bias))

    def forward(self, hidden_states, routing_context=None, cache=None, layer_idx=None):
        logits = router_linear(hidden_states, self.weight.float(), self.bias.float())
        return None, logits.unsqueeze(2)


class LayerMixingWeights(nn.Module):
    """One learned vector over the activations for the whole layer, token- and neuron-independent.

    Softmax logits for DualGLU's learned_static mixing; the plain linear coefficients of LA.
    """

    def __init__(self, initial: list[float]):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(len(initial), dtype=ROUTER_DTYPE))
        self.initial = initial

    @classmethod
    def softmax_logits(cls, config: PolyGLUConfig, activations) -> "LayerMixingWeights":
        return cls(preference_logits(activations, config.router_init_activation, config.router_init_strength))

    @classmethod
    def linear_coefficients(cls, config: PolyGLUConfig, activations) -> "LayerMixingWeights":
        if config.router_init_activation is None:
            return cls([1.0 / len(activations)] * len(activations))
        return cls(preference_logits(activations, config.router_init_activation, 1.0))  # one-hot

    def initialize_parameters(self, initializer_range: float, children: bool = True):
        init.copy_(self.weights, _like(self.initial, self.weights))

    def forward(self, hidden_states, routing_context=None, cache=None, layer_idx=None):
        return self.weights.float().view(1, 1, 1, -1), None


class DynamicGEGLUGate(nn.Module):
    """a_t = sigmoid(s · ‖LayerNorm(x_t)‖₂ + b), one scalar per token scaling GELU(gate x)."""

    def __init__(self, config: PolyGLUConfig, activations):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=ROUTER_DTYPE)
        self.scale = nn.Parameter(torch.full((1,), float(config.dynamic_geglu_scale_init), dtype=ROUTER_DTYPE))
        self.bias = nn.Parameter(torch.full((1,), float(config.dynamic_geglu_bias_init), dtype=ROUTER_DTYPE))

    def initialize_parameters(self, initializer_range: float, children: bool = True):
        if children:  # what transformers' init gives a LayerNorm
            init.ones_(self.norm.weight)
            init.zeros_(self.norm.bias)
        init.constant_(self.scale, float(self.config.dynamic_geglu_scale_init))
        init.constant_(self.bias, float(self.config.dynamic_geglu_bias_init))

    def forward(self, hidden_states, routing_context=None, cache=None, layer_idx=None):
        normed = self.norm(in_dtype_of(self.norm, hidden_states))
        gate = torch.sigmoid(self.scale.float() * normed.norm(dim=-1, keepdim=True) + self.bias.float())
        return None, gate.unsqueeze(2)  # [B, T, 1, 1]


class StaticEqualMixing(nn.Module):
    """DualGLU's fixed ½/½ ablation: no parameters, zero logits under a softmax."""

    def __init__(self, config: PolyGLUConfig, activations):
        super().__init__()
        self.num_activations = len(activations)

    def forward(self, hidden_states, routing_context=None, cache=None, layer_idx=None):
        return hidden_states.new_zeros(1, 1, 1, self.num_activations, dtype=torch.float32), None

    def initialize_parameters(self, initializer_range: float, children: bool = True):
        pass  # no parameters


ROUTER_CLASSES = (PolyGLURouter, TokenRouter, LayerMixingWeights, DynamicGEGLUGate, StaticEqualMixing)


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallelism of the routers (`from_pretrained(..., tp_plan="auto")`; the plan is in configuration_polyglu.py)
# ----------------------------------------------------------------------------------------------------------------


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tensor-parallel group (each rank's is partial)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient):
        gradient = gradient.contiguous().clone()
        torch.distributed.all_reduce(gradient, group=ctx.group)
        return gradient, None


def _swap_parameters(module: nn.Module, tensors: dict) -> dict:
    """Put `tensors` in place of the (possibly nested) parameters of those names; returns what they replaced."""
    replaced = {}
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        replaced[name] = owner._parameters[leaf]
        owner._parameters[leaf] = tensor
    return replaced


def _gradient_summing_views(module: nn.Module, group, skip=(), recurse: bool = True) -> dict:
    """Identity views of the trainable parameters whose gradients are summed over `group` inside the graph.

    Summing in the graph adds each backward's own partial gradient once. Summing `param.grad` after accumulation
    (a post-accumulate hook) would add the earlier micro-batches again on every backward of a gradient-accumulation
    window, so replicated parameters would train on a different gradient than one unsharded process.
    """
    if not torch.is_grad_enabled():
        return {}
    return {
        name: _SumGradientOverRanks.apply(parameter, group)
        for name, parameter in module.named_parameters(recurse=recurse)
        if parameter.requires_grad and name not in skip
    }


def _shard_offset(parameter: torch.Tensor) -> int:
    """First row of this rank's Shard(0) slice of a DTensor (DTensor splits like torch.chunk); 0 if not sharded."""
    mesh = getattr(parameter, "device_mesh", None)
    if mesh is None:
        return 0
    sizes = [len(chunk) for chunk in torch.arange(parameter.shape[0]).chunk(mesh.size())]
    return sum(sizes[: mesh.get_local_rank()])


def _tensor_parallel_styles() -> dict:
    """The plan's own styles ({} where transformers has no TP styles to extend).

    * `polyglu_router`, for every router module. Each rank computes the gate/up columns of its d_ff slice, so a
      router's output reaches only that slice: the gradients of its replicated parameters (β, proj_in/out,
      token-router and gate weights) and of its input are partial sums, summed over the ranks. PolyGLU's α is split
      on d_ff by its own `colwise` entry and used as the local slice. Gumbel noise is drawn for every neuron and
      sliced, so each rank adds its share of the unsharded draw (the ranks must share their RNG state, as ranks
      seeded alike do).
    * `polyglu_replicated_summed_gradients`, for q_norm/k_norm: replicated weights that see only this rank's heads.
      transformers' `replicated_with_grad_allreduce` all-reduces `param.grad` after each backward, which counts
      earlier micro-batches again under gradient accumulation; this one sums each backward's gradient in the graph.
    """
    try:
        from transformers.distributed.tensor_parallel import TensorParallelLayer
    except ImportError:
        return {}

    class RouterTensorParallel(TensorParallelLayer):
        def install_forward(self, module, mesh, **options):  # 5.25 passes config= and mesh_manager=
            original_forward = module.forward
            group = mesh.get_group()

            def tp_forward(hidden_states, *args, **kwargs):
                sharded = {name: p for name, p in module.named_parameters(recurse=False) if hasattr(p, "device_mesh")}
                views = _gradient_summing_views(module, group, skip=sharded)
                if torch.is_grad_enabled():
                    hidden_states = _SumGradientOverRanks.apply(hidden_states, group)
                if "alpha" in sharded:
                    module.neuron_offset = _shard_offset(sharded["alpha"])
                replaced = _swap_parameters(module, {**views, **{name: p.to_local() for name, p in sharded.items()}})
                try:
                    return original_forward(hidden_states, *args, **kwargs)
                finally:
                    _swap_parameters(module, replaced)

            module.forward = tp_forward
            return module

    class ReplicatedSummedGradients(TensorParallelLayer):
        def install_forward(self, module, mesh, **options):
            original_forward = module.forward
            group = mesh.get_group()

            def tp_forward(*args, **kwargs):
                replaced = _swap_parameters(module, _gradient_summing_views(module, group, recurse=False))
                try:
                    return original_forward(*args, **kwargs)
                finally:
                    _swap_parameters(module, replaced)

            module.forward = tp_forward
            return module

    return {"polyglu_router": RouterTensorParallel(), "polyglu_replicated_summed_gradients": ReplicatedSummedGradients()}


def _register_tensor_parallel_styles() -> None:
    styles = _tensor_parallel_styles()
    if styles:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

        for name, style in styles.items():
            ALL_PARALLEL_STYLES.register(name, style)


_register_tensor_parallel_styles()


def mixer_spec(config: PolyGLUConfig, ffn_type: str):
    """(activations, router factory `(config, activations) -> module` or None, normalization, gated) of one layer."""
    if ffn_type in FIXED_FFN_ACTIVATIONS:
        return (FIXED_FFN_ACTIVATIONS[ffn_type],), None, None, not ffn_type.startswith("mlp_")
    if ffn_type == "polyglu":
        return tuple(config.activations), PolyGLURouter, "softmax", True
    if ffn_type == "moa":
        return tuple(config.activations), TokenRouter, "softmax", config.mixer_form == "gated"
    if ffn_type == "la":
        return tuple(config.activations), LayerMixingWeights.linear_coefficients, "linear", config.mixer_form == "gated"
    if ffn_type == "dualglu":
        router = {"dynamic": TokenRouter, "learned_static": LayerMixingWeights.softmax_logits, "static_equal": StaticEqualMixing}
        return DUALGLU_ACTIVATIONS, router[config.dualglu_mixing], "softmax", True
    if ffn_type == "dynamic_geglu":
        return ("gelu",), DynamicGEGLUGate, "linear", True
    raise ValueError(f"Unknown ffn_type {ffn_type!r}.")


class PolyGLUMLP(nn.Module):
    """down(m(gate x) ⊙ up x) (gated) or down(m(up x)) (plain), m mixing this layer's activations.

    `mlp(hidden_states)` works alone (one document per row, no padding, no cache); the decoder passes the routing
    context, the cache and `output_routing_weights`. With `output_routing_weights=True` it returns
    `(output, routing_weights)`, the weights being [B, T, F, K] (polyglu), [B, T, K] (other mixers) or None.
    """

    def __init__(self, config: PolyGLUConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.ffn_type = config.ffn_type_of_layer(layer_idx)
        self.activations, router_class, self.normalization, self.gated = mixer_spec(config, self.ffn_type)
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if router_class is not None:
            self.router = router_class(config, self.activations)

    @property
    def is_softmax_routed(self) -> bool:
        return self.normalization == "softmax"

    def forward(self, hidden_states, routing_context=None, cache=None, output_routing_weights=False):
        if self.gated:
            pre_activation, up = self.gate_proj(hidden_states), self.up_proj(hidden_states)
        else:
            pre_activation, up = self.up_proj(hidden_states), None
        static_logits = token_logits = None
        if hasattr(self, "router"):
            static_logits, token_logits = self.router(hidden_states, routing_context, cache, self.layer_idx)
        tau = self.config.routing_tau if self.is_softmax_routed else 1.0
        hard = self.config.routing_hard and self.is_softmax_routed
        normalization = self.normalization or "linear"
        if hard and token_logits is None and static_logits.shape[0] == 1 and not torch.is_grad_enabled():
            # the choice is per neuron (or per layer): evaluate one activation per neuron
            mixed = mix_activations_grouped(pre_activation, up, self.activations, static_logits)
        else:
            mix_arguments = (pre_activation, up, self.activations, static_logits, token_logits, tau, normalization, hard)
            if self.config.mixing_backend == "naive":
                mixed = mix_activations_naive(*mix_arguments)
            else:  # "fused" or "triton"
                mixed = mix_activations(*mix_arguments, backend=self.config.mixing_backend)
        output = self.down_proj(mixed)
        if not output_routing_weights:
            return output
        weights = mixing_weights(static_logits, token_logits, tau, normalization, hard)
        if weights is not None:
            batch, length = hidden_states.shape[:2]
            if weights.shape[2] == 1:  # one distribution per token (or per layer): [B, T, K]
                weights = weights[:, :, 0].expand(batch, length, -1)
            else:
                weights = weights.expand(batch, length, -1, -1)
        return output, weights


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


class RoutingStateMixin:
    """What a cache needs to carry, per causal-routed layer, the running sum [B, w] and count [B, 1] of the router's
    first-layer features (w = router_hidden_size).

    Mixed into transformers' caches (PolyGLUCache, PolyGLUStaticCache). `generate()` and callers that build a plain
    DynamicCache or StaticCache get an empty one converted in place on the first forward (see
    :func:`ensure_routing_cache`), so beam search, batch expansion, selection and `reset()` (generate's reuse of a
    static cache) treat the routing state together with the keys and values.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_routing_state()

    def _init_routing_state(self):
        self.routing_sums: dict[int, torch.Tensor] = {}
        self.routing_counts: dict[int, torch.Tensor] = {}

    @classmethod
    def adopt(cls, cache: Cache) -> "RoutingStateMixin":
        # Same object, so every reference generate() holds sees the routing state; only the class changes.
        cache.__class__ = cls
        cache._init_routing_state()
        return cache

    def get_routing_state(self, layer_idx: int):
        return self.routing_sums.get(layer_idx), self.routing_counts.get(layer_idx)

    def set_routing_state(self, layer_idx: int, running_sum: torch.Tensor, running_count: torch.Tensor):
        self._hold(self.routing_sums, layer_idx, running_sum)
        self._hold(self.routing_counts, layer_idx, running_count)

    def _hold(self, store: dict, layer_idx: int, tensor: torch.Tensor) -> None:
        store[layer_idx] = tensor

    def _map_routing_state(self, fn):
        for store in (self.routing_sums, self.routing_counts):
            for layer_idx, tensor in list(store.items()):
                self._hold(store, layer_idx, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_routing_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_routing_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_routing_state(lambda t: t[indices])

    def reset(self):
        super().reset()
        self._init_routing_state()

    @property
    def is_croppable(self) -> bool:
        return not self.routing_sums and super().is_croppable

    def crop(self, *args, **kwargs):
        if self.routing_sums:
            raise ValueError(
                f"{type(self).__name__} cannot crop: causal routing keeps a running sum of router features, not one "
                "entry per token. Assisted/speculative decoding that rolls the cache back is not supported; use plain "
                "generation (or ffn routing_pooling='token')."
            )
        return super().crop(*args, **kwargs)


class PolyGLUCache(RoutingStateMixin, DynamicCache):
    """A DynamicCache that also carries causal routing's running state (see RoutingStateMixin)."""


class PolyGLUStaticCache(RoutingStateMixin, StaticCache):
    """A StaticCache that also carries causal routing's running state (see RoutingStateMixin).

    After the first chunk the state is updated in place, so its tensors keep their addresses from one decoding step
    to the next, as the static cache's keys and values do (what a compiled or CUDA-graphed decoding step needs).
    """

    def _hold(self, store: dict, layer_idx: int, tensor: torch.Tensor) -> None:
        # in place when the shape allows (decoding steps, beam reordering); batch expansion and a first chunk allocate
        held = store.get(layer_idx)
        if held is not None and held.shape == tensor.shape:
            held.copy_(tensor)
        else:
            store[layer_idx] = tensor.clone()


# the caches that routing state can be added to, by their exact class (subclasses keep other layouts)
ROUTING_CACHE_CLASSES = {DynamicCache: PolyGLUCache, StaticCache: PolyGLUStaticCache}


def ensure_routing_cache(cache: Optional[Cache], config: PolyGLUConfig) -> Optional[Cache]:
    """Return a cache able to carry causal routing state (converting an empty DynamicCache or StaticCache in place)."""
    if cache is None or isinstance(cache, RoutingStateMixin) or not config.polyglu_pools("causal"):
        return cache
    routing_class = ROUTING_CACHE_CLASSES.get(type(cache))
    if routing_class is not None and cache.get_seq_length() == 0:
        return routing_class.adopt(cache)
    raise ValueError(
        f"Causal PolyGLU routing needs its running pooled state in the cache, and a {type(cache).__name__} "
        f"{'that already holds tokens ' if cache.get_seq_length() else ''}cannot carry it. Pass "
        "`PolyGLUCache(config=model.config)`, a new DynamicCache or StaticCache, or no cache instead; quantized and "
        "offloaded caches are not supported."
    )


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------


class PolyGLUDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PolyGLUConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = PolyGLUAttention(config=config, layer_idx=layer_idx)
        self.mlp = PolyGLUMLP(config, layer_idx)
        self.input_layernorm = PolyGLURMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = PolyGLURMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        cache: Optional[Cache] = None,
        use_cache: bool = False,
        position_embeddings=None,
        routing_context: Optional[RoutingContext] = None,
        output_routing_weights: bool = False,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ):
        # transformers' checkpointing wrapper clears the cache under the name its version uses
        cache = resolve_cache_argument(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        mlp_output = self.mlp(hidden_states, routing_context, cache, output_routing_weights)
        routing_weights = None
        if output_routing_weights:
            mlp_output, routing_weights = mlp_output
        return residual + mlp_output, attn_weights, routing_weights


@dataclass
class PolyGLUModelOutputWithPast(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus `routing_weights`: per layer, the applied mixing coefficients (or None)."""

    routing_weights: Optional[tuple] = None


@dataclass
class PolyGLUCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `routing_weights`: per layer, the applied mixing coefficients (or None)."""

    routing_weights: Optional[tuple] = None


# the files save_pretrained copies next to a checkpoint (this file and its relative imports, flattened)
REMOTE_CODE_FILES = (
    "configuration_polyglu.py", "modeling_polyglu.py", "activation_mixing.py", "cpu_mixing_kernel.py",
    "triton_mixing_kernel.py",
)
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_polyglu.PolyGLUConfig",
    "AutoModel": "modeling_polyglu.PolyGLUModel",
    "AutoModelForCausalLM": "modeling_polyglu.PolyGLUForCausalLM",
    "AutoModelForSequenceClassification": "modeling_polyglu.PolyGLUForSequenceClassification",
}


_ROUTER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.router\.(.+)$")


def router_tensor_names(config: PolyGLUConfig, ffn_type: str) -> Optional[frozenset]:
    """Names of one layer's router tensors for `ffn_type` under `config` (None if the type cannot be built)."""
    try:
        activations, router_class, _, _ = mixer_spec(config, ffn_type)
        if router_class is None:
            return frozenset()
        with torch.device("meta"):
            return frozenset(router_class(config, activations).state_dict())
    except ValueError:
        return None


def ffn_type_mismatch_message(config: PolyGLUConfig, missing_keys, unexpected_keys) -> Optional[str]:
    """A warning when the checkpoint's router tensors belong to another ffn_type than its config names."""
    by_layer = {}
    for keys, present in ((missing_keys, False), (unexpected_keys, True)):
        for key in keys:
            match = _ROUTER_KEY.search(key)
            if match:
                by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = present
    mismatches = {}
    for layer, keys in sorted(by_layer.items()):
        configured = config.ffn_type_of_layer(layer)
        expected = router_tensor_names(config, configured) or frozenset()
        saved = (expected - {name for name, present in keys.items() if not present}) | {n for n, present in keys.items() if present}
        candidates = [t for t in FFN_TYPES if t != configured and router_tensor_names(config, t) == saved]
        if saved:
            candidates = [t for t in candidates if t not in FIXED_FFN_ACTIVATIONS]
        belongs_to = " or ".join(candidates) if saved else "a fixed-activation variant (no router tensors)"
        mismatches.setdefault((configured, belongs_to or "no known variant"), []).append(layer)
    if not mismatches:
        return None
    parts = [f"layers {layers} are {configured!r} in config.json but their weights are {belongs_to}"
             for (configured, belongs_to), layers in mismatches.items()]
    return (
        "; ".join(parts) + ". Their routers were freshly initialised or dropped; unless that is a deliberate retrofit, "
        "set ffn_type (or ffn_types) in config.json to the variant the checkpoint was saved as."
    )


class PolyGLUPreTrainedModel(PreTrainedModel):
    config_class = PolyGLUConfig
    config: PolyGLUConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PolyGLUDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # pooling and cache adoption branch on data
    # Routing parameters (α, β, router MLPs, logit biases) stay fp32 when the model is loaded in bf16/fp16. Each
    # instance sets `_keep_in_fp32_modules_strict` from the routers it has (see `routing_parameters_kept_in_fp32`):
    # transformers requires every listed module to exist, and a swiglu-only model has no router.

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ROUTER_CLASSES):
            # a router's own parameters only: its projections and norm get transformers' init as modules of their
            # own. Under ZeRO-3, transformers 5.17 gathers only a module's own parameters for its init, so writes
            # into a child's would be lost there, and the same seed would build other weights than on one process.
            module.initialize_parameters(self.config.initializer_range, children=False)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes an auto_map entry only for the class being saved; list every Auto class so that
        # AutoModel / AutoModelForSequenceClassification also load the checkpoint with trust_remote_code.
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        # FSDP2's fully_shard swaps in a subclass that torch defines (FSDPPolyGLUForCausalLM); transformers names the
        # saved class in auto_map and copies its source file from type(self), so save as the class it wraps.
        sharded_class = type(self)
        if not sharded_class.__module__.startswith("torch."):
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = next(cls for cls in sharded_class.__mro__ if not cls.__module__.startswith("torch."))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = sharded_class

    def set_routing_noise_replica(self, index: int, count: int) -> None:
        """Make this process data-parallel replica `index` of `count` for PolyGLU's training noise.

        Data-parallel ranks are seeded alike (the Trainer seeds every rank with args.seed), so each would draw the
        same Gumbel noise for the k-th row of its batch. With this set, every replica draws the noise of all
        `count` batches and keeps its own rows: the replicas' noise differs, and `count` replicas of batch B train
        on the noise one process with batch count·B draws. The draw grows to [count·B, d_ff, K] per layer, small
        next to the layer's own work ([B, T, d, d_ff]).
        Ranks of one tensor-parallel group are one replica. `polyglu sft` and `polyglu pretrain` set it.
        """
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise ValueError(f"routing noise replica must satisfy 0 <= index < count, got index={index}, count={count}.")
        for module in self.modules():
            if isinstance(module, PolyGLUModel):
                module.routing_noise_replica = (index, count)

    def set_routing_tau(self, tau: float) -> None:
        """Set the softmax temperature of every router (saved with the config; used in train and eval)."""
        tau = float(tau)
        if not tau > 0:
            raise ValueError(f"routing tau must be > 0, got {tau}.")
        self.config.routing_tau = tau

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # a hand-edited ffn_type would silently re-initialise the routers: say which variant the weights are
        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        message = ffn_type_mismatch_message(
            model.config, loading_info.get("missing_keys", ()), loading_info.get("unexpected_keys", ())
        )
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
        return (model, loading_info) if wants_loading_info else model


def routing_parameters_kept_in_fp32(model: nn.Module) -> list[str]:
    """`["router"]` when some layer has routing parameters (all created fp32), else `[]`."""
    return ["router"] if any(".router." in name for name, _ in model.named_parameters()) else []


# ----------------------------------------------------------------------------------------------------------------
# Serving with vLLM: causal routing state in vLLM's paged KV cache
# ----------------------------------------------------------------------------------------------------------------

# The attention implementations vLLM's Transformers backend sets on the config of a model it builds.
VLLM_ATTENTION_IMPLEMENTATIONS = frozenset({"vllm", "vllm_mla"})


def refuse_noncausal_routing_under_vllm(config: PolyGLUConfig) -> None:
    """Raise when vLLM builds a model whose PolyGLU routing reads tokens that have not been generated yet.

    Sequence pooling (the reference PolychromaticLM's) routes every token on the mean over the whole sequence: a
    server that streams tokens cannot compute it, and vLLM would pool over what it has and serve wrong outputs
    without an error, so loading fails instead.
    """
    if config._attn_implementation in VLLM_ATTENTION_IMPLEMENTATIONS and config.uses_noncausal_routing:
        raise ValueError(
            "vLLM cannot serve this model: its PolyGLU layers route with routing_pooling='sequence', which depends "
            "on the mean over the whole sequence, later tokens included, so no server can stream it. Serve it with "
            "transformers (model.generate recomputes the sequence), or convert it with routing_pooling='causal' "
            "(or 'token'), which changes the function."
        )


def vllm_running_mean_layers(layer_idx: int, width: int) -> nn.ModuleDict:
    """vLLM attention layers whose KV cache holds one router's per-token inputs (`width` features per token).

    With zero queries and keys every score is equal, so causal attention returns the mean of the values over the
    request's tokens up to t — causal pooling, kept per request by vLLM's paged cache through decode steps,
    chunked prefill, preemption and prefix caching. Each layer has one head of the model's head size (a size every
    attention backend takes), so `width` may need several of them. Called while vLLM builds the model (its config
    is current).
    """
    try:  # guarded: transformers' remote-code check requires every import outside a try block to be installed
        from vllm.config import get_current_vllm_config
        from vllm.model_executor.layers.attention import Attention
    except ImportError as error:
        raise ImportError(
            "this model is being built for vLLM (attention implementation 'vllm'), but vLLM's attention layers "
            "cannot be imported; serve it from a working vLLM install."
        ) from error

    vllm_config = get_current_vllm_config()
    head_size = vllm_config.model_config.get_head_size()
    registered = vllm_config.compilation_config.static_forward_context
    layers = nn.ModuleDict()
    for part in range(-(-width // head_size)):
        name = f"model.layers.{layer_idx}.mlp.router.running_mean_part{part}"
        # vLLM builds a throwaway copy of the model first (to read its classes); its layers are dropped here
        registered.pop(name, None)
        layer = Attention(
            num_heads=1, head_size=head_size, scale=1.0, num_kv_heads=1, cache_config=vllm_config.cache_config,
            prefix=name,
        )
        if layer.sliding_window is not None:
            raise ValueError(
                f"vLLM cannot serve this model: it runs with a sliding window of {layer.sliding_window} tokens, "
                "which would cut the causal routing mean of PolyGLU short. Serve it without a sliding window."
            )
        layers[f"part{part}"] = layer
    return layers


def vllm_running_mean(layers: nn.ModuleDict, values: torch.Tensor) -> torch.Tensor:
    """Per-request causal mean of `values` ([..., T, w], vLLM's flattened step) through `vllm_running_mean_layers`."""
    flat = values.reshape(-1, values.shape[-1])
    means = []
    for part, layer in enumerate(layers.values()):
        capacity = layer.num_kv_heads * layer.head_size
        chunk = flat[:, part * capacity : (part + 1) * capacity]
        padded = F.pad(chunk, (0, capacity - chunk.shape[-1])).to(layer.dtype)
        zeros = torch.zeros_like(padded)
        means.append(layer(zeros, zeros, padded)[:, : chunk.shape[-1]])
    return torch.cat(means, dim=-1).to(values.dtype).reshape(values.shape)


def vllm_tensor_parallel_rows(intermediate_size: int) -> Optional[slice]:
    """This rank's rows of d_ff under vLLM tensor parallelism (None without it), as vLLM splits gate/up_proj.

    vLLM shards the Linear layers of the tensor-parallel plan but not a bare parameter such as PolyGLU's α, which is
    loaded whole ([d_ff, K], small) and sliced to the rows this rank computes.
    """
    try:  # guarded: see vllm_running_mean_layers
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    except ImportError:
        return None  # no vLLM, no vLLM tensor parallelism (tests build models as vLLM would, without it)
    size = get_tensor_model_parallel_world_size()
    if size == 1:
        return None
    if intermediate_size % size:
        raise ValueError(
            f"vLLM cannot split intermediate_size={intermediate_size} over tensor_parallel_size={size}; pick a size "
            "that divides it."
        )
    rows = intermediate_size // size
    rank = get_tensor_model_parallel_rank()
    return slice(rank * rows, (rank + 1) * rows)


class PolyGLUModel(PolyGLUPreTrainedModel):
    def __init__(self, config: PolyGLUConfig):
        super().__init__(config)
        refuse_noncausal_routing_under_vllm(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PolyGLUDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = PolyGLURMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = PolyGLURotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.routing_noise_replica = (0, 1)  # see set_routing_noise_replica
        if self.served_by_vllm and config.polyglu_pools("causal", "token"):
            alpha_rows = vllm_tensor_parallel_rows(config.intermediate_size)
            for layer in self.layers:
                router = getattr(layer.mlp, "router", None)
                if not isinstance(router, PolyGLURouter):
                    continue
                router.vllm_alpha_rows = alpha_rows
                if config.routing_pooling == "causal":
                    router.vllm_running_mean = vllm_running_mean_layers(layer.mlp.layer_idx, config.router_hidden_size)
        self._keep_in_fp32_modules_strict = routing_parameters_kept_in_fp32(self)  # the heads inherit it in post_init
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @property
    def served_by_vllm(self) -> bool:
        return self.config._attn_implementation in VLLM_ATTENTION_IMPLEMENTATIONS

    @property
    def routes_per_document(self) -> bool:
        """Whether a layer pools router inputs over documents, so packed rows must be split into them.

        Under vLLM those layers read vLLM's own per-request state. Outside these cases the data-dependent test for
        packed rows stays out of the forward (vLLM's torch.compile traces the whole forward and cannot take it).
        """
        return not self.served_by_vllm and self.config.polyglu_pools("causal", "sequence")

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_routing_weights: bool = False,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        routing_token_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[tuple, PolyGLUModelOutputWithPast]:
        cache = resolve_cache_argument(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if use_cache is None:
            # a cache is useless in training, and without one packed rows are seen as separate documents
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.uses_noncausal_routing and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "This model routes with routing_pooling='sequence' (whole-sequence mean, not causal): a token's "
                "routing depends on later tokens, so a KV cache cannot be continued. Generate with use_cache=False "
                "(the default for such models), or switch to routing_pooling='causal', which changes the function."
            )
        if use_cache and cache is None:
            cache = PolyGLUCache(config=self.config)
        cache = ensure_routing_cache(cache, self.config)

        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        # Routing sees what attention sees: padding from a 2-D mask, packed documents from position ids exactly
        # when transformers' masking does (no mask and no cache).
        token_mask = routing_token_mask  # [B, T]: generate()'s padding when it passes 4-D masks (static caches)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1] :]
        document_starts = None
        if attention_mask is None and cache is None and self.routes_per_document:
            document_starts = document_starts_from_position_ids(position_ids.expand(inputs_embeds.shape[0], -1))
        routing_context = RoutingContext(
            token_mask=token_mask, document_starts=document_starts, noise_replica=self.routing_noise_replica
        )

        if isinstance(attention_mask, dict):
            causal_mask = attention_mask["full_attention"]
        else:
            causal_mask = create_causal_mask(
                **mask_creation_kwargs(self.config, inputs_embeds, attention_mask, cache, position_ids)
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_routing_weights = () if output_routing_weights else None
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights, routing_weights = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routing_context=routing_context,
                output_routing_weights=output_routing_weights,
                **{CACHE_NAME: cache},
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
            if output_routing_weights:
                all_routing_weights += (routing_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        outputs = PolyGLUModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            routing_weights=all_routing_weights,
            **{CACHE_NAME: cache if use_cache else None},
        )
        return outputs if return_dict else outputs.to_tuple()


class PolyGLUForCausalLM(PolyGLUPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PolyGLUConfig):
        super().__init__(config)
        self.model = PolyGLUModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.uses_noncausal_routing:
            self.generation_config.use_cache = False
        self.post_init()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """transformers' inputs with a cache that carries routing state, plus the step's padding for 4-D masks.

        With a compilable (static) cache generate() hands the model 4-D masks, from which padding cannot be read
        back reliably; causal routing must leave padding out of its running mean, so the 2-D mask's slice for the
        step's tokens travels as `routing_token_mask`.
        """
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # adopted here, outside the forward, so that a forward compiled with fullgraph=True never swaps a class
        ensure_routing_cache(model_inputs.get(CACHE_NAME), self.config)
        padding = kwargs.get("attention_mask")
        passed = model_inputs.get("attention_mask")
        if isinstance(padding, torch.Tensor) and padding.dim() == 2 and not (
            isinstance(passed, torch.Tensor) and passed.dim() == 2
        ):
            tokens = model_inputs.get("input_ids")
            if tokens is None:
                tokens = model_inputs["inputs_embeds"]
            model_inputs["routing_token_mask"] = padding[:, -tokens.shape[1] :]
        return model_inputs

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_routing_weights: bool = False,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, PolyGLUCausalLMOutputWithPast]:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing_weights=output_routing_weights,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        result = PolyGLUCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            routing_weights=outputs.routing_weights,
            **{CACHE_NAME: cache_of(outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return result if return_dict else result.to_tuple()


class PolyGLUForSequenceClassification(PolyGLUPreTrainedModel):
    """A linear head on the hidden state of each row's last non-padding token."""

    def __init__(self, config: PolyGLUConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PolyGLUModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> Union[tuple, SequenceClassifierOutputWithPast]:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot classify a batch of several rows without pad_token_id in the config.")
        if pad_token_id is None or input_ids is None:
            last_token = torch.full((batch_size,), logits.shape[1] - 1, device=logits.device)
        else:
            # rightmost non-padding token, for left and right padding alike
            not_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * not_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        result = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: cache_of(outputs)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return result if return_dict else result.to_tuple()


__all__ = [
    "PolyGLUCache",
    "PolyGLUStaticCache",
    "PolyGLUForCausalLM",
    "PolyGLUForSequenceClassification",
    "PolyGLUModel",
    "PolyGLUPreTrainedModel",
    "PolyGLUMLP",
]
