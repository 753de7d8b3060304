"""PolyGLUConfig: a Qwen3 configuration plus the choice and settings of the feed-forward mixer.

This file is part of the remote code saved next to a checkpoint: it imports only the standard library and
transformers. It is the first file a checkpoint's remote code loads, so it also says, once per process, when the
transformers in use lies outside the range this code is tested with.
"""

import math
import re
import warnings
from typing import Optional

import transformers
from transformers import PreTrainedConfig

# The oldest and newest transformers releases CI runs the model tests with (setup.cfg admits >= 5.17, < 6).
TESTED_TRANSFORMERS = ("5.17", "5.25")


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return major, minor


def warn_if_untested_transformers(version: str = transformers.__version__) -> bool:
    """Warn (once per process) when `version` is outside TESTED_TRANSFORMERS; returns whether it is."""
    oldest, newest = TESTED_TRANSFORMERS
    if _major_minor(oldest) <= _major_minor(version) <= _major_minor(newest):
        return False
    # one flag for the process: each checkpoint's remote code is a separate module, imported separately
    if not getattr(transformers, "_polyglu_untested_version_warned", False):
        transformers._polyglu_untested_version_warned = True
        newest_major, newest_minor = _major_minor(newest)
        warnings.warn(
            f"polyglu's model code is tested with transformers {oldest} to {newest}.x, and this is {version}. "
            f"If loading, training or generation misbehaves, install a tested release: "
            f"pip install 'transformers>={oldest},<{newest_major}.{newest_minor + 1}'.",
            UserWarning,
            stacklevel=2,
        )
    return True


warn_if_untested_transformers()

FIXED_FFN_ACTIVATIONS = {
    # gated ("GLU variants", Shazeer 2020): down(φ(gate x) ⊙ up x)
    "swiglu": "silu",
    "geglu": "gelu",
    "reglu": "relu",
    "glu": "sigmoid",
    "bilinear": "identity",
    # non-gated baselines: down(φ(up x))
    "mlp_relu": "relu",
    "mlp_gelu": "gelu",
}
MIXING_FFN_TYPES = ("dualglu", "dynamic_geglu", "polyglu", "moa", "la")
FFN_TYPES = tuple(FIXED_FFN_ACTIVATIONS) + MIXING_FFN_TYPES
# mixers whose coefficients are a softmax over a router's logits (τ, hard routing and logit bias apply)
SOFTMAX_ROUTED_FFN_TYPES = ("polyglu", "moa", "dualglu")

ACTIVATION_NAMES = ("relu", "tanh", "silu", "gelu", "gelu_tanh", "sigmoid", "identity")
DEFAULT_ACTIVATIONS = ("relu", "tanh", "silu", "gelu")  # the PolyGLU reference's order
DUALGLU_ACTIVATIONS = ("silu", "gelu")
ROUTING_POOLINGS = ("causal", "sequence", "token")
ROUTING_NOISES = ("gumbel", "none")
DUALGLU_MIXINGS = ("dynamic", "learned_static", "static_equal")
MIXER_FORMS = ("gated", "plain")
MIXING_BACKENDS = ("fused", "triton", "naive")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


# sizes that must be integers >= 1 (bool is an int in Python, and is rejected too)
POSITIVE_INTEGER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "router_hidden_size",
)
FINITE_FLOAT_FIELDS = ("router_init_strength", "dynamic_geglu_scale_init", "dynamic_geglu_bias_init", "initializer_range")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_integer(name, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _finite_number(name, value, positive: bool = False):
    if not (_is_number(value) and math.isfinite(value) and (value > 0 or not positive)):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}.")


