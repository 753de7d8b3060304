"""Child process of the vLLM tests: serves saved checkpoints with vLLM's Transformers backend, offline, in one process.

    python vllm_child.py JOBS_JSON RESULTS_JSON

JOBS_JSON is a list of {"model": DIR, "prompts": [[token ids], ...], "max_tokens": N, "settings": {...}}
("settings", optional, are more `LLM` arguments). For each job it builds `LLM(model=DIR, model_impl="transformers",
trust_remote_code=True, dtype="float32", ...)` with `modeling_polyglu` made unimportable (only the remote code saved
next to the checkpoint can load), generates greedily for all prompts in one batch and then for each prompt alone,
and records the chosen tokens with their logprobs and how many prompt tokens vLLM took from its prefix cache. A job
whose model fails to load records the error text instead. RESULTS_JSON gets one entry per job:
{"model", "batched": [{"tokens", "logprobs", "cached_tokens"}, ...], "alone": [...]} or {"model", "error": TEXT}.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more than tiny models need
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: one import of vLLM for all jobs
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The settings the tests and README's "Serving with vLLM" use (CPU: eager, fp32, short context).
LLM_SETTINGS = dict(model_impl="transformers", trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=128)


def chosen(output) -> dict:
    """The generated token ids, the logprob vLLM reports for each, and the prompt tokens read from its prefix cache."""
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
    return {"tokens": tokens, "logprobs": logprobs, "cached_tokens": output.num_cached_tokens or 0}


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        llm = LLM(model=job["model"], **{**LLM_SETTINGS, **job.get("settings", {})})
    except Exception as error:  # the refusal tests read the message; every other job fails on the missing results
        return {"model": job["model"], "error": f"{type(error).__name__}: {error}"}
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    batched = [chosen(output) for output in llm.generate(prompts, params, use_tqdm=False)]
    alone = [chosen(llm.generate([prompt], params, use_tqdm=False)[0]) for prompt in prompts]
    llm.llm_engine.engine_core.shutdown()
    return {"model": job["model"], "batched": batched, "alone": alone}


if __name__ == "__main__":
    sys.modules["modeling_polyglu"] = None  # the package is "not installed": vLLM must load the saved remote code
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    results = [serve(job) for job in jobs]
    with open(results_path + ".partial", "w") as handle:
        json.dump(results, handle)
    os.replace(results_path + ".partial", results_path)
