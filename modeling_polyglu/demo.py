"""`polyglu demo`: the whole pipeline on an embedded default, with no download.

1. Builds a small Qwen3 base model with a character tokenizer trained locally (ChatML chat template) and pretrains it
   for a moment on addition facts ("12+7=19") — or takes `--base-model`, any Qwen3 checkpoint.
2. Retrofits it to PolyGLU (`convert qwen3`), measuring the deviation from the base model.
3. Fine-tunes it with `polyglu sft` on generated chat dialogues ("what is 12+7?" → "19"), with the routing monitor.
4. Loads the result in a fresh process with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
   (the package made unimportable), answers held-out questions with the KV cache, and prints loss and accuracy
   before/after, the routing summary and where the report and plots are.

The held-out questions are facts the base model saw only in its pretraining format, never as dialogues: the
accuracy before SFT is what the retrofitted base model answers in chat format, after SFT what it has learned.
"""

import json
import random
import time
from pathlib import Path
from typing import Optional

import torch

from .conversion.staging import atomic_directory, is_model_directory, write_text_atomically
from .char_tokenizer import build_chat_tokenizer
from .conversion.qwen3 import convert_qwen3
from .conversion.remote_code import generate_in_fresh_process

OPERAND_MAX = 20
BASE_DIMS = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, max_position_embeddings=128)


def all_facts() -> list[tuple[int, int]]:
    return [(a, b) for a in range(OPERAND_MAX + 1) for b in range(OPERAND_MAX + 1)]


def split_facts(seed: int, held_out: int = 40):
    facts = all_facts()
    random.Random(seed).shuffle(facts)
    return facts[held_out:], facts[:held_out]


def dialogue(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}


def build_base_model(directory: Path, seed: int, steps: int, log) -> None:
    """Pretrain a tiny transformers Qwen3 on every addition fact as plain text; save it with its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer(["0123456789+=? whatis"])
    config = Qwen3Config(
        vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **BASE_DIMS,
    )
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng, facts = random.Random(seed), all_facts()
    model.train()
    for step in range(steps):
        texts = [f"{tokenizer.bos_token}{a}+{b}={a + b}{tokenizer.eos_token}" for a, b in rng.sample(facts, 48)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def dialogue_loss(model_dir: Path, dialogues: list[dict]) -> float:
    """Mean assistant-token loss of `dialogues` (what SFT optimises), in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    losses = []
    with torch.no_grad():
        for example in dialogues:
            encoded = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
            input_ids = torch.tensor([encoded["input_ids"]])
            labels = input_ids.masked_fill(torch.tensor([encoded["assistant_masks"]]) == 0, -100)
            losses.append(model(input_ids, labels=labels, use_cache=False).loss.item())
    return sum(losses) / len(losses)


def accuracy(answers: list[str], questions: list[tuple[int, int]]) -> float:
    return sum(answer.strip() == str(a + b) for answer, (a, b) in zip(answers, questions)) / len(questions)


def _sft_arguments(model_dir: Path, data: Path, output_dir: Path, steps: int, seed: int) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(output_dir),
        "--max_steps", str(steps), "--per_device_train_batch_size", "32", "--learning_rate", "2e-3",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "10", "--weight_decay", "0.01",
        "--assistant_only_loss", "true", "--logging_steps", "25", "--seed", str(seed),
        "--routing_monitor_steps", "25", "--routing_probe_size", "32", "--disable_tqdm", "true",
    ]


def is_demo_output(path: Path) -> bool:
    """A previous demo's output directory: what --overwrite may replace."""
    return (path / "demo_summary.json").is_file() or is_model_directory(path / "sft")


