"""Retrofit a transformers Qwen3 checkpoint into a PolyGLU-family checkpoint, shard by shard.

Qwen3 tensors keep their names (the backbone and `gate_proj`/`up_proj`/`down_proj` are shared), so conversion copies
them and adds each converted layer's `mlp.router.*` tensors, initialised to prefer SiLU for every input: the
converted model starts from (almost) the source function while the routing can still learn. The model is never
instantiated during conversion; peak memory is about one source shard. Verification (optional) runs transformers'
Qwen3 and the converted model one decoder layer at a time (layer_streaming.py) and measures the deviation and the
gradient that reaches the routers; its peak is the fp32 embeddings and head plus one layer.
"""

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .staging import atomic_directory
from .checkpoint_io import (
    CheckpointError,
    copy_tokenizer_and_generation_config,
    iter_shard_tensors,
    read_json,
    safetensors_shards,
    shard_header,
    write_config_and_remote_code,
    write_index,
    write_shard,
)
from ..configuration_polyglu import FFN_TYPES, PolyGLUConfig
from .model_card import hub_id_of, write_model_card
from ..modeling_polyglu import mixer_spec

QWEN3_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "use_cache",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
)

PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers that changed "
    "physics. def add(a, b):\n    return a + b\nQuestion: what is 17 + 25? Answer: 42."
)

# variants that compute SwiGLU exactly once their router prefers silu
FUNCTION_PRESERVING = {"swiglu", "polyglu", "moa", "dualglu", "la"}


@dataclass
class ConversionReport:
    destination: Path
    converted_layers: list[int]
    ffn_type: str
    warnings: list[str] = field(default_factory=list)
    max_abs_logit_diff: Optional[float] = None
    mean_kl: Optional[float] = None
    router_grad_norm: Optional[float] = None
    probe_tokens: Optional[int] = None


def parse_layers(spec: Optional[str], num_layers: int) -> list[int]:
    """'all' (default), 'top:N', 'bottom:N', or a comma list of indices and ranges like '0,2,10-13'."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    try:
        if spec.startswith(("top:", "bottom:")):
            where, count = spec.split(":")
            count = int(count)
            if not 0 < count <= num_layers:
                raise ValueError
            return list(range(num_layers - count, num_layers)) if where == "top" else list(range(count))
        layers = set()
        for part in spec.split(","):
            if "-" in part:
                first, last = (int(value) for value in part.split("-"))
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise CheckpointError(
            f"--layers {spec!r}: expected 'all', 'top:N', 'bottom:N' (1 <= N <= {num_layers}) or indices like '0,2,10-13'"
        ) from None
    outside = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if outside:
        raise CheckpointError(f"--layers {spec!r}: layers {outside} do not exist (the model has {num_layers})")
    return sorted(layers)


def qwen3_source_config(source: Path) -> dict:
    config = read_json(source / "config.json", "not a transformers checkpoint directory")
    model_type = config.get("model_type")
    if model_type != "qwen3":
        raise CheckpointError(f"{source / 'config.json'}: model_type is {model_type!r}, expected 'qwen3'")
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{source / 'config.json'}: sliding-window attention is not supported")
    return config


def expected_qwen3_shapes(config: PolyGLUConfig) -> dict[str, tuple]:
    """Every tensor a Qwen3 checkpoint with these dims holds (lm_head only when untied)."""
    d, hidden, ff = config.head_dim, config.hidden_size, config.intermediate_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes.update(
            {
                f"{layer}.input_layernorm.weight": (hidden,),
                f"{layer}.post_attention_layernorm.weight": (hidden,),
                f"{layer}.self_attn.q_proj.weight": (q_rows, hidden),
                f"{layer}.self_attn.k_proj.weight": (kv_rows, hidden),
                f"{layer}.self_attn.v_proj.weight": (kv_rows, hidden),
                f"{layer}.self_attn.o_proj.weight": (hidden, q_rows),
                f"{layer}.self_attn.q_norm.weight": (d,),
                f"{layer}.self_attn.k_norm.weight": (d,),
                f"{layer}.mlp.gate_proj.weight": (ff, hidden),
                f"{layer}.mlp.up_proj.weight": (ff, hidden),
                f"{layer}.mlp.down_proj.weight": (hidden, ff),
            }
        )
        if config.attention_bias:
            shapes.update(
                {
                    f"{layer}.self_attn.q_proj.bias": (q_rows,),
                    f"{layer}.self_attn.k_proj.bias": (kv_rows,),
                    f"{layer}.self_attn.v_proj.bias": (kv_rows,),
                    f"{layer}.self_attn.o_proj.bias": (hidden,),
                }
            )
    return shapes


def _validate_source_tensors(shards: Sequence[Path], config: PolyGLUConfig) -> None:
    """Check names and shapes from the shard headers: every expected tensor once, nothing else."""
    expected = expected_qwen3_shapes(config)
    located = set()
    for shard in shards:
        shapes, _ = shard_header(shard)
        for name, shape in shapes.items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                expected_shape = (config.vocab_size, config.hidden_size)  # some tied checkpoints store it anyway
            elif name not in expected:
                raise CheckpointError(f"{shard}: unexpected tensor {name!r} — not a Qwen3 checkpoint of this config")
            else:
                expected_shape = expected[name]
            if shape != expected_shape:
                raise CheckpointError(f"{shard}: tensor {name!r} has shape {list(shape)}, config says {list(expected_shape)}")
            located.add(name)
    missing = [name for name in expected if name not in located]
    if missing:
        raise CheckpointError(f"{shards[0].parent}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")


def polyglu_config_from_qwen3(
    source_config: dict, ffn_type: str, layers: Sequence[int], router_init_activation: Optional[str], strength: float
) -> PolyGLUConfig:
    values = {key: source_config[key] for key in QWEN3_CONFIG_KEYS if key in source_config}
    dtype = source_config.get("dtype", source_config.get("torch_dtype"))
    if dtype is not None:
        values["dtype"] = dtype
    num_layers = source_config["num_hidden_layers"]
    ffn_types = None
    if len(layers) != num_layers:
        ffn_types = ["swiglu"] * num_layers
        for layer in layers:
            ffn_types[layer] = ffn_type
    return PolyGLUConfig(
        **values,
        ffn_type=ffn_type,
        ffn_types=ffn_types,
        router_init_activation=router_init_activation,
        router_init_strength=strength,
    )


def router_tensors(config: PolyGLUConfig, layer: int, seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialised router tensors of one layer, fp32 (the model keeps routers fp32)."""
    activations, router_class, _, _ = mixer_spec(config, config.ffn_type_of_layer(layer))
    if router_class is None:
        return {}
    torch.manual_seed(seed + layer)
    router = router_class(config, activations)
    router.initialize_parameters(config.initializer_range)
    return {f"model.layers.{layer}.mlp.router.{name}": tensor.detach().float() for name, tensor in router.state_dict().items()}


