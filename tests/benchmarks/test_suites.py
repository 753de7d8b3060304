"""The benchmark suites run end to end at tiny sizes and report well-formed ratios (no timing is asserted)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_polyglu import FFN_TYPES
from modeling_polyglu.benchmarks.ffn import ReferenceStylePolyGLU
from modeling_polyglu.benchmarks.harness import run_interleaved, saved_tensor_bytes
from modeling_polyglu.benchmarks.runner import SUITES, main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every suite once, --quick, one repetition; compilation of the mixing kernels off to keep this fast."""
    path = tmp_path_factory.mktemp("bench") / "all.json"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYGLU_DISABLE_COMPILE", "1")
        code = main(["--suite", "all", "--quick", "--repeats", "1", "--json", str(path), "--device", "cpu", "--silent"])
    assert code == 0
    assert torch.get_num_threads() == threads  # the single-thread setting is restored
    return json.loads(path.read_text())


def test_meta_and_every_suite_present(quick_results):
    meta = quick_results["meta"]
    for key in ("date_utc", "cpu", "torch", "transformers", "threads", "quick", "repeats", "warmup"):
        assert key in meta
    assert meta["threads"] == 1 and meta["quick"] is True
    assert set(quick_results["suites"]) == set(SUITES)
    for suite in quick_results["suites"].values():
        assert suite["repeats"] == 1 and "description" in suite


def test_ffn_rows_cover_every_contender_with_positive_ratios(quick_results):
    cases = quick_results["suites"]["ffn"]["cases"]
    assert len(cases) >= 2 and {case["device"] for case in cases} == {"cpu"}
    for case in cases:
        rows = {row["contender"]: row for row in case["rows"]}
        expected = {"qwen3_mlp", "reference_polyglu", "polyglu[naive]", *FFN_TYPES}
        assert expected <= set(rows)
        for row in rows.values():
            for key in ("time_ms", "time_vs_swiglu", "time_vs_qwen3_mlp", "saved_bytes", "saved_vs_qwen3_mlp", "params"):
                assert _positive_finite(row[key]), (row["contender"], key, row[key])
            assert len(row["time_samples_ms"]) == 1
        assert rows["swiglu"]["time_vs_swiglu"] == 1.0
        assert rows["qwen3_mlp"]["time_vs_qwen3_mlp"] == 1.0 and rows["qwen3_mlp"]["saved_vs_qwen3_mlp"] == 1.0
        # the fused path never stores the [B, T, F, K] stack; the naive one does (bytes, not time)
        assert rows["polyglu"]["saved_bytes"] < rows["polyglu[naive]"]["saved_bytes"]
        assert rows["polyglu"]["saved_bytes"] < rows["reference_polyglu"]["saved_bytes"]


def test_model_suites_report_ratios_against_swiglu(quick_results):
    suites = quick_results["suites"]
    step = {row["contender"]: row for row in suites["step"]["rows"]}
    assert set(step) == set(FFN_TYPES) and step["swiglu"]["time_vs_swiglu"] == 1.0
    for row in step.values():
        assert _positive_finite(row["time_ms"]) and _positive_finite(row["time_vs_swiglu"])
    decode = {row["contender"]: row for row in suites["decode"]["rows"]}
    assert set(decode) == set(FFN_TYPES)
    for row in decode.values():
        for key in ("prefill_ms", "prefill_vs_swiglu", "per_token_ms", "per_token_vs_swiglu"):
            assert _positive_finite(row[key])
    generate = suites["generate"]["rows"]
    assert [row["new_tokens"] for row in generate] == sorted(row["new_tokens"] for row in generate)
    for row in generate:
        for key in ("cached_s", "no_cache_s", "speedup", "cached_ms_per_token", "no_cache_ms_per_token"):
            assert _positive_finite(row[key])
        assert row["tokens_match"] is True  # causal routing: the cache reproduces recomputation


