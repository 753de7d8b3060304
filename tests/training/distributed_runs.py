"""Two-rank `polyglu sft` runs on the CPU, shared by the DDP tests and the engine tests (DeepSpeed, FSDP2, Ray).

Every run fine-tunes the same tiny converted PolyGLU model on the same 64 local conversations with
recipes/polyglu_full.yaml and the same overrides (RUN_OVERRIDES), so any two runs — and one process measuring the
whole probe set — can be compared number for number. Ports are chosen free, every launch has a timeout, and the
child environment is offline with one OpenMP thread per rank.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
NUM_EXAMPLES = 64
MAX_STEPS = 5
MONITOR_EVERY = 2
MONITORED_STEPS = [0, 2, 4, 5]  # start, every 2 steps, end of training
PROBE_SIZE = 8
PROBE_TOKENS = 1024  # per process: the whole probe set is measured (the default budget would cut it)
MAX_LENGTH = 128
SEED = 42  # the recipes' seed: the probe split depends on it
LAUNCH_TIMEOUT = 420
RECIPE = "polyglu_full.yaml"
# the comparable part of every full fine-tuning run: 5 steps of 2 ranks x 4 examples, a checkpoint at the last step
RUN_OVERRIDES = (
    "--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(MAX_STEPS),
)
DDP_LAUNCHER = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
SFT_MODULE = ("-m", "modeling_polyglu.cli", "sft")


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = rng.choice([f"what is {a}+{b}?", f"{a}+{b}=?", f"what is {a} + {b}?"])
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": str(a + b)}]})
    return rows


def build_workspace(root: Path) -> SimpleNamespace:
    """A tiny PolyGLU model converted from a random Qwen3 (d=64, d_ff=128, 2 layers) and a 64-conversation JSONL."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from modeling_polyglu.char_tokenizer import build_chat_tokenizer
    from modeling_polyglu.conversion.qwen3 import convert_qwen3

    rows = conversations(NUM_EXAMPLES)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = build_chat_tokenizer(["0123456789+=? whatis"])
    torch.manual_seed(0)
    # rows padded to a multiple of 8, as real tables are (Qwen3: 151936 rows for 151669 tokens): transformers 5.17
    # gathers a tensor-parallel lm_head only when the TP size divides its rows (5.25 also shards 33 rows)
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=-(-len(tokenizer) // 8) * 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )
    qwen3.save_pretrained(root / "qwen3")
    tokenizer.save_pretrained(root / "qwen3")
    convert_qwen3(str(root / "qwen3"), str(root / "polyglu"), "polyglu", verify=False, log=lambda *args: None)
    return SimpleNamespace(root=root, data=data, rows=rows, model=root / "polyglu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment(output_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(output_dir.parent / f"{output_dir.name}_datasets_cache"),
        TENSORBOARD_LOGGING_DIR=str(output_dir.parent / f"{output_dir.name}_tensorboard"),
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def sft_arguments(workspace, recipe: str, output_dir: Path, *overrides: str) -> list[str]:
    """`polyglu sft` arguments of every two-rank run: the recipe, the tiny model and data, 2 ranks x 4 examples."""
    return [
        "--config", str(RECIPES / recipe),
        "--use_cpu", "true",
        "--model_name_or_path", str(workspace.model),
        "--dataset_name", str(workspace.data),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--max_length", str(MAX_LENGTH),
        "--routing_probe_size", str(PROBE_SIZE),
        "--routing_probe_tokens", str(PROBE_TOKENS),
        "--routing_monitor_steps", str(MONITOR_EVERY),
        *overrides,
    ]


def run_checked(command: list[str], output_dir: Path, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=REPO, env=child_environment(output_dir), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"launch failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}"
    return result


def launch_two_ranks(
    workspace, recipe: str, output_dir: Path, *overrides: str, launcher=DDP_LAUNCHER, entry=SFT_MODULE
) -> subprocess.CompletedProcess:
    """`accelerate launch <launcher> --num_processes 2 <entry> --config <recipe> ...` on CPU, 2 gloo ranks."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher,
        "--num_processes", "2", "--main_process_port", str(free_port()),
        *entry, *sft_arguments(workspace, recipe, output_dir, *overrides),
    ]
    return run_checked(command, output_dir)


def assert_refused_on_both_ranks(command: list[str], output_dir: Path, message: str) -> None:
    """A two-rank launch fails, each rank printing `message` as one error line and neither a traceback."""
    result = subprocess.run(
        command, cwd=REPO, env=child_environment(output_dir), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    printed = result.stdout + result.stderr
    assert result.returncode != 0
    assert printed.count(message) == 2, printed[-3000:]
    assert "[rank0]: Traceback" not in printed and "[rank1]: Traceback" not in printed


def saved_weights(directory: Path) -> dict:
    """Every tensor of a saved model directory's model*.safetensors files."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(directory.glob("model*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def log_history(output_dir: Path) -> list[dict]:
    state = output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json"
    assert state.is_file(), f"no {state}"
    return json.loads(state.read_text())["log_history"]
