"""lm-evaluation-harness on a saved PolyGLU checkpoint, through lm-eval's real `HFLM` with `trust_remote_code=True`.

A tiny transformers Qwen3 (char tokenizer, built locally) is converted with `convert_qwen3(..., "polyglu")`; its routers
are then pushed far from their SiLU-preferring initialisation so that routing depends on the input (padding or masking
mistakes would show). Every number lm-eval reports is checked against log-probabilities and greedy generations computed
directly with `AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)`.

Importing `modeling_polyglu` registers its classes with the Auto classes, and transformers then prefers them to a
checkpoint's own code. So lm-eval runs twice:
- "remote_code": in a fresh interpreter that never imports the package (this file run as a script), so HFLM loads
  the code files saved in the checkpoint, exactly as for a user without `polyglu` installed; the full evaluator on a
  local multiple-choice task (JSONL + YAML in tmp_path) runs there too;
- "installed_package": in this process, where the registered package classes are used.
The direct reference always runs in this process (the package classes). Nothing is downloaded: the Hub and datasets
are offline and every non-local socket connection is refused and recorded.
"""

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!+=-*'\n"
MAX_POSITIONS = 64  # max_position_embeddings: lm-eval's context length when max_length is not given
HFLM_MAX_LENGTH = 32  # below MAX_POSITIONS, so loglikelihood_rolling needs several windows
MAX_GEN_TOKS = 12
TOLERANCE = 1e-4
TASK_NAME = "polyglu_local_mc"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASK_DOCUMENTS = [
    {"question": "Q: 1 + 1 =", "choices": ["2", "3", "11"], "answer": 0},
    {"question": "Q: the sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "Q: a b c", "choices": ["d", "x", "z"], "answer": 0},
    {"question": "Q: a cat says", "choices": ["woof", "meow"], "answer": 1},
    {"question": "Q: ice is", "choices": ["hot", "cold"], "answer": 1},
    {"question": "Q: 2 * 3 =", "choices": ["5", "6", "9", "8"], "answer": 1},
]


# ----------------------------------------------------------------------------------------------------------------
# The lm-eval side (runs in this process and, as __main__, in a fresh one); imports nothing from modeling_polyglu
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def offline(patch_setattr, attempts):
    """Offline Hub/datasets and refused (recorded) non-AF_UNIX socket connections while active."""
    import datasets.config
    import huggingface_hub.constants

    original_connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family != socket.AF_UNIX:
            attempts.append(repr(address))
            raise OSError(f"test_lm_eval: network access to {address!r} refused")
        return original_connect(sock, address)

    patch_setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read from the environment at import time
    patch_setattr(datasets.config, "HF_HUB_OFFLINE", True)
    patch_setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    patch_setattr(socket.socket, "connect", refuse)
    yield


def instances(request_type, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=tuple(a), idx=i) for i, a in enumerate(arguments)]


def run_lm_eval(spec: dict) -> dict:
    """Everything the tests check on the lm-eval side, as JSON-able values."""
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    lm = HFLM(pretrained=spec["checkpoint"], trust_remote_code=True, batch_size=2, device="cpu",
              max_length=HFLM_MAX_LENGTH)
    model_class = type(lm.model)
    output = {
        "model_class": f"{model_class.__module__}.{model_class.__qualname__}",
        "package_imported": "modeling_polyglu" in sys.modules,
        "backend": lm.backend,
        "max_length": lm.max_length,
        "prefix_token_id": lm.prefix_token_id,
        "loglikelihood": [list(r) for r in lm.loglikelihood(instances("loglikelihood", spec["loglikelihood"]), True)],
        "rolling": lm.loglikelihood_rolling(instances("loglikelihood_rolling", [[t] for t in spec["rolling"]]), True),
        "generate": lm.generate_until(instances("generate_until", spec["generate"]), True),
    }
    if spec.get("task_dir"):
        default = HFLM(pretrained=spec["checkpoint"], trust_remote_code=True, batch_size=1, device="cpu")
        output["default_max_length"] = default.max_length
        output["evaluate"] = run_simple_evaluate(spec["checkpoint"], spec["task_dir"])
    output["seconds"] = time.perf_counter() - started
    return output