def _preservation_warnings(ffn_type: str, config: PolyGLUConfig) -> list[str]:
    notes = []
    if ffn_type not in FUNCTION_PRESERVING:
        notes.append(
            f"ffn_type={ffn_type!r} cannot reproduce SwiGLU (different activation or gating); the converted model "
            "starts from a different function — see the measured deviation."
        )
    elif ffn_type in ("moa", "la") and config.mixer_form == "plain":
        notes.append(f"{ffn_type} with mixer_form='plain' drops gate_proj; the source function is not preserved.")
    elif ffn_type != "swiglu" and config.router_init_activation != "silu":
        notes.append("router_init_activation is not 'silu': the converted model does not start from SwiGLU.")
    return notes


def convert_qwen3(
    source,
    destination,
    ffn_type: str,
    layers: Optional[str] = None,
    router_init_activation: Optional[str] = "silu",
    router_init_strength: float = 8.0,
    verify: bool = True,
    probe_file: Optional[str] = None,
    overwrite: bool = False,
    seed: int = 0,
    config_overrides: Optional[dict] = None,
    log=print,
) -> ConversionReport:
    """Convert the Qwen3 checkpoint directory `source` into a PolyGLU-family checkpoint at `destination`."""
    source, destination = Path(source), Path(destination)
    if ffn_type not in FFN_TYPES:
        raise CheckpointError(f"--ffn-type {ffn_type!r} is not supported; choose one of {', '.join(FFN_TYPES)}")
    if verify and probe_file is not None and not Path(probe_file).is_file():  # before the shards, not after them
        raise CheckpointError(f"--probe-file {probe_file}: no such file; pass a text file to measure the deviation "
                              "on, or leave it out for the built-in text.")
    source_config = qwen3_source_config(source)
    converted = parse_layers(layers, source_config["num_hidden_layers"])
    config = polyglu_config_from_qwen3(source_config, ffn_type, converted, router_init_activation, router_init_strength)
    if config_overrides:
        config = PolyGLUConfig(**{**config.to_dict(), **config_overrides})
    for layer in converted:  # every converted router must be able to honour the preference
        mixer_spec(config, config.ffn_type_of_layer(layer))
    shards = safetensors_shards(source)
    _validate_source_tensors(shards, config)
    report = ConversionReport(destination, converted, ffn_type, warnings=_preservation_warnings(ffn_type, config))
    for note in report.warnings:
        log(f"warning: {note}")

    drops_gate = {layer for layer in converted if not _is_gated(config, layer)}
    routers_pending = set(converted)
    with atomic_directory(destination, overwrite=overwrite, sources=(source,)) as staging:
        weight_map, total_bytes = {}, 0
        progress = tqdm(shards, desc="Converting shards", unit="shard", disable=len(shards) < 2)
        for shard_index, shard in enumerate(progress):
            tensors = {}
            for name, tensor in iter_shard_tensors(shard):
                layer = _layer_of(name)
                if layer in drops_gate and name.endswith("mlp.gate_proj.weight"):
                    continue
                tensors[name] = tensor
                if name.endswith("mlp.up_proj.weight") and layer in routers_pending:
                    tensors.update(router_tensors(config, layer, seed))
                    routers_pending.discard(layer)
            out_name = shard.name if len(shards) > 1 else "model.safetensors"
            write_shard(tensors, staging / out_name)
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, out_name))
            del tensors
        if len(shards) > 1:
            write_index(weight_map, total_bytes, staging)
        write_config_and_remote_code(config, staging)
        copied = copy_tokenizer_and_generation_config(source, staging)
        log(f"Wrote {len(weight_map)} tensors ({total_bytes / 2**20:.1f} MiB); copied {', '.join(copied) or 'no tokenizer files'}.")
        if verify:
            _verify(source, staging, report, probe_file, log)
        write_model_card(
            staging,
            base_model=hub_id_of(source) or hub_id_of(source_config.get("_name_or_path")),
            config=config,
            title=f"{source.name} retrofitted to {ffn_type}",
            summary=_qwen3_card_summary(report, config),
        )
    log(f"Saved {destination.resolve()}")
    return report


