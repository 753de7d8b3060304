"""Import checkpoints of the reference PolyGLU implementation (PolychromaticLM) as PolyGLUForCausalLM checkpoints.

Sources: the pre-training "portable" `.pt` and SFT `.pt` files the reference writes (`{"model": state_dict,
"tau": float, ...}`), or a `.safetensors` file with the same tensor names (τ from its metadata or `--tau`). No model
configuration is stored by the reference; every dimension is inferred from tensor shapes, and eps 1e-6, RoPE θ
10000 and the activation order (ReLU, tanh, SiLU, GELU-erf) are constants of the reference.

The imported model uses `routing_pooling="sequence"` — the reference's whole-sequence mean, so that in eval mode it
reproduces the reference's noise-free logits. Causal pooling is available but changes the function.

RoPE tables: the reference stores its cos/sin tables in the checkpoint, rounded to bf16 in real files. The imported
model recomputes exact fp32 tables (the function the reference meant); with a bf16 source this moves fp32 logits by
up to ~2e-2 on a tiny model compared with running the reference on its stored, rounded tables.

.pt files are read with `torch.load(weights_only=True)`. Real pre-training files hold DeepSpeed objects in their
`optimizer` entry, which a safe load refuses; for those, and only for classes from the `deepspeed` package, inert
stand-in classes (they store their arguments and run nothing) are allowed. Nothing is ever unpickled with
`weights_only=False`.
"""

import math
import pickle
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .staging import atomic_directory
from .checkpoint_io import CheckpointError, copy_tokenizer_and_generation_config, write_config_and_remote_code, write_shard
from ..configuration_polyglu import DEFAULT_ACTIVATIONS, PolyGLUConfig
from .model_card import write_model_card
from .qwen3 import expected_qwen3_shapes  # the backbone tensors are Qwen3's

REFERENCE_EPS = 1e-6
REFERENCE_ROPE_THETA = 10000.0
RELEASED_VOCAB_SIZE = 151_669  # len(Qwen3 tokenizer): the released PolyChromaticLM checkpoints
QWEN3_END_OF_TEXT = 151_643

_LAYER_KEY = re.compile(r"^model_core\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "rmsnorm_1.gama": "input_layernorm.weight",
    "rmsnorm_2.gama": "post_attention_layernorm.weight",
    "gqa.rmsnorm_q.gama": "self_attn.q_norm.weight",
    "gqa.rmsnorm_k.gama": "self_attn.k_norm.weight",
    "gqa.W_q.weight": "self_attn.q_proj.weight",
    "gqa.W_k.weight": "self_attn.k_proj.weight",
    "gqa.W_v.weight": "self_attn.v_proj.weight",
    "gqa.W_o.weight": "self_attn.o_proj.weight",
    "polyglu.W_gate.weight": "mlp.gate_proj.weight",
    "polyglu.W_up.weight": "mlp.up_proj.weight",
    "polyglu.W_down.weight": "mlp.down_proj.weight",
    "polyglu.alpha": "mlp.router.alpha",
    "polyglu.beta": "mlp.router.beta",
    "polyglu.gate_net.0.weight": "mlp.router.proj_in.weight",
    "polyglu.gate_net.0.bias": "mlp.router.proj_in.bias",
    "polyglu.gate_net.2.weight": "mlp.router.proj_out.weight",
    "polyglu.gate_net.2.bias": "mlp.router.proj_out.bias",
}
_GLOBAL_RENAMES = {"embeddings.weight": "model.embed_tokens.weight", "rmsnorm.gama": "model.norm.weight"}
_DROPPED = {"output_head.weight", "rope.cosines", "rope.sins"}  # tied head; recomputed RoPE tables


def _inert_class(qualified_name: str):
    """A stand-in for a pickled DeepSpeed class: it keeps whatever it is given and executes nothing."""
    module, _, name = qualified_name.rpartition(".")

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    return type(name, (), {"__module__": module, "__init__": __init__, "__setstate__": __setstate__})


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_PROTOCOL_OPCODE = 0x80  # the first byte of a legacy (non-zip) torch.save pickle


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_is_torch_file(path: Path) -> None:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes) — not a PyTorch checkpoint; copy the file again")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTOCOL_OPCODE:  # a broken archive is left to torch.load's message
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); pass a reference .pt "
            "or .safetensors file"
        )


def checked_tau(value, path, field: str) -> float:
    """τ from a checkpoint entry, its metadata or --tau: a finite number > 0."""
    try:
        tau = float(value)
    except (TypeError, ValueError):
        tau = math.nan
    if isinstance(value, bool) or not (math.isfinite(tau) and tau > 0):
        raise CheckpointError(f"{path}: {field} is {value!r}, not a number > 0; pass --tau (0.1 for the released checkpoints)")
    return tau


