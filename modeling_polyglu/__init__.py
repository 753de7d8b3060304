"""polyglu: activation-mixing feed-forward layers (PolyGLU, DualGLU, Dynamic GEGLU, MoA, LA, GLU variants) for Qwen3-style
models in the Hugging Face stack.

Importing this package registers `PolyGLUConfig` and the models with the transformers Auto classes, so
`AutoModelForCausalLM.from_config(PolyGLUConfig(...))` and `from_pretrained(dir)` work without trust_remote_code.
A saved model also carries these files, so it loads with `trust_remote_code=True` where the package is absent.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .activation_mixing import ACTIVATIONS, mix_activations, mix_activations_naive, mixing_weights
from .configuration_polyglu import FFN_TYPES, PolyGLUConfig
from .modeling_polyglu import (
    PolyGLUCache,
    PolyGLUStaticCache,
    PolyGLUForCausalLM,
    PolyGLUForSequenceClassification,
    PolyGLUMLP,
    PolyGLUModel,
    PolyGLUPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(PolyGLUConfig.model_type, PolyGLUConfig, exist_ok=True)
AutoModel.register(PolyGLUConfig, PolyGLUModel, exist_ok=True)
AutoModelForCausalLM.register(PolyGLUConfig, PolyGLUForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(PolyGLUConfig, PolyGLUForSequenceClassification, exist_ok=True)

# save_pretrained copies these classes' files and writes an auto_map, so checkpoints load with trust_remote_code.
PolyGLUConfig.register_for_auto_class()
PolyGLUModel.register_for_auto_class("AutoModel")
PolyGLUForCausalLM.register_for_auto_class("AutoModelForCausalLM")
PolyGLUForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ACTIVATIONS",
    "FFN_TYPES",
    "PolyGLUCache",
    "PolyGLUStaticCache",
    "PolyGLUConfig",
    "PolyGLUForCausalLM",
    "PolyGLUForSequenceClassification",
    "PolyGLUMLP",
    "PolyGLUModel",
    "PolyGLUPreTrainedModel",
    "mix_activations",
    "mix_activations_naive",
    "mixing_weights",
]