def _is_gated(config: PolyGLUConfig, layer: int) -> bool:
    return mixer_spec(config, config.ffn_type_of_layer(layer))[3]


def _layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def probe_input_ids(model_dir: Path, probe_file: Optional[str], vocab_size: int) -> torch.Tensor:
    """Token ids of the probe text (the source tokenizer if present, else seeded random ids)."""
    text = Path(probe_file).read_text() if probe_file else PROBE_TEXT
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
        if ids.numel() and int(ids.max()) < vocab_size:
            return ids
    except (OSError, ValueError, TypeError):
        pass
    return torch.randint(0, vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))


def _verify(source: Path, converted: Path, report: ConversionReport, probe_file, log) -> None:
    """Deviation and router gradient against transformers' own Qwen3, one decoder layer in memory at a time."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ..modeling_polyglu import PolyGLUForCausalLM
    from .layer_streaming import LayerStreamedCausalLM, logit_deviation

    source_config = Qwen3Config.from_pretrained(str(source))
    input_ids = probe_input_ids(source, probe_file, source_config.vocab_size)
    source_model = LayerStreamedCausalLM(Qwen3ForCausalLM, source_config, source)
    source_logits = source_model.logits(input_ids)
    del source_model
    gc.collect()  # its layer hooks make a reference cycle: free its embeddings before the converted model loads
    converted_model = LayerStreamedCausalLM(PolyGLUForCausalLM, PolyGLUConfig.from_pretrained(str(converted)), converted)
    report.max_abs_logit_diff, report.mean_kl = logit_deviation(source_logits, converted_model.logits(input_ids))
    report.router_grad_norm = converted_model.router_gradient_norm(input_ids)
    report.probe_tokens = input_ids.shape[1]
    log(
        f"Verification on {report.probe_tokens} probe tokens: max |Δlogit| = {report.max_abs_logit_diff:.3e}, "
        f"mean KL = {report.mean_kl:.3e}, router gradient norm = {report.router_grad_norm:.3e}"
    )


def _qwen3_card_summary(report: ConversionReport, config: PolyGLUConfig) -> str:
    lines = [
        f"Converted from a Qwen3 checkpoint: layers {report.converted_layers} now use `ffn_type={report.ffn_type!r}`; "
        "every other tensor is copied unchanged.",
        f"Routers were initialised to prefer `{config.router_init_activation}` "
        f"(strength {config.router_init_strength}) so the model starts near the source function.",
    ]
    if report.max_abs_logit_diff is not None:
        lines.append(
            f"\nMeasured against the source on {report.probe_tokens} probe tokens (fp32): max |Δlogit| = "
            f"{report.max_abs_logit_diff:.3e}, mean KL = {report.mean_kl:.3e}, router gradient norm = "
            f"{report.router_grad_norm:.3e}."
        )
    else:
        lines.append("\nVerification was skipped (`--no-verify`).")
    lines += [f"\nWarning: {note}" for note in report.warnings]
    return "\n".join(lines)
