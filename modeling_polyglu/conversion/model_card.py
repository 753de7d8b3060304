"""Model cards (README.md with Hub metadata) for checkpoints this package writes."""

import re
from pathlib import Path
from typing import Optional

from ..configuration_polyglu import PolyGLUConfig
from .staging import write_text_atomically


def _ffn_types(config: PolyGLUConfig) -> list[str]:
    return sorted({config.ffn_type_of_layer(i) for i in range(config.num_hidden_layers)})


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_of(name_or_path) -> Optional[str]:
    """The Hub repo id a model came from: the id itself, or read from a Hub cache path (models--owner--name/...).

    A local folder name is not a valid `base_model` on push, so local sources without a Hub origin give None.
    """
    text = str(name_or_path or "")
    if not text:
        return None
    if HUB_ID.match(text) and not Path(text).exists():
        return text
    for part in Path(text).resolve().parts if Path(text).exists() else ():
        if part.startswith("models--") and part.count("--") >= 2:
            owner, name = part[len("models--"):].split("--", 1)
            return f"{owner}/{name}"
    return None


# which settings a variant reads: pooling only PolyGLU's router, τ every softmax router, the dictionary the mixers
POOLED_TYPES = {"polyglu"}
SOFTMAX_TYPES = {"polyglu", "moa", "dualglu"}
DICTIONARY_TYPES = {"polyglu", "moa", "la"}


def _variant_rows(config: PolyGLUConfig) -> str:
    """Configuration rows that apply to the model's ffn types only (a MoA model has no routing pooling)."""
    types = set(_ffn_types(config))
    rows = []
    if types & POOLED_TYPES:
        rows.append(f"| routing pooling | {config.routing_pooling} |")
    if types & SOFTMAX_TYPES:
        rows.append(f"| routing τ | {config.routing_tau} |")
    if types & DICTIONARY_TYPES:
        rows.append(f"| activations | {', '.join(config.activations)} |")
    return "".join(row + "\n" for row in rows)


def write_model_card(directory: Path, base_model: Optional[str], config: PolyGLUConfig, title: str, summary: str) -> None:
    """README.md with YAML metadata (base_model, library_name, tags, pipeline_tag) and loading instructions.

    `base_model=None` (a model trained from scratch) leaves base_model out of the metadata.
    """
    tags = ["polyglu", "custom_code", "text-generation"] + [f"ffn-{ffn}" for ffn in _ffn_types(config)]
    front_matter = "\n".join(
        ["---"] + ([f"base_model: {base_model}"] if base_model else []) + ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
        + [f"- {tag}" for tag in tags]
        + ["---"]
    )
    body = f"""
# {title}

{summary}

## Loading

This repository carries its own model code (`modeling_polyglu.py`, `configuration_polyglu.py`,
`activation_mixing.py`, `cpu_mixing_kernel.py`, `triton_mixing_kernel.py`), so it loads without installing anything
beyond transformers (the GPU kernel uses triton where it is installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("REPO_OR_PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("REPO_OR_PATH", trust_remote_code=True)
```

The tokenizer is a standard one, but `AutoTokenizer` reads `config.json`, whose model type this repository's code
defines: without `trust_remote_code=True` it stops to ask. `trust_remote_code=True` runs the Python files of this repository. Pin the revision you have read, so a later
push cannot change the code you execute: `from_pretrained("REPO", trust_remote_code=True, revision="<commit sha>")`.
With the `polyglu` package installed (`import modeling_polyglu`), the installed code is used instead.

## Configuration

| setting | value |
|---|---|
| ffn types | {", ".join(_ffn_types(config))} |
| layers | {config.num_hidden_layers} |
| hidden / intermediate size | {config.hidden_size} / {config.intermediate_size} |
{_variant_rows(config)}"""
    write_text_atomically(Path(directory) / "README.md", front_matter + "\n" + body)  # also into a finished sft output