def run_simple_evaluate(checkpoint: str, task_dir: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=task_dir, include_defaults=False)  # no scan of the built-in tasks
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},trust_remote_code=True",
        tasks=[TASK_NAME],
        task_manager=task_manager,
        device="cpu",
        batch_size=2,
    )
    samples = sorted(results["samples"][TASK_NAME], key=lambda sample: sample["doc_id"])
    return {
        "results": results["results"][TASK_NAME],
        "max_length": results["max_length"],
        "choice_logprobs": [[response[0] for response in sample["filtered_resps"]] for sample in samples],
        "targets": [sample["target"] for sample in samples],
    }


def worker_main(spec_file: str, output_file: str) -> None:
    attempts = []
    for name, value in OFFLINE_ENV.items():
        os.environ[name] = value
    with offline(setattr, attempts):  # plain setattr: the worker process exits afterwards
        output = run_lm_eval(json.loads(Path(spec_file).read_text()))
    output["network_attempts"] = attempts
    Path(output_file).write_text(json.dumps(output))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint, requests and the direct reference (this process)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_eval")


@pytest.fixture(scope="module")
def checkpoint(root):
    """Directory of the converted PolyGLU checkpoint (config, weights, remote code, tokenizer)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from modeling_polyglu.char_tokenizer import build_char_tokenizer
    from modeling_polyglu.conversion.qwen3 import convert_qwen3

    source, destination = root / "qwen3", root / "polyglu"
    tokenizer = build_char_tokenizer([CHARACTERS])
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    qwen3.save_pretrained(source)
    tokenizer.save_pretrained(source)
    convert_qwen3(source, destination, "polyglu", log=lambda *args: None)
    assert (destination / "modeling_polyglu.py").is_file() and (destination / "tokenizer.json").is_file()

    # make routing input-dependent: routers still at their SiLU preference would hide routing/padding bugs
    weights_file = destination / "model.safetensors"
    tensors = load_file(weights_file)
    routers = [name for name in tensors if ".mlp.router." in name]
    assert routers, "the conversion added no router tensors"
    generator = torch.Generator().manual_seed(1)
    for name in routers:
        tensors[name] = tensors[name] + torch.randn(tensors[name].shape, generator=generator)
    save_file(tensors, weights_file, metadata={"format": "pt"})

    probe = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    converted = AutoModelForCausalLM.from_pretrained(str(destination), trust_remote_code=True).eval()
    with torch.no_grad():
        deviation = (converted(probe).logits - qwen3.eval()(probe).logits).abs().max().item()
    assert deviation > 1e-2, "routing must change the function, or these checks only test plain Qwen3"
    return destination


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(model, tokenizer) loaded directly, independently of lm-eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), trust_remote_code=True, dtype=torch.float32)
    assert model.config.model_type == "polyglu" and type(model).__name__ == "PolyGLUForCausalLM"
    return model.eval(), AutoTokenizer.from_pretrained(str(checkpoint))


def score(model, input_ids, target_ids):
    """(sum of log p(targets), every target is the argmax) for `target_ids` following `input_ids`, one forward."""
    ids = torch.tensor([list(input_ids) + list(target_ids)[:-1]])
    with torch.no_grad():
        logprobs = model(ids).logits[0].double().log_softmax(-1)[-len(target_ids):]
    targets = torch.tensor(target_ids)
    return logprobs.gather(1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


def reference_loglikelihood(model, tokenizer, context, continuation):
    """lm-eval's convention rebuilt: an empty context becomes <bos>; the char tokenizer adds no special tokens."""
    prefix = tokenizer.encode(context) if context else [tokenizer.bos_token_id]
    return score(model, prefix, tokenizer.encode(continuation))


def reference_rolling(model, tokenizer, text, max_length):
    """Sum of log p(token) over the text after <bos>, in chunks of `max_length` predictions, each chunk seeing the
    `max_length` tokens before its last target (the rolling-window rule documented in lm_eval.api.model)."""
    tokens = tokenizer.encode(text)
    sequence = [tokenizer.bos_token_id] + tokens  # tokens[i] is predicted from sequence[: i + 1]
    total = 0.0
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        window = torch.tensor([sequence[max(0, end - max_length) : end]])
        with torch.no_grad():
            logprobs = model(window).logits[0].double().log_softmax(-1)[-(end - start):]
        total += logprobs.gather(1, torch.tensor(tokens[start:end])[:, None]).sum().item()
    return total