def _name_list(name, value):
    """A list of names (a bare string would otherwise be split into characters)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of names, e.g. [{value!r}], not {type(value).__name__} {value!r}.")


class PolyGLUConfig(PreTrainedConfig):
    r"""Configuration of a Qwen3-style decoder whose feed-forward layers mix activations.

    Every Qwen3Config argument keeps its meaning (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_parameters, max_position_embeddings,
    tie_word_embeddings, attention_bias, attention_dropout, initializer_range, pad/bos/eos token ids, use_cache).
    Their defaults are not Qwen3Config's but Qwen3-0.6B's: hidden 1024, d_ff 3072, 28 layers, 16/8 heads of 128,
    RoPE θ 1e6, tied embeddings (Qwen3Config's: hidden 4096, d_ff 22016, 32 layers, θ 1e4, untied). So the same
    keywords build different backbones in the two classes; to mirror a Qwen3Config, pass its `to_dict()` values.

    Feed-forward choice:
        ffn_type (`str`, defaults to `"polyglu"`): one of swiglu, geglu, reglu, glu, bilinear (gated, one fixed
            activation), mlp_relu, mlp_gelu (non-gated), dualglu, dynamic_geglu, polyglu, moa, la.
        ffn_types (`list[str]`, *optional*): one entry per layer, overriding `ffn_type` (like `layer_types`), e.g.
            to retrofit only the top layers.
        activations (`list[str]`, *optional*): the activation dictionary of polyglu, moa and la (default relu, tanh,
            silu, gelu — "gelu" is the exact erf form; also gelu_tanh, sigmoid, identity). DualGLU always mixes
            silu and gelu; the fixed variants use their own activation.
        mixer_form (`str`, defaults to `"gated"`): moa and la only — "gated" (type II, `down(m(gate x) ⊙ up x)`)
            or "plain" (type I, `down(m(up x))`, no gate_proj).

    Routing (which mixers each option applies to):
        routing_tau (`float`, defaults to 1.0): softmax temperature of polyglu, moa and dualglu routers; the τ
            used at inference and saved with the model. Change it with `model.set_routing_tau(tau)`.
        routing_hard (`bool`, defaults to False): polyglu, moa, dualglu — one-hot argmax routing (straight-through
            gradients of the soft weights in training).
        routing_noise (`str`, defaults to `"gumbel"`): polyglu only — "gumbel" adds Gumbel noise to the logits in
            training mode, one draw per sequence, neuron and activation shared over the tokens (as the reference);
            "none" disables it. Eval mode is always noise-free.
        routing_pooling (`str`, defaults to `"causal"`): polyglu only — what its router sees:
            "causal": the mean of the router inputs of tokens ≤ t of the same document, padding excluded (the
            running sum lives in the KV cache, so cached generation is exact);
            "sequence": the mean over the whole document — the reference PolyChromaticLM semantics, NOT causal (a
            token's routing depends on later tokens); such models set `use_cache=False` and generate by recomputing;
            "token": the token's own input.
            moa and dualglu("dynamic") route every token on its own input; dynamic_geglu gates on its own token.
        router_hidden_size (`int`, defaults to 32): width of the polyglu router MLP f = Linear(d→w)→ReLU→Linear(w→K).
        dualglu_mixing (`str`, defaults to `"dynamic"`): "dynamic" (softmax(W x + b) per token), "learned_static"
            (one learned softmax per layer) or "static_equal" (fixed ½, ½).
        dynamic_geglu_scale_init / dynamic_geglu_bias_init (`float`, defaults 0.1 / 0.0): s and b of
            `sigmoid(s·‖LayerNorm(x)‖ + b)`.
        router_init_activation (`str`, *optional*): start the softmax routers preferring this activation for every
            input (their logit bias: α for polyglu, the router bias for moa/dualglu) and la with this one-hot
            combination; None (default) starts unbiased (la: uniform 1/K).
        router_init_strength (`float`, defaults to 8.0): size of that logit preference.

    Implementation:
        mixing_backend (`str`, defaults to `"fused"`): "fused" (recomputes activations in backward, never stores a
            [B, T, d_ff, K] tensor; on CUDA the Triton kernel where triton is installed), "triton" (that kernel
            for every FFN, fixed activations included; CUDA only — on CPU only in Triton's interpreter,
            TRITON_INTERPRET=1) or "naive" (plain autograd over stacked activations, for debugging).
    """

    model_type = "polyglu"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the output field's name before and since 5.24
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        # per-head norms: replicated, but each rank's sees only its heads, so their gradients are summed over the
        # ranks, in the graph (Qwen3's replicated_with_grad_allreduce re-adds earlier micro-batches when accumulating)
        "layers.*.self_attn.q_norm": "polyglu_replicated_summed_gradients",
        "layers.*.self_attn.k_norm": "polyglu_replicated_summed_gradients",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        # routers: PolyGLU's α split on d_ff like gate/up; the rest replicated, gradients summed (modeling_polyglu.py)
        "layers.*.mlp.router": "polyglu_router",
        "layers.*.mlp.router.alpha": "colwise",
    }

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = 128
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    layer_types: Optional[list] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    ffn_type: str = "polyglu"
    ffn_types: Optional[list] = None
    activations: Optional[list] = None
    mixer_form: str = "gated"
    routing_tau: float = 1.0
    routing_hard: bool = False
    routing_noise: str = "gumbel"
    routing_pooling: str = "causal"
    router_hidden_size: int = 32
    dualglu_mixing: str = "dynamic"
    dynamic_geglu_scale_init: float = 0.1
    dynamic_geglu_bias_init: float = 0.0
    router_init_activation: Optional[str] = None
    router_init_strength: float = 8.0
    mixing_backend: str = "fused"

    def __post_init__(self, **kwargs):
        for name in ("hidden_size", "num_attention_heads", "num_hidden_layers"):  # used to derive defaults below
            _positive_integer(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("activations", "ffn_types", "layer_types"):
            if getattr(self, name) is not None:
                _name_list(name, getattr(self, name))
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.activations is None:
            self.activations = list(DEFAULT_ACTIVATIONS)
        self.activations = list(self.activations)
        if self.ffn_types is not None:
            self.ffn_types = list(self.ffn_types)
        self._validate_polyglu_fields()
        if self.uses_noncausal_routing:
            # whole-sequence pooling changes every earlier token's routing when a token is appended
            self.use_cache = False
        super().__post_init__(**kwargs)

    def _validate_polyglu_fields(self):
        for name in POSITIVE_INTEGER_FIELDS:
            _positive_integer(name, getattr(self, name))
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings rotate pairs of channels), got {self.head_dim}.")
        _finite_number("routing_tau", self.routing_tau, positive=True)
        _finite_number("rms_norm_eps", self.rms_norm_eps, positive=True)
        for name in FINITE_FLOAT_FIELDS:
            _finite_number(name, getattr(self, name))
        repeated = sorted({name for name in self.activations if self.activations.count(name) > 1})
        if repeated:
            raise ValueError(f"activations lists {', '.join(repeated)} more than once; name each activation once.")
        _choice("ffn_type", self.ffn_type, FFN_TYPES)
        if self.ffn_types is not None:
            if len(self.ffn_types) != self.num_hidden_layers:
                raise ValueError(
                    f"ffn_types has {len(self.ffn_types)} entries but num_hidden_layers={self.num_hidden_layers}; "
                    "give one ffn_type per layer."
                )
            for layer_ffn in self.ffn_types:
                _choice("ffn_types entry", layer_ffn, FFN_TYPES)
        if not self.activations:
            raise ValueError("activations must name at least one activation.")
        for name in self.activations:
            _choice("activations entry", name, ACTIVATION_NAMES)
        _choice("mixer_form", self.mixer_form, MIXER_FORMS)
        _choice("routing_pooling", self.routing_pooling, ROUTING_POOLINGS)
        _choice("routing_noise", self.routing_noise, ROUTING_NOISES)
        _choice("dualglu_mixing", self.dualglu_mixing, DUALGLU_MIXINGS)
        _choice("mixing_backend", self.mixing_backend, MIXING_BACKENDS)
        if self.router_init_activation is not None:
            _choice("router_init_activation", self.router_init_activation, ACTIVATION_NAMES)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}."
            )
        if any(layer_type != "full_attention" for layer_type in self.layer_types):
            raise ValueError("Only 'full_attention' layers are supported (no sliding-window attention).")

    def ffn_type_of_layer(self, layer_idx: int) -> str:
        """The feed-forward variant of layer `layer_idx` (`ffn_types` entry, else `ffn_type`)."""
        return self.ffn_types[layer_idx] if self.ffn_types is not None else self.ffn_type

    def polyglu_pools(self, *poolings: str) -> bool:
        """True when some polyglu layer exists and routing_pooling is one of `poolings`."""
        return self.routing_pooling in poolings and any(
            self.ffn_type_of_layer(i) == "polyglu" for i in range(self.num_hidden_layers)
        )

    @property
    def uses_noncausal_routing(self) -> bool:
        """True when some polyglu layer pools over the whole sequence (cached generation is impossible)."""
        return self.polyglu_pools("sequence")


__all__ = ["PolyGLUConfig", "FFN_TYPES"]