def test_hard_and_convert_suites_report_their_rows(quick_results):
    suites = quick_results["suites"]
    for case in suites["hard"]["cases"]:
        rows = {row["contender"]: row for row in case["rows"]}
        assert {"polyglu", "moa", "dualglu", "dualglu[learned_static]"} <= set(rows)
        for row in rows.values():
            for key in ("soft_ms", "hard_ms", "hard_vs_soft", "soft_vs_swiglu"):
                assert _positive_finite(row[key]), (row["contender"], key)
    convert = suites["convert"]["rows"]
    assert [row["shards"] for row in convert] == sorted((row["shards"] for row in convert), reverse=True)
    for row in convert:
        assert row["shards"] >= 2 and _positive_finite(row["largest_shard_mib"])
        # at quick sizes the import's own peak can hide the conversion's few MB: only the real sizes measure it
        assert _positive_finite(row["peak_rss_mib"]) and _positive_finite(row["baseline_rss_mib"])
        assert math.isfinite(row["ratio_to_largest_shard"])
    (verified,) = suites["convert"]["verified_rows"]
    assert verified["verify"] == "yes" and verified["shards"] == 3 and _positive_finite(verified["wall_s"])
    assert 0.0 < verified["max_abs_logit_diff"] < 1e-2  # the layer-streamed comparison ran