def reference_generation(model, tokenizer, prompt, max_new_tokens):
    """Greedy model.generate on the prompt alone (no padding): (new tokens decoded without special tokens, their
    number)."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = output[0, ids.shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens)


def greedy_text(model, tokenizer, context, length):
    """The argmax continuation of `context`, `length` tokens, by repeated full forwards (no generate())."""
    context_ids = tokenizer.encode(context)
    ids = list(context_ids)
    for _ in range(length):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    text = tokenizer.decode(ids[len(context_ids):])
    assert tokenizer.encode(text) == ids[len(context_ids):], "the greedy tokens must be plain characters"
    return text


@pytest.fixture(scope="module")
def case(reference):
    """The requests sent to lm-eval and what each must return, computed directly."""
    model, tokenizer = reference
    loglikelihood = [
        ["The cat sat", " on the mat."],
        ["", "Hello world"],  # empty context: conditioned on <bos>
        ["The cat sat", greedy_text(model, tokenizer, "The cat sat", 4)],  # is_greedy must be True
        ["abc", "d"],  # one-token continuations of one context: lm-eval's logits-cache path
        ["abc", "x"],
        ["Question: 17 + 25 = ?", " 42"],
        ["Z", "zz"],
    ]
    rolling = [
        "Short text.",  # one window
        "The quick brown fox jumps over the lazy dog, then naps in the sun until dinner is ready.",  # three
    ]
    assert len(tokenizer.encode(rolling[1])) > 2 * HFLM_MAX_LENGTH
    prompts = ["Once upon a time", "Hi", "The answer is", "Q: why?"]  # different lengths: batches are left-padded
    full, lengths = zip(*(reference_generation(model, tokenizer, prompt, MAX_GEN_TOKS) for prompt in prompts))
    # a two-character stop string that first occurs inside the first generation, so that cutting is exercised
    start = next(k for k in range(1, len(full[0]) - 1) if full[0].find(full[0][k : k + 2]) == k)
    stop = full[0][start : start + 2]
    cut = {"until": [stop], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}
    uncut = {"until": ["#"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False}  # '#' is not in the vocabulary
    return {
        "spec": {
            "loglikelihood": loglikelihood,
            "rolling": rolling,
            "generate": [[prompts[0], cut], [prompts[1], cut], [prompts[2], uncut], [prompts[3], uncut]],
        },
        "loglikelihood": [reference_loglikelihood(model, tokenizer, *request) for request in loglikelihood],
        "rolling": [reference_rolling(model, tokenizer, text, HFLM_MAX_LENGTH) for text in rolling],
        "rolling_unwindowed": reference_loglikelihood(model, tokenizer, "", rolling[1])[0],
        "full_generations": full,
        "generated_tokens": list(lengths),
        "stop": stop,
        "generate": [full[0].split(stop)[0], full[1].split(stop)[0], full[2], full[3]],
    }


def write_local_task(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(document) + "\n" for document in TASK_DOCUMENTS))
    (directory / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(directory / 'datasets_cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )


@pytest.fixture(scope="module")
def remote_code_output(root, checkpoint, case):
    """lm-eval in a fresh interpreter (this file as a script): HFLM must load the checkpoint's own code files."""
    task_dir = root / "task"
    write_local_task(task_dir)
    spec_file, output_file = root / "spec.json", root / "lm_eval_output.json"
    spec_file.write_text(json.dumps({**case["spec"], "checkpoint": str(checkpoint), "task_dir": str(task_dir)}))
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(root / "hf_home")}  # a fresh copy of the checkpoint's code
    process = subprocess.run(
        [sys.executable, __file__, str(spec_file), str(output_file)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    if process.returncode != 0:
        pytest.fail(f"lm-eval worker failed (rc {process.returncode}):\n{process.stderr[-6000:]}")
    return json.loads(output_file.read_text())


@pytest.fixture(scope="module")
def installed_package_output(checkpoint, case):
    """lm-eval in this process, where importing modeling_polyglu registered the package classes."""
    attempts = []
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        with offline(patch.setattr, attempts):
            output = run_lm_eval({**case["spec"], "checkpoint": str(checkpoint)})
    output["network_attempts"] = attempts
    return output


@pytest.fixture(params=["remote_code", "installed_package"])
def lm_eval_output(request):
    return request.param, request.getfixturevalue(f"{request.param}_output")


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_hflm_loads_the_checkpoint_offline(lm_eval_output, reference):
    route, output = lm_eval_output
    print(f"{route}: {output['model_class']}, lm-eval side {output['seconds']:.1f} s")
    assert output["network_attempts"] == []
    assert output["backend"] == "causal"
    assert output["max_length"] == HFLM_MAX_LENGTH
    assert output["prefix_token_id"] == reference[1].bos_token_id
    if route == "remote_code":
        # the checkpoint's own code files, not the installed package
        assert output["model_class"].startswith("transformers_modules.") and not output["package_imported"]
        assert output["model_class"].endswith(".modeling_polyglu.PolyGLUForCausalLM")
        assert output["default_max_length"] == MAX_POSITIONS  # read from max_position_embeddings
    else:
        assert output["model_class"] == "modeling_polyglu.modeling_polyglu.PolyGLUForCausalLM"


def test_loglikelihood_matches_direct_log_probabilities_and_greedy_flag(lm_eval_output, case):
    route, output = lm_eval_output
    requests, expected = case["spec"]["loglikelihood"], case["loglikelihood"]
    print(route, "loglikelihood (lm-eval, direct, greedy):",
          [(round(got[0], 6), round(want[0], 6), got[1]) for got, want in zip(output["loglikelihood"], expected)])
    assert len(output["loglikelihood"]) == len(requests)
    for request, (logprob, is_greedy), (want_logprob, want_greedy) in zip(requests, output["loglikelihood"], expected):
        assert abs(logprob - want_logprob) <= TOLERANCE, (request, logprob, want_logprob)
        assert is_greedy == want_greedy, request
    assert expected[2][1] is True and not all(flag for _, flag in expected)  # both flag values are exercised


def test_loglikelihood_rolling_matches_direct_windows(lm_eval_output, case):
    route, output = lm_eval_output
    print(route, "loglikelihood_rolling (lm-eval, direct):", list(zip(output["rolling"], case["rolling"])))
    assert len(output["rolling"]) == len(case["rolling"])
    for got, want in zip(output["rolling"], case["rolling"]):
        assert abs(got - want) <= TOLERANCE, (got, want)
    # the long text really is scored in truncated windows: with its whole prefix as context it scores differently
    assert abs(case["rolling"][1] - case["rolling_unwindowed"]) > 1e-3


def test_generate_until_matches_greedy_generate_cut_at_the_stop_string(lm_eval_output, case):
    route, output = lm_eval_output
    print(route, f"stop={case['stop']!r}", "generate_until (lm-eval, expected):",
          list(zip(output["generate"], case["generate"])))
    assert output["generate"] == case["generate"]
    assert len(case["generate"][0]) < len(case["full_generations"][0])  # the stop string did cut
    assert case["generated_tokens"][2:] == [MAX_GEN_TOKS, MAX_GEN_TOKS]  # ended by max_gen_toks, not by <eos>


def test_simple_evaluate_on_a_local_multiple_choice_task(remote_code_output, reference):
    model, tokenizer = reference
    assert remote_code_output["network_attempts"] == []
    evaluation = remote_code_output["evaluate"]
    result = evaluation["results"]
    assert result["sample_len"] == len(TASK_DOCUMENTS)
    assert 0.0 <= result["acc,none"] <= 1.0
    assert evaluation["max_length"] == MAX_POSITIONS
    assert evaluation["targets"] == [document["answer"] for document in TASK_DOCUMENTS]

    # the same accuracy, computed directly: " " + choice after the question (lm-eval's default target delimiter)
    correct = 0
    for document, reported in zip(TASK_DOCUMENTS, evaluation["choice_logprobs"]):
        scores = [
            reference_loglikelihood(model, tokenizer, document["question"], " " + choice)[0]
            for choice in document["choices"]
        ]
        assert len(reported) == len(scores)
        assert max(abs(a - b) for a, b in zip(reported, scores)) <= TOLERANCE, (document, reported, scores)
        correct += max(range(len(scores)), key=scores.__getitem__) == document["answer"]
    print(f"local task acc: lm-eval {result['acc,none']}, direct {correct / len(TASK_DOCUMENTS)}")
    assert result["acc,none"] == pytest.approx(correct / len(TASK_DOCUMENTS))


if __name__ == "__main__":  # the fresh-interpreter lm-eval worker: spec.json output.json
    worker_main(*sys.argv[1:3])