def run_demo(
    output_dir: str = "outputs/demo",
    ffn_type: str = "polyglu",
    pretrain_steps: int = 400,
    sft_steps: int = 150,
    seed: int = 0,
    base_model: Optional[str] = None,
    overwrite: bool = False,
    log=print,
) -> dict:
    from .training.safeguards import reject_directory_without_tokenizer, reject_missing_local_checkpoint
    from .training.sft import build_parser, run_sft

    if base_model is not None:  # before anything is written, not at the retrofit or the fine-tuning
        reject_missing_local_checkpoint(base_model, "--base-model", hub_allowed=False)
        reject_directory_without_tokenizer(base_model, "the demo's chat data", "--base-model")
    started = time.perf_counter()
    train_facts, held_out = split_facts(seed)
    questions = [f"what is {a}+{b}?" for a, b in held_out]
    final = Path(output_dir).resolve()
    with atomic_directory(final, overwrite=overwrite, sources=(base_model,), replaceable=is_demo_output) as work:
        base_dir = Path(base_model) if base_model else work / "base-qwen3"
        if base_model is None:
            log(f"[1/4] Pretraining a small Qwen3 base model on addition facts ({pretrain_steps} steps)...")
            build_base_model(base_dir, seed, pretrain_steps, log)
        log(f"[2/4] Retrofitting {base_dir.name} to {ffn_type}...")
        report = convert_qwen3(base_dir, work / f"{ffn_type}-init", ffn_type, log=lambda *args: None)
        log(f"  deviation from the Qwen3 base: max |Δlogit| {report.max_abs_logit_diff:.2e}, mean KL {report.mean_kl:.2e}")

        data = work / "data" / "train.jsonl"
        data.parent.mkdir()
        data.write_text("".join(json.dumps(dialogue(a, b)) + "\n" for a, b in train_facts))
        held_out_dialogues = [dialogue(a, b) for a, b in held_out]
        loss_before = dialogue_loss(work / f"{ffn_type}-init", held_out_dialogues)
        answers_before = generate_in_fresh_process(work / f"{ffn_type}-init", questions, max_new_tokens=4)["answers"]

        log(f"[3/4] Fine-tuning with TRL SFT and the routing monitor ({sft_steps} steps)...")
        parser = build_parser()
        script_args, training_args, model_args, routing_args = parser.parse_args_and_config(
            args=_sft_arguments(work / f"{ffn_type}-init", data, work / "sft", sft_steps, seed)
        )
        trainer = run_sft(script_args, training_args, model_args, routing_args, quiet=True)
        monitor = trainer.routing_monitor

        log("[4/4] Loading the fine-tuned model in a fresh process (trust_remote_code=True, package not importable)...")
        generated = generate_in_fresh_process(work / "sft", questions, max_new_tokens=4)
        loss_after = dialogue_loss(work / "sft", held_out_dialogues)
    answers_after = generated["answers"]
    summary = {
        "ffn_type": ffn_type,
        "retrofit_max_abs_logit_diff": report.max_abs_logit_diff,
        "retrofit_mean_kl": report.mean_kl,
        "held_out_loss_before": loss_before,
        "held_out_loss_after": loss_after,
        "held_out_accuracy_before": accuracy(answers_before, held_out),
        "held_out_accuracy_after": accuracy(answers_after, held_out),
        "fresh_process_module": generated["module"],
        "routing_final": monitor.history[-1]["metrics"] if monitor else {},
        "routing_monitor_overhead": monitor.monitor_seconds / max(time.perf_counter() - started, 1e-9) if monitor else None,
        "report_files": {name: str(final / Path(path).relative_to(work)) for name, path in (monitor.written if monitor else {}).items()},
        "examples": [f"{q} → {a}" for q, a in zip(questions[:6], answers_after[:6])],
        "wall_seconds": time.perf_counter() - started,
    }
    _print_summary(summary, final, log)
    write_text_atomically(final / "demo_summary.json", json.dumps(summary, indent=2))
    return summary


def _print_summary(summary: dict, final: Path, log) -> None:
    routing = summary["routing_final"]
    log("")
    log(f"Demo summary ({summary['ffn_type']}, {summary['wall_seconds']:.0f} s)")
    log(f"  held-out loss      {summary['held_out_loss_before']:.3f} → {summary['held_out_loss_after']:.3f}")
    log(f"  held-out accuracy  {summary['held_out_accuracy_before']:.0%} → {summary['held_out_accuracy_after']:.0%}"
        f"  (40 questions never seen as dialogues)")
    log(f"  answers from a fresh process ({summary['fresh_process_module']}):")
    for line in summary["examples"]:
        log(f"    {line}")
    if routing:
        log(f"  routing: entropy {routing.get('routing/entropy', float('nan')):.3f} of max, "
            f"flip rate {routing.get('routing/flip_rate', float('nan')):.3f}, "
            f"KL from start {routing.get('routing/kl_from_initial', float('nan')):.2e}")
        layers = sorted({key.split('/')[1] for key in routing if key.startswith('routing/layer_')})
        for layer in layers:
            shares = {key.rsplit('/', 1)[1]: value for key, value in routing.items() if key.startswith(f"routing/{layer}/usage_mean/")}
            if shares:
                log(f"    {layer}: " + ", ".join(f"{name} {value:.2f}" for name, value in shares.items()))
    for name, path in summary["report_files"].items():
        log(f"  {name}: {path}")
    log(f"  model: {final / 'sft'}  (summary: {final / 'demo_summary.json'})")
