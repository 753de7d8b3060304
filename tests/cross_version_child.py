"""Child process of the cross-version tests: runs under either transformers version (the suite's or the other venv's).

    python cross_version_child.py save OUT_DIR VARIANTS_JSON   build, save and evaluate tiny models (needs the repo on
                                                              PYTHONPATH: the package is imported from the checkout)
    python cross_version_child.py load OUT_DIR VARIANTS_JSON   load each saved model through trust_remote_code, with
                                                              `modeling_polyglu` made unimportable, and evaluate it

Each model directory OUT_DIR/<name> gets `evaluation-<save|load>.safetensors`: the no-cache logits of fixed
prompts and the greedy continuations generated with and without a KV cache. It prints one JSON line with the
transformers version that ran.
"""

import json
import sys

import torch
from safetensors.torch import save_file

PROMPT_IDS_SEED = 1234
NEW_TOKENS = 10


def prompts(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 8 tokens (0, 2 and 3 pads)."""
    input_ids = torch.randint(3, vocab_size, (3, 8), generator=torch.Generator().manual_seed(PROMPT_IDS_SEED))
    attention_mask = torch.ones_like(input_ids)
    for row, pads in enumerate((0, 2, 3)):
        input_ids[row, :pads] = 0
        attention_mask[row, :pads] = 0
    return input_ids, attention_mask


def evaluate(model) -> dict:
    input_ids, attention_mask = prompts(model.config.vocab_size)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        cached = model.generate(input_ids, attention_mask=attention_mask, use_cache=True, **settings)
        recomputed = model.generate(input_ids, attention_mask=attention_mask, use_cache=False, **settings)
    return {"logits": logits, "cached_tokens": cached, "recomputed_tokens": recomputed}


def save_models(out_dir: str, variants: dict) -> None:
    from tests.utils import tiny_model

    for name, options in variants.items():
        model = tiny_model(seed=7, initializer_range=0.2, **options)
        model.save_pretrained(f"{out_dir}/{name}")
        save_file(evaluate(model), f"{out_dir}/{name}/evaluation-save.safetensors")


def load_models(out_dir: str, variants: dict) -> None:
    sys.modules["modeling_polyglu"] = None  # the package is "not installed": only the remote code can load
    from transformers import AutoModelForCausalLM

    for name in variants:
        model = AutoModelForCausalLM.from_pretrained(f"{out_dir}/{name}", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        save_file(evaluate(model), f"{out_dir}/{name}/evaluation-load.safetensors")


if __name__ == "__main__":
    mode, out_dir, variants = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    {"save": save_models, "load": load_models}[mode](out_dir, variants)
    import transformers

    print(json.dumps({"mode": mode, "transformers": transformers.__version__}))
