"""Statistics of the routing a model actually applies, measured on a fixed probe set.

Unlike the reference's metric (the entropy of softmax(α), blind to the input-dependent term, τ and pooling), these
numbers come from `forward(..., output_routing_weights=True)` in eval mode: the real pooling, the real τ, no noise.

Per layer with a softmax router (polyglu, moa, dualglu), over the real (non-padding) probe tokens and every neuron:
* `entropy`: mean H(p) / ln K (1 = uniform, 0 = one activation per decision);
* `usage_argmax/<act>` and `usage_mean/<act>`: share of argmax choices and mean probability per activation;
* `flip_rate`: share of (token, neuron) argmax choices that changed since the initial snapshot;
* `kl_from_initial`: mean KL(current ‖ initial) of the routing distributions;
* `nonfinite`: count of NaN/inf routing weights;
* polyglu also gets `static_alpha_entropy` — H(softmax(α)) / ln K, the reference's static metric, labelled as such.
Dynamic GEGLU reports its gate (`gate_mean`, `gate_std`, `gate_min`, `gate_max`); LA its coefficients.

Sums are reduced across processes (torch.distributed) before the means are taken, so every rank runs its own probe
shard and all ranks agree on the result. The snapshot for flip rate and KL keeps at most `max_neurons` neurons per
layer (a fixed evenly spaced subset) to stay small.

The probe set itself: `tokenize_probe` turns examples (SFT formats or plain text) into token ids, `probe_batches`
pads them into the batches `RoutingProbe.measure` takes.
"""

import inspect
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

ALERT_KINDS = ("collapse", "flip_rate", "nonfinite")


def _probability_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """H(p) over the last dimension, with 0·log 0 = 0."""
    # p·log(max(p, tiny)) is exactly 0 at p = 0 and ~5× faster on CPU than torch.special.xlogy
    return -(probabilities * probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()).sum(-1)


def _renormalised(probabilities: torch.Tensor) -> torch.Tensor:
    """fp32 distributions from the fp16 snapshot copies, floored so the log stays finite."""
    probabilities = probabilities.float().clamp_min(1e-8)
    return probabilities / probabilities.sum(-1, keepdim=True)


def _neuron_subset(num_neurons: int, max_neurons: int) -> torch.Tensor:
    if num_neurons <= max_neurons:
        return torch.arange(num_neurons)
    return torch.linspace(0, num_neurons - 1, max_neurons).round().long()


@dataclass
class _LayerSums:
    """Running sums for one layer; reduced across ranks as one flat tensor."""

    num_activations: int
    values: dict = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor):
        value = value.detach().double().reshape(-1)
        self.values[name] = self.values[name] + value if name in self.values else value


def unwrap_polyglu_model(model):
    """The PolyGLU PreTrainedModel inside DDP/FSDP/PEFT wrappers (duck-typed: remote-code classes count too)."""
    seen = 0
    while seen < 8:
        seen += 1
        # the class, not the instance: PEFT wrappers forward attribute lookups to the model they wrap
        if hasattr(type(model), "set_routing_tau") and getattr(getattr(model, "config", None), "model_type", None) == "polyglu":
            return model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            break
    raise ValueError(f"{type(model).__name__} is not a PolyGLU-family model (config.model_type must be 'polyglu').")


def tensor_parallel_size(model) -> int:
    """Ranks in `model`'s tensor-parallel group (transformers' `tp_size`; 1 without tensor parallelism)."""
    return getattr(model, "tp_size", None) or 1


def tensor_parallel_copies(base) -> list[int]:
    """Per layer, how many ranks of the tensor-parallel group measure the same routing weights (1 without TP).

    PolyGLU's α is split on d_ff, so each rank sees its own neurons and the summed counts are whole; a token-level
    router's weights are the same on every rank of the group, so its counts are summed `tp_size` times. Shares and
    means are ratios of two such sums and need no correction; absolute counts (NaN/inf) are divided by this.
    """
    tensor_parallel = tensor_parallel_size(base)
    copies = []
    for layer in base.model.layers:
        alpha = getattr(getattr(layer.mlp, "router", None), "alpha", None)
        copies.append(1 if alpha is not None and hasattr(alpha, "device_mesh") else tensor_parallel)
    return copies


