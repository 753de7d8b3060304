"""Model cards (README.md with Hub metadata) for checkpoints this package writes."""

from pathlib import Path

from ..configuration_polyglu import PolyGLUConfig


def _ffn_types(config: PolyGLUConfig) -> list[str]:
    return sorted({config.ffn_type_of_layer(i) for i in range(config.num_hidden_layers)})


def write_model_card(directory: Path, base_model: str, config: PolyGLUConfig, title: str, summary: str) -> None:
    """README.md with YAML metadata (base_model, library_name, tags, pipeline_tag) and loading instructions."""
    tags = ["polyglu", "custom_code", "text-generation"] + [f"ffn-{ffn}" for ffn in _ffn_types(config)]
    front_matter = "\n".join(
        ["---", f"base_model: {base_model}", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
        + [f"- {tag}" for tag in tags]
        + ["---"]
    )
    body = f"""
# {title}

{summary}

## Loading

This repository carries its own model code (`modeling_polyglu.py`, `configuration_polyglu.py`,
`activation_mixing.py`, `cpu_mixing_kernel.py`), so it loads without installing anything beyond transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("REPO_OR_PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("REPO_OR_PATH")
```

`trust_remote_code=True` runs the Python files of this repository. Pin the revision you have read, so a later
push cannot change the code you execute: `from_pretrained("REPO", trust_remote_code=True, revision="<commit sha>")`.
With the `polyglu` package installed (`import modeling_polyglu`), the installed code is used instead.

## Configuration

| setting | value |
|---|---|
| ffn types | {", ".join(_ffn_types(config))} |
| layers | {config.num_hidden_layers} |
| hidden / intermediate size | {config.hidden_size} / {config.intermediate_size} |
| routing pooling | {config.routing_pooling} |
| routing τ | {config.routing_tau} |
| activations | {", ".join(config.activations)} |
"""
    (Path(directory) / "README.md").write_text(front_matter + "\n" + body)
