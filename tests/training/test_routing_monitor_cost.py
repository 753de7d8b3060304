"""The routing monitor's cost is bounded by a token budget, announced, reported, and kept off the console."""

import json

import pytest

from modeling_polyglu.training.callbacks import (
    MAX_PROBE_TOKENS,
    MIN_PROBE_TOKENS,
    PROBE_COST_SHARE,
    TRAIN_COST_PER_TOKEN_IN_FORWARDS,
    cut_to_token_budget,
    default_probe_token_budget,
    routing_summary_line,
)
from modeling_polyglu.training.sft import build_parser, run_sft

from .test_sft import workspace  # noqa: F401  the tiny converted models and chat data


def test_default_budget_keeps_all_measurements_at_the_cost_share():
    # 300 steps of 2,000 tokens, measured at 0, 50, ..., 300: 7 measurements
    budget = default_probe_token_budget(300, 50, 2000.0)
    assert 7 * budget == pytest.approx(PROBE_COST_SHARE * TRAIN_COST_PER_TOKEN_IN_FORWARDS * 300 * 2000, rel=1e-3)
    assert default_probe_token_budget(6, 50, 100.0) == MIN_PROBE_TOKENS  # a tiny run still measures something
    assert default_probe_token_budget(10**6, 10**6, 10**6) == MAX_PROBE_TOKENS
    assert default_probe_token_budget(600, 50, 2000.0) > budget  # longer intervals afford a bigger probe


def test_probe_examples_are_cut_to_the_budget():
    lists = [[1] * 5, [2] * 5, [3] * 5]
    assert cut_to_token_budget(lists, 7) == [[1] * 5, [2] * 2]
    assert cut_to_token_budget(lists, 100) == lists
    assert cut_to_token_budget(lists, 0) == []


def test_summary_line_is_short():
    metrics = {"routing/entropy": 0.5, "routing/flip_rate": 0.01, "routing/kl_from_initial": 1e-4, "routing/nonfinite": 0.0}
    metrics.update({f"routing/layer_{i}/usage_mean/silu": 0.9 for i in range(36)})
    line = routing_summary_line(12, metrics, 1, 0.25)
    assert line == "routing @ step 12: entropy 0.500, flips 1.00%, KL 1.00e-04, NaN/inf 0, alerts 1 (0.2 s)"


def test_console_shows_a_summary_the_loggers_get_every_key(workspace, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "out"
    arguments = [
        "--model_name_or_path", str(workspace / "polyglu"), "--dataset_name", str(workspace / "data.jsonl"),
        "--output_dir", str(output), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--routing_monitor_steps", "2", "--routing_probe_size", "8", "--routing_probe_tokens", "40",
        "--logging_steps", "1", "--disable_tqdm", "true",
    ]
    trainer = run_sft(*build_parser().parse_args_and_config(args=arguments))
    printed = capsys.readouterr().out
    assert "holding out 8 of the 96 training examples" in printed and "--routing_probe_size" in printed
    assert "Routing monitor: 40 probe tokens" in printed
    assert printed.count("routing @ step") == 3 and "routing/layer_" not in printed
    assert "'loss'" in printed  # the trainer's own log lines are still printed
    logged = [entry for entry in trainer.state.log_history if "routing/entropy" in entry]
    assert len(logged) == 3 and "routing/layer_0/usage_mean/silu" in logged[-1]
    report = json.loads((output / "routing_report.json").read_text())
    assert report["probe_tokens_per_process"] == report["probe_token_budget"] == 40
    assert 0.0 < report["monitor_overhead"] < 1.0 and len(report["measurement_seconds"]) == 3