def layer_kinds(model) -> list[Optional[str]]:
    """Per decoder layer: 'softmax', 'linear_coefficients', 'gate' or None (fixed activation)."""
    base = unwrap_polyglu_model(model)
    kinds = []
    for layer in base.model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "router"):
            kinds.append(None)
        elif mlp.normalization == "softmax":
            kinds.append("softmax")
        elif mlp.ffn_type == "dynamic_geglu":
            kinds.append("gate")
        else:
            kinds.append("linear_coefficients")
    return kinds


class RoutingProbe:
    """Measures routing statistics of a model on fixed batches, optionally against an initial snapshot."""

    def __init__(self, max_neurons: int = 256):
        self.max_neurons = max_neurons

    @torch.no_grad()
    def measure(self, model, batches: Iterable[dict], snapshot: Optional[dict] = None):
        """Return (metrics, snapshot_of_this_measurement). `batches` yield input_ids / attention_mask tensors."""
        base = unwrap_polyglu_model(model)
        kinds = layer_kinds(base)
        activations = [tuple(layer.mlp.activations) for layer in base.model.layers]
        # the routing is all the probe reads: a causal LM head computes one position's logits, not the whole probe's
        head_arguments = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        was_training = model.training
        model.eval()
        sums = [_LayerSums(len(acts)) for acts in activations]
        new_snapshot = {}
        token_offset = 0
        try:
            for batch in batches:
                device = next(base.parameters()).device
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch.get("attention_mask")
                attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_routing_weights=True,
                                use_cache=False, **head_arguments)
                real = attention_mask.bool()
                for index, (kind, weights) in enumerate(zip(kinds, outputs.routing_weights)):
                    if kind is None or weights is None:
                        continue
                    selected = weights[real].float()  # [N, K] or [N, F, K] or [N, 1]
                    if kind == "softmax":
                        self._softmax_layer(index, selected, sums[index], snapshot, new_snapshot, token_offset)
                    elif kind == "gate":
                        self._gate_layer(selected, sums[index])
                    else:
                        sums[index].add("coefficients", selected[0])
                        sums[index].add("coefficient_count", torch.ones(()))
                token_offset += int(real.sum())
        finally:
            model.train(was_training)
        metrics = self._finish(base, kinds, activations, sums, tensor_parallel_copies(base))
        return metrics, new_snapshot

    def _softmax_layer(self, index, probabilities, sums, snapshot, new_snapshot, token_offset):
        if probabilities.dim() == 2:
            probabilities = probabilities.unsqueeze(1)  # [N, 1, K]: one decision per token
        num_tokens, num_neurons, k = probabilities.shape
        # probabilities sum to at most N·F: a finite total means every weight is finite (the common, cheap case)
        finite_total = bool(probabilities.sum().isfinite())
        nonfinite = 0 if finite_total else probabilities.numel() - int(torch.isfinite(probabilities).sum())
        sums.add("nonfinite", torch.tensor(float(nonfinite)))
        if nonfinite:
            probabilities = torch.nan_to_num(probabilities, nan=0.0, posinf=0.0, neginf=0.0)
        choices = probabilities.argmax(-1)
        sums.add("decisions", torch.tensor(float(num_tokens * num_neurons)))
        sums.add("entropy", _probability_entropy(probabilities).sum())
        sums.add("usage_argmax", torch.bincount(choices.reshape(-1), minlength=k))
        sums.add("usage_mean", probabilities.sum((0, 1)))
        subset = _neuron_subset(num_neurons, self.max_neurons).to(probabilities.device)
        kept_probabilities = probabilities[:, subset].to(torch.float16)
        kept_choices = choices[:, subset].to(torch.uint8)
        key = f"layer_{index}"
        new_snapshot.setdefault(f"{key}.choices", []).append(kept_choices.cpu())
        new_snapshot.setdefault(f"{key}.probabilities", []).append(kept_probabilities.cpu())
        if snapshot is not None and f"{key}.choices" in snapshot:
            start, stop = token_offset, token_offset + num_tokens
            initial_choices = snapshot[f"{key}.choices"][start:stop].to(kept_choices.device)
            initial_probabilities = snapshot[f"{key}.probabilities"][start:stop].to(probabilities.device).float()
            if initial_choices.shape != kept_choices.shape:
                raise ValueError(
                    f"The routing snapshot does not match the probe set (layer {index}: {tuple(initial_choices.shape)} "
                    f"vs {tuple(kept_choices.shape)}); delete it to start a new baseline."
                )
            current, initial = _renormalised(kept_probabilities), _renormalised(initial_probabilities)
            sums.add("flips", (initial_choices != kept_choices).sum())
            sums.add("compared", torch.tensor(float(kept_choices.numel())))
            kl = (current * (current.log() - initial.log())).sum(-1).clamp_min(0.0)  # ≥ 0 up to fp16 rounding
            sums.add("kl", kl.sum())

    @staticmethod
    def _gate_layer(gates, sums):
        gates = gates.reshape(-1)
        sums.add("gate_count", torch.tensor(float(gates.numel())))
        sums.add("gate_sum", gates.sum())
        sums.add("gate_square_sum", (gates * gates).sum())
        sums.add("gate_min_negated", -gates.min())
        sums.add("gate_max", gates.max())

    @staticmethod
    def _all_reduce(sums: list[_LayerSums]):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for layer in sums:
            for name in sorted(layer.values):
                value = layer.values[name]
                op = dist.ReduceOp.MAX if name in ("gate_min_negated", "gate_max") else dist.ReduceOp.SUM
                device = "cuda" if dist.get_backend() == "nccl" else "cpu"
                reduced = value.to(device, torch.float64)
                dist.all_reduce(reduced, op=op)
                layer.values[name] = reduced.cpu()

    def _finish(self, base, kinds, activations, sums, copies) -> dict:
        self._all_reduce(sums)
        metrics, entropies, flips, kls, nonfinite, static = {}, [], [], [], 0.0, []
        for index, (kind, acts, layer_sums) in enumerate(zip(kinds, activations, sums)):
            values = {name: value for name, value in layer_sums.values.items()}
            prefix = f"routing/layer_{index}"
            if kind == "softmax" and values.get("decisions") is not None:
                decisions = float(values["decisions"])
                entropy = float(values["entropy"]) / decisions / math.log(len(acts)) if len(acts) > 1 else 0.0
                metrics[f"{prefix}/entropy"] = entropy
                entropies.append(entropy)
                for k, name in enumerate(acts):
                    metrics[f"{prefix}/usage_argmax/{name}"] = float(values["usage_argmax"][k]) / decisions
                    metrics[f"{prefix}/usage_mean/{name}"] = float(values["usage_mean"][k]) / decisions
                metrics[f"{prefix}/nonfinite"] = float(values["nonfinite"]) / copies[index]
                nonfinite += metrics[f"{prefix}/nonfinite"]
                if "compared" in values:
                    metrics[f"{prefix}/flip_rate"] = float(values["flips"]) / float(values["compared"])
                    metrics[f"{prefix}/kl_from_initial"] = float(values["kl"]) / float(values["compared"])
                    flips.append(metrics[f"{prefix}/flip_rate"])
                    kls.append(metrics[f"{prefix}/kl_from_initial"])
                router = base.model.layers[index].mlp.router
                if hasattr(router, "alpha"):
                    from .engines import full_parameter  # the whole α: gathered under ZeRO-3, FSDP2 and TP

                    alpha_probabilities = torch.softmax(full_parameter(router.alpha).float(), -1)
                    value = float(_probability_entropy(alpha_probabilities).mean()) / math.log(len(acts))
                    metrics[f"{prefix}/static_alpha_entropy"] = value
                    static.append(value)
            elif kind == "gate" and values.get("gate_count") is not None:
                count = float(values["gate_count"])
                mean = float(values["gate_sum"]) / count
                metrics[f"{prefix}/gate_mean"] = mean
                metrics[f"{prefix}/gate_std"] = math.sqrt(max(float(values["gate_square_sum"]) / count - mean * mean, 0.0))
                metrics[f"{prefix}/gate_min"] = -float(values["gate_min_negated"])
                metrics[f"{prefix}/gate_max"] = float(values["gate_max"])
            elif kind == "linear_coefficients" and values.get("coefficient_count") is not None:
                count = float(values["coefficient_count"])
                for k, name in enumerate(acts):
                    metrics[f"{prefix}/coefficient/{name}"] = float(values["coefficients"][k]) / count
        for name, series in (("entropy", entropies), ("flip_rate", flips), ("kl_from_initial", kls), ("static_alpha_entropy", static)):
            if series:
                metrics[f"routing/{name}"] = sum(series) / len(series)
        if entropies:
            metrics["routing/nonfinite"] = nonfinite
        return metrics


