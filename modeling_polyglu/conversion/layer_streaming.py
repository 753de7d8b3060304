"""Run a causal LM's own forward with one decoder layer's weights in memory at a time, for bounded-memory checks.

Verifying a conversion used to load the source and the converted model whole, in fp32: about 9x the checkpoint
in memory. Here a model is built on the meta device; its embeddings, final norm and head are read from the
checkpoint, and each decoder layer reads its tensors (cast to fp32) in a forward pre-hook and drops them in a
forward hook. The model's own `forward` runs unchanged — masks, RoPE and the layer loop are the library's — so
transformers' Qwen3ForCausalLM stays an independent reference for the converted PolyGLU model.

The router gradient is taken the same way: the no-grad forward records every layer's input (and keyword
arguments); the loss gradient at the last hidden state is then carried back layer by layer, recomputing each
layer with its weights loaded, so only one layer's activations and weights exist at any time.
"""

import math
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .checkpoint_io import CheckpointError, read_json, safetensors_shards

LAYER_PREFIX = "model.layers."
CHUNK_BYTES = 64 * 2**20



def tensor_locations(directory: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a safetensors checkpoint directory, from its index or its single file."""
    directory = Path(directory)
    shards = safetensors_shards(directory)
    if len(shards) == 1:
        with safe_open(str(shards[0]), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), shards[0])
    index = read_json(directory / "model.safetensors.index.json", "the shard index")
    return {name: directory / shard for name, shard in index["weight_map"].items()}


def _read_in_row_chunks(shard: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A large tensor read CHUNK_BYTES of rows at a time, the file reopened per chunk: the source-dtype copy and the
    mapped file pages (which count as resident memory while mapped) never exceed one chunk."""
    with safe_open(str(shard), framework="pt") as handle:
        shape = handle.get_slice(name).get_shape()
    result = torch.empty(shape, dtype=dtype)
    row_bytes = max(1, math.prod(shape[1:])) * 4
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        with safe_open(str(shard), framework="pt") as handle:
            result[start : start + step] = handle.get_slice(name)[start : start + step]
    return result


def read_tensors(names, locations: dict[str, Path], dtype: torch.dtype, pool: Optional["BufferPool"] = None) -> dict[str, torch.Tensor]:
    """The named tensors, cast to `dtype` (into `pool`'s buffers if given); tensors over CHUNK_BYTES are read in row
    chunks (embeddings, head)."""
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        if name not in locations:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        by_shard.setdefault(locations[name], []).append(name)
    tensors, large = {}, []
    for shard, shard_names in by_shard.items():
        with safe_open(str(shard), framework="pt") as handle:
            for name in shard_names:
                shape = handle.get_slice(name).get_shape()
                if math.prod(shape) * 4 > CHUNK_BYTES:
                    large.append((shard, name))
                elif pool is not None:
                    tensors[name] = pool.take(shape, dtype).copy_(handle.get_tensor(name))
                else:
                    tensors[name] = handle.get_tensor(name).to(dtype)
    for shard, name in large:
        tensors[name] = _read_in_row_chunks(shard, name, dtype)
    return tensors


class BufferPool:
    """Storage for one layer's weights, reused layer after layer: allocating and freeing ~60 MB per layer grows the
    allocator's heap (glibc keeps freed blocks below its mmap threshold), and resident memory with it."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        stack = self.free.get((tuple(shape), dtype))
        return stack.pop() if stack else torch.empty(tuple(shape), dtype=dtype)

    def give_back(self, tensor: torch.Tensor) -> None:
        self.free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)


def _to_meta(module: torch.nn.Module, pool: Optional[BufferPool] = None) -> None:
    """Replace every parameter of `module` by a meta tensor of its shape; its storage goes back to `pool`."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None:
                if pool is not None and not parameter.is_meta:
                    pool.give_back(parameter.detach())
                submodule._parameters[name] = torch.nn.Parameter(
                    torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad
                )


def _rebuild_meta_buffers(model: torch.nn.Module, config) -> None:
    """Non-persistent buffers outside the layers (RoPE tables) are computed at construction: recompute them on CPU."""
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            fresh = type(module)(config=config)  # only RoPE modules hold buffers in these models
            for name, buffer in fresh.named_buffers(recurse=False):
                module._buffers[name] = buffer


class LayerStreamedCausalLM:
    """`model_class(config)` whose decoder layers are read from `directory` only while they run (fp32, eval mode)."""

    def __init__(self, model_class, config, directory: Path, dtype: torch.dtype = torch.float32):
        self.locations = tensor_locations(directory)
        self.dtype = dtype
        with torch.device("meta"):
            self.model = model_class(config)
        _rebuild_meta_buffers(self.model, config)
        self.model.eval()
        self.layers = self.model.model.layers
        self._load_outside_layers(config)
        self.layer_inputs: list[Optional[tuple]] = [None] * len(self.layers)
        self.final_hidden: Optional[torch.Tensor] = None
        self.keep_loaded = False
        self.pool = BufferPool()
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._before_layer(index), with_kwargs=True)
            layer.register_forward_hook(self._after_layer)
        self.model.model.norm.register_forward_pre_hook(self._before_final_norm)

    def _load_outside_layers(self, config) -> None:
        names = [name for name in self.model.state_dict() if not name.startswith(LAYER_PREFIX)]
        tied = getattr(config, "tie_word_embeddings", False)
        wanted = [name for name in names if not (tied and name == "lm_head.weight")]
        self.model.load_state_dict(read_tensors(wanted, self.locations, self.dtype), strict=False, assign=True)
        if tied:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        still_meta = [name for name, parameter in self.model.named_parameters() if parameter.is_meta and not name.startswith(LAYER_PREFIX)]
        if still_meta:
            raise CheckpointError(f"tensors not found in the checkpoint: {still_meta[:3]}")

    def load_layer(self, index: int) -> None:
        layer = self.layers[index]
        prefix = f"{LAYER_PREFIX}{index}."
        names = [prefix + name for name in layer.state_dict()]
        tensors = read_tensors(names, self.locations, self.dtype, self.pool)
        layer.load_state_dict({name[len(prefix):]: tensor for name, tensor in tensors.items()}, strict=True, assign=True)

    def _before_layer(self, index: int):
        def hook(layer, args, kwargs):
            self.layer_inputs[index] = (args, kwargs)
            if next(layer.parameters()).is_meta:
                self.load_layer(index)
        return hook

    def _after_layer(self, layer, args, output):
        if not self.keep_loaded:
            _to_meta(layer, self.pool)

    def _before_final_norm(self, norm, args):
        self.final_hidden = args[0]

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own forward (no cache); layer inputs and the last hidden state are kept for `router_gradient_norm`."""
        return self.model(input_ids, use_cache=False).logits.float()

    def router_gradient_norm(self, input_ids: torch.Tensor) -> float:
        """‖∂ loss / ∂ router parameters‖ of the language-model loss on `input_ids`, after `logits(input_ids)`."""
        if self.final_hidden is None:
            raise RuntimeError("call logits(input_ids) first")
        hidden = self.final_hidden.detach().requires_grad_(True)
        logits = self.model.lm_head(self.model.model.norm(hidden))
        loss = self.model.loss_function(logits=logits, labels=input_ids, vocab_size=self.model.config.vocab_size)
        (gradient,) = torch.autograd.grad(loss, hidden)
        square_sum = 0.0
        self.keep_loaded = True
        try:
            for index in reversed(range(len(self.layers))):
                args, kwargs = self.layer_inputs[index]
                layer_input = args[0].detach().requires_grad_(True)
                output = self.layers[index](layer_input, *args[1:], **kwargs)
                output = output[0] if isinstance(output, tuple) else output
                routers = [p for name, p in self.layers[index].named_parameters() if ".router." in f".{name}"]
                # only what is needed: the layer input's gradient and the routers' (no weight gradients)
                gradient, *router_gradients = torch.autograd.grad(output, [layer_input] + routers, gradient, allow_unused=True)
                square_sum += sum(float(g.double().pow(2).sum()) for g in router_gradients if g is not None)
                _to_meta(self.layers[index], self.pool)
        finally:
            self.keep_loaded = False
        return math.sqrt(square_sum)


def logit_deviation(source_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 64) -> tuple[float, float]:
    """(max |Δlogit|, mean KL(source ‖ converted)) over [B, T, V] logits, in float64, `chunk` tokens at a time."""
    source_logits, logits = source_logits.reshape(-1, source_logits.shape[-1]), logits.reshape(-1, logits.shape[-1])
    max_diff, kl_sum = 0.0, 0.0
    for start in range(0, source_logits.shape[0], chunk):
        source_part, part = source_logits[start : start + chunk], logits[start : start + chunk]
        max_diff = max(max_diff, float((part - source_part).abs().max()))
        source_logp, logp = source_part.double().log_softmax(-1), part.double().log_softmax(-1)
        kl_sum += float((source_logp.exp() * (source_logp - logp)).sum())
    return max_diff, kl_sum / source_logits.shape[0]