def model_dtype(state_dict: dict, path) -> torch.dtype:
    """The one floating dtype of every tensor (the reference casts its whole model); anything else is refused."""
    first_of = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        first_of.setdefault(tensor.dtype, name)
    for dtype, name in first_of.items():
        if dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {str(dtype).replace('torch.', '')}; model weights must be float32, "
                "bfloat16 or float16"
            )
    if len(first_of) > 1:
        mixed = ", ".join(f"{name!r} is {str(dtype).replace('torch.', '')}" for dtype, name in first_of.items())
        raise CheckpointError(f"{path}: tensors mix dtypes ({mixed}); re-save the model in one dtype")
    return next(iter(first_of), torch.float32)


def load_reference_pt(path: Path) -> dict:
    """torch.load(weights_only=True), allowing inert stand-ins for DeepSpeed classes only."""
    _check_is_torch_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
        foreign = [name for name in unsafe if not name.startswith("deepspeed.")]
        if foreign:
            raise CheckpointError(
                f"{path}: refuses to load safely — it pickles {', '.join(foreign[:3])}, which is not a tensor, a "
                "plain container or a DeepSpeed object. This is not a reference checkpoint (or it was tampered with)."
            ) from None
        stand_ins = [(_inert_class(name), name) for name in unsafe]
        with torch.serialization.safe_globals(stand_ins):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as retry_error:
                raise CheckpointError(f"{path}: cannot be loaded safely ({_first_line(retry_error)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None


def read_reference_checkpoint(path, tau: Optional[float] = None) -> tuple[dict, float, dict]:
    """(state_dict, τ, metadata) from a reference .pt (portable or SFT) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state_dict = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        stored_tau = metadata.get("tau")
        if tau is None and stored_tau is None:
            raise CheckpointError(
                f"{path}: has no 'tau' in its metadata; pass --tau (0.1 for the released PolyChromaticLM checkpoints)"
            )
        if tau is not None:
            return state_dict, checked_tau(tau, path, "--tau"), {"format": "safetensors"}
        return state_dict, checked_tau(stored_tau, path, "metadata field 'tau'"), {"format": "safetensors"}
    checkpoint = load_reference_pt(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path}: has no 'model' state dict — not a PolychromaticLM .pt checkpoint")
    if tau is None and "tau" not in checkpoint:
        raise CheckpointError(f"{path}: has no 'tau' entry; pass --tau explicitly")
    kind = "sft" if "epoch" in checkpoint else "portable"
    metadata = {"format": kind, "step": checkpoint.get("step")}
    if tau is not None:
        return checkpoint["model"], checked_tau(tau, path, "--tau"), metadata
    return checkpoint["model"], checked_tau(checkpoint["tau"], path, "entry 'tau'"), metadata


def _shape(state_dict, key, path):
    if key not in state_dict:
        raise CheckpointError(f"{path}: tensor {key!r} missing — not a PolychromaticLM checkpoint")
    return tuple(state_dict[key].shape)


def infer_reference_config(state_dict: dict, path, max_position_embeddings: Optional[int] = None) -> dict:
    """Every dimension from tensor shapes (REFERENCE.md §a)."""
    vocab_size, hidden = _shape(state_dict, "embeddings.weight", path)
    layer_ids = sorted({int(m.group(1)) for key in state_dict if (m := _LAYER_KEY.match(key))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise CheckpointError(f"{path}: no contiguous model_core.{{i}} layers found — not a PolychromaticLM checkpoint")
    d_ff, num_activations = _shape(state_dict, "model_core.0.polyglu.alpha", path)
    (head_dim,) = _shape(state_dict, "model_core.0.gqa.rmsnorm_q.gama", path)
    q_rows = _shape(state_dict, "model_core.0.gqa.W_q.weight", path)[0]
    kv_rows = _shape(state_dict, "model_core.0.gqa.W_k.weight", path)[0]
    router_width = _shape(state_dict, "model_core.0.polyglu.gate_net.0.weight", path)[0]
    if num_activations != len(DEFAULT_ACTIVATIONS):
        raise CheckpointError(f"{path}: alpha has K={num_activations} activations; the reference always has 4")
    if q_rows % head_dim or kv_rows % head_dim or hidden // (q_rows // head_dim) != head_dim:
        raise CheckpointError(
            f"{path}: W_q rows {q_rows}, W_k rows {kv_rows} and head_dim {head_dim} are inconsistent with d_model {hidden}"
        )
    if max_position_embeddings is None:
        max_position_embeddings = (
            state_dict["rope.cosines"].shape[0] if "rope.cosines" in state_dict else 4096
        )
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": d_ff,
        "num_hidden_layers": len(layer_ids),
        "num_attention_heads": q_rows // head_dim,
        "num_key_value_heads": kv_rows // head_dim,
        "head_dim": head_dim,
        "max_position_embeddings": int(max_position_embeddings),
        "router_hidden_size": router_width,
    }


def map_reference_state_dict(state_dict: dict, config: PolyGLUConfig, path) -> dict:
    """Reference names → PolyGLU names, with every shape checked against `config`; fp32 routers."""
    mapped = {}
    for key, tensor in state_dict.items():
        if key in _DROPPED:
            continue
        if key in _GLOBAL_RENAMES:
            mapped[_GLOBAL_RENAMES[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if not match or match.group(2) not in _LAYER_RENAMES:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} — not a PolychromaticLM checkpoint")
        mapped[f"model.layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}"] = tensor
    if "output_head.weight" in state_dict and not torch.equal(state_dict["output_head.weight"], state_dict["embeddings.weight"]):
        raise CheckpointError(f"{path}: output_head.weight differs from embeddings.weight; the reference ties them")
    shapes = expected_qwen3_shapes(config)
    for name, tensor in mapped.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{path}: tensor for {name!r} has shape {list(tensor.shape)}, expected {list(shapes[name])}")
        if ".router." in name:
            mapped[name] = tensor.float()
    missing = [name for name in shapes if name not in mapped]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    return mapped


def convert_polychromatic(
    source,
    destination,
    tokenizer: Optional[str] = None,
    tau: Optional[float] = None,
    max_position_embeddings: Optional[int] = None,
    routing_pooling: str = "sequence",
    overwrite: bool = False,
    log=print,
) -> PolyGLUConfig:
    """Write a PolyGLUForCausalLM checkpoint (safetensors + remote code + model card) from a reference checkpoint."""
    source, destination = Path(source), Path(destination)
    state_dict, tau_value, metadata = read_reference_checkpoint(source, tau)
    dims = infer_reference_config(state_dict, source, max_position_embeddings)
    dtype = model_dtype(state_dict, source)
    released = dims["vocab_size"] == RELEASED_VOCAB_SIZE
    config = PolyGLUConfig(
        **dims,
        rms_norm_eps=REFERENCE_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": REFERENCE_ROPE_THETA},
        tie_word_embeddings=True,
        attention_bias=False,
        ffn_type="polyglu",
        activations=list(DEFAULT_ACTIVATIONS),
        routing_tau=tau_value,
        routing_pooling=routing_pooling,
        eos_token_id=QWEN3_END_OF_TEXT if released else None,
        dtype=str(dtype).replace("torch.", ""),
    )
    tensors = map_reference_state_dict(state_dict, config, source)
    log(
        f"Read a {metadata['format']} reference checkpoint: {config.num_hidden_layers} layers, d_model "
        f"{config.hidden_size}, d_ff {config.intermediate_size}, vocab {config.vocab_size}, τ = {tau_value}"
    )
    with atomic_directory(destination, overwrite=overwrite, sources=(source, tokenizer)) as staging:
        write_shard(tensors, staging / "model.safetensors")
        write_config_and_remote_code(config, staging)
        if tokenizer is not None:
            copied = copy_tokenizer_and_generation_config(Path(tokenizer), staging)
            if not copied:
                raise CheckpointError(f"{tokenizer}: no tokenizer files found")
        write_model_card(
            staging,
            base_model=source.stem,
            config=config,
            title=f"PolychromaticLM imported from {source.name}",
            summary=_card_summary(metadata, tau_value, routing_pooling, dtype),
        )
    log(f"Saved {destination.resolve()}")
    return config


_SEQUENCE_POOLING_NOTE = (
    "the reference semantics — every token is routed on the mean of the whole sequence, including later tokens. "
    "This is NOT causal, so the KV cache is disabled and generation recomputes the sequence. "
    '`routing_pooling="causal"` gives a causal, cacheable model but changes the function (O(1) logit changes on '
    "small models), so use it only to fine-tune further."
)


def _card_summary(metadata, tau_value, routing_pooling, dtype) -> str:
    pooling_note = _SEQUENCE_POOLING_NOTE if routing_pooling == "sequence" else "not the reference semantics; logits differ from the reference."
    dtype_name = str(dtype).replace("torch.", "")
    return f"""Imported from a checkpoint of the reference PolyGLU implementation (PolychromaticLM, {metadata['format']} format).

* Routing temperature τ = {tau_value} (from the checkpoint), noise-free in eval mode: `softmax(ℓ/τ)`, the deterministic
  centre of the reference's Gumbel-softmax (the reference drew Gumbel noise even at evaluation).
* `routing_pooling="{routing_pooling}"`: {pooling_note}
* RoPE cos/sin tables are recomputed in fp32 rather than read from the checkpoint (source dtype {dtype_name}); with
  bf16 sources this differs slightly from running the reference on its bf16-rounded stored tables.
"""
