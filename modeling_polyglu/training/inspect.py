"""`polyglu inspect DIR`: the applied-routing statistics and plots of any saved checkpoint.

Works for every PolyGLU-family checkpoint, imported PolychromaticLM ones included: it measures what the model does in
eval mode (real pooling, real τ, no noise) on probe text — `--text FILE` (one example per line), `--dataset` (a
local JSONL file in the SFT formats, or a Hub dataset name), or a built-in paragraph — and writes
`routing_report.json` and `routing_usage_heatmap.png` (where matplotlib is installed) to `--output-dir` (default:
DIR/routing_inspect).
"""

from pathlib import Path
from typing import Optional

from .reports import per_layer_lines, plots_available, write_routing_report
from .safeguards import reject_directory_without_tokenizer, reject_missing_local_checkpoint
from .routing_stats import RoutingProbe, probe_batches, tokenize_probe, unwrap_polyglu_model

BUILT_IN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "def add(a, b):\n    return a + b",
    "Question: what is 17 + 25? Answer: 42.",
]


def probe_examples(text_file: Optional[str] = None, dataset: Optional[str] = None, limit: int = 64) -> list[dict]:
    if text_file:
        if not Path(text_file).is_file():
            raise ValueError(f"--text {text_file}: no such file; pass a text file with one probe example per line.")
        lines = [line for line in Path(text_file).read_text().splitlines() if line.strip()]
        return [{"text": line} for line in lines[:limit]]
    if dataset:
        from .sft import load_training_dataset

        split = load_training_dataset(dataset, flag="--dataset")["train"]
        return [split[i] for i in range(min(limit, len(split)))]
    return [{"text": text} for text in BUILT_IN_TEXT]


def inspect_checkpoint(
    model_dir, text_file=None, dataset=None, output_dir=None, limit: int = 64, batch_size: int = 8, max_length: int = 512,
    trust_remote_code: bool = False, log=print,
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_polyglu  # noqa: F401  registers the Auto classes

    reject_missing_local_checkpoint(str(model_dir), hub_allowed=False)
    reject_directory_without_tokenizer(model_dir, "the probe text")
    examples = probe_examples(text_file, dataset, limit)  # bad probe input fails before the model is loaded
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code).eval()
    unwrap_polyglu_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    token_lists = tokenize_probe(examples, tokenizer, max_length)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    metrics, _ = RoutingProbe().measure(model, probe_batches(token_lists, batch_size, pad_token_id))
    destination = Path(output_dir) if output_dir else Path(model_dir) / "routing_inspect"
    written = write_routing_report(
        destination,
        [{"step": None, "metrics": metrics}],
        {"model": str(model_dir), "probe_examples": len(token_lists), "routing_tau": model.config.routing_tau,
         "routing_pooling": model.config.routing_pooling},
    )
    overall = {key: value for key, value in metrics.items() if key.count("/") == 1}
    log(f"{model_dir}: " + ", ".join(f"{key.split('/')[1]} {value:.4f}" for key, value in overall.items()))
    for line in per_layer_lines(metrics):
        log("  " + line)
    for name, path in written.items():
        log(f"  {name}: {path}")
    if not plots_available():
        log("  heatmap: not drawn, matplotlib is not installed (pip install matplotlib)")
    return {"metrics": metrics, "written": written}