def test_markdown_tables_are_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYGLU_DISABLE_COMPILE", "1")
    path = tmp_path / "ffn.json"
    args = ["--suite", "ffn", "--quick", "--repeats", "1", "--warmup", "0", "--ffn-types", "polyglu", "--json",
            str(path), "--device", "cpu", "--silent"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| contender | time ms |" in printed and "| polyglu[naive] |" in printed
    assert all(line.startswith("### SMOKE TEST (--quick") for line in printed.splitlines() if line.startswith("###"))
    assert "| qwen3_mlp |" in printed and "| swiglu |" in printed  # baselines are always present
    assert json.loads(path.read_text())["meta"]["suite"] == "ffn"


def test_results_go_to_the_bench_dir_or_the_user_cache_never_the_working_directory(monkeypatch, tmp_path):
    from modeling_polyglu.benchmarks.runner import default_json_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYGLU_BENCH_DIR", str(tmp_path / "chosen"))
    assert default_json_path("ffn", quick=True) == tmp_path / "chosen" / "ffn-quick.json"
    monkeypatch.delenv("POLYGLU_BENCH_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_json_path("convert", quick=False) == tmp_path / "cache" / "polyglu" / "bench" / "convert.json"


def test_bad_arguments_exit_with_usage_errors(tmp_path):
    assert main(["--suite", "ffn", "--repeats", "0", "--json", str(tmp_path / "x.json")]) == 2
    with pytest.raises(SystemExit):
        main(["--suite", "nope"])
    with pytest.raises(SystemExit):
        main(["--ffn-types", "swiglu,unknown"])


def test_saved_bytes_count_activations_once_and_skip_parameters():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    batch, tokens, hidden, intermediate = 2, 3, 8, 16
    mlp = Qwen3MLP(Qwen3Config(hidden_size=hidden, intermediate_size=intermediate))
    x = torch.randn(batch, tokens, hidden, requires_grad=True)
    saved = saved_tensor_bytes(lambda: mlp(x), exclude=list(mlp.parameters()))
    # x (saved by gate_proj and up_proj: once), gate (by SiLU), silu(gate) and up (by the product), the product
    assert saved == 4 * (batch * tokens * hidden + 4 * batch * tokens * intermediate)


def test_reference_style_polyglu_stacks_every_activation():
    torch.manual_seed(0)
    module = ReferenceStylePolyGLU(8, 16)
    x = torch.randn(2, 5, 8, requires_grad=True)
    saved = saved_tensor_bytes(lambda: module(x), exclude=list(module.parameters()))
    assert module(x).shape == x.shape
    assert saved >= 4 * (2 * 5 * 16 * 4)  # at least the [B, T, F, K] stack


def test_interleaving_runs_every_contender_once_per_repetition():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name) or {"seconds": 1.0}) for name in "abc"}
    samples = run_interleaved(contenders, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    assert [sorted(calls[i : i + 3]) for i in range(3, 12, 3)] == [["a", "b", "c"]] * 3
    assert calls[3:6] != calls[6:9]  # the starting contender rotates
    assert all(metrics["seconds"] == [1.0] * 3 for metrics in samples.values())


def test_gpu_ffn_contenders_and_a_liger_row_that_says_not_installed(monkeypatch):
    """The GPU case's contenders (built here on CPU; the Triton ones cannot run without a GPU or the interpreter),
    and how a case renders when liger_kernel is absent: its row and the ratios to it read n/a."""
    import importlib.util

    from modeling_polyglu.benchmarks import ffn

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(ffn.importlib.util, "find_spec",
                        lambda name, *args: None if name == "liger_kernel" else real_find_spec(name, *args))
    specs = ffn.cuda_contender_specs(16, 32, torch.Generator().manual_seed(0), ("swiglu", "polyglu", "moa", "dualglu"))
    names = [spec[0] for spec in specs]
    assert names[:4] == ["qwen3_mlp", ffn.LIGER, "swiglu", "swiglu[triton]"]
    assert {"polyglu", "moa", "dualglu", "polyglu[torch.compile]", "moa[torch.compile]", "dualglu[torch.compile]",
            "polyglu[saturated]"} <= set(names)
    assert specs[1][2] is None and "not installed" in specs[1][1]
    runnable_here = [spec for spec in specs if spec[0] in ("qwen3_mlp", ffn.LIGER, "swiglu", "polyglu")]
    case = ffn._ffn_case(runnable_here, 16, 32, 2, 4, torch.device("cpu"), torch.float32, 1, 0, 0)
    rows = {row["contender"]: row for row in case["rows"]}
    assert rows[ffn.LIGER]["installed"] is False and math.isnan(rows["polyglu"]["time_vs_liger"])
    assert _positive_finite(rows["polyglu"]["time_vs_swiglu"])
    table = ffn.markdown_table(case["rows"], ffn.CUDA_COLUMNS)
    assert "| liger_swiglu | n/a |" in table


def test_the_kernel_suite_needs_a_gpu_or_the_interpreter(quick_results, tmp_path, capsys):
    kernel = quick_results["suites"]["kernel"]  # `--suite all` on CPU: the suite says why it did not run
    assert kernel["cases"] == [] and "CUDA" in kernel["unavailable"]
    assert main(["--suite", "kernel", "--device", "cpu", "--json", str(tmp_path / "k.json"), "--silent"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--suite kernel" in error and "TRITON_INTERPRET=1" in error
    assert not (tmp_path / "k.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("numpy") is None,
                    reason="triton (and numpy) not installed")
def test_the_kernel_suite_runs_in_tritons_interpreter_with_a_tile_sweep(tmp_path):
    """The op-level rows end to end at tiny sizes in the interpreter (a child process: the variable must be set
    before triton is imported): every contender, the sweep rows against their default-tiles row."""
    path = tmp_path / "kernel.json"
    environment = {**os.environ, "TRITON_INTERPRET": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_polyglu.benchmarks.runner", "--suite", "kernel", "--quick", "--device", "cpu",
         "--ffn-types", "polyglu,moa,la", "--json", str(path), "--silent"],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (case,) = json.loads(path.read_text())["suites"]["kernel"]["cases"]
    rows = {row["contender"]: row for row in case["rows"]}
    (polyglu_sweep,) = [name for name in rows if name.startswith("polyglu[forward=")]
    (moa_sweep,) = [name for name in rows if name.startswith("moa[forward=")]
    assert list(rows)[:3] == ["swiglu", "liger_silu_mul", "swiglu[triton]"]
    assert set(rows) == {"swiglu", "liger_silu_mul", "swiglu[triton]", "polyglu", "moa", "la", polyglu_sweep,
                         moa_sweep}  # no torch.compile rows off the GPU; la (ungated) has no sweep
    assert rows["liger_silu_mul"]["installed"] is False and math.isnan(rows["polyglu"]["time_vs_liger"])
    for name in (polyglu_sweep, moa_sweep):
        assert _positive_finite(rows[name]["time_vs_default"])
    for name in ("swiglu[triton]", "polyglu", "moa", "la"):
        assert math.isnan(rows[name]["time_vs_default"])
    for row in rows.values():
        if row["installed"]:
            for key in ("time_ms", "forward_ms", "time_vs_swiglu", "bandwidth_gbs", "forward_bandwidth_gbs"):
                assert _positive_finite(row[key]), (row["contender"], key)
    assert "| polyglu[forward=" in completed.stdout and "/ default tiles" in completed.stdout