def concatenate_snapshot(snapshot: dict) -> dict:
    """Join the per-batch pieces of a snapshot into one tensor per key (for saving)."""
    return {key: torch.cat(pieces, dim=0) if isinstance(pieces, list) else pieces for key, pieces in snapshot.items()}


def routing_alerts(metrics: dict, initial: dict, collapse_threshold: float = 0.99, flip_rate_threshold: float = 0.5) -> list[tuple[str, str]]:
    """(kind, message) for each alarming change: a layer newly collapsed onto one activation, many flips, NaN/inf."""
    alerts = []
    layers = sorted({key.split("/")[1] for key in metrics if key.startswith("routing/layer_")}, key=lambda s: int(s.split("_")[1]))
    for layer in layers:
        if metrics.get(f"routing/{layer}/nonfinite", 0.0) > 0:
            # NaN weights are counted as zeros, whose argmax is the first activation: no collapse or flips from them
            alerts.append(("nonfinite", f"{layer}: {int(metrics[f'routing/{layer}/nonfinite'])} NaN/inf routing weights"))
            continue
        shares = {key.rsplit("/", 1)[1]: value for key, value in metrics.items() if key.startswith(f"routing/{layer}/usage_argmax/")}
        if shares:
            name, share = max(shares.items(), key=lambda item: item[1])
            initial_share = initial.get(f"routing/{layer}/usage_argmax/{name}", 0.0)
            if share >= collapse_threshold and initial_share < collapse_threshold:
                alerts.append(("collapse", f"{layer} collapsed onto {name}: {share:.1%} of its routing decisions (was {initial_share:.1%})"))
        flip_rate = metrics.get(f"routing/{layer}/flip_rate")
        if flip_rate is not None and flip_rate > flip_rate_threshold:
            alerts.append(("flip_rate", f"{layer}: {flip_rate:.1%} of routing decisions changed since the start"))
    return alerts


def tokenize_probe(examples, tokenizer, max_length: int = 512) -> list[list[int]]:
    """Token ids of probe examples: conversational `messages` through the chat template, else a `text` field."""
    token_lists = []
    for example in examples:
        if "messages" in example:
            ids = tokenizer.apply_chat_template(example["messages"], tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        elif "prompt" in example and "completion" in example:
            ids = tokenizer(_as_text(example["prompt"], tokenizer) + _as_text(example["completion"], tokenizer)).input_ids
        elif "text" in example:
            ids = tokenizer(example["text"]).input_ids
        else:
            raise ValueError(f"Probe examples need 'messages', 'prompt'/'completion' or 'text'; got keys {sorted(example)}.")
        token_lists.append(list(ids)[:max_length])
    return token_lists


def _as_text(value, tokenizer) -> str:
    if isinstance(value, str):
        return value
    return tokenizer.apply_chat_template(value, tokenize=False)


def probe_batches(token_lists: list[list[int]], batch_size: int, pad_token_id: int) -> list[dict]:
    """Right-padded batches with attention masks."""
    batches = []
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start : start + batch_size]
        length = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches
