"""Routing reports for real depths: layer × step heatmaps with integer steps and 0-based axes, a per-layer table."""

import json
import math
import sys

from modeling_polyglu.training.reports import (
    DRIFT_FILE,
    ENTROPY_FILE,
    KL_FILE,
    REPORT_FILE,
    axis_top,
    layer_step_grid,
    per_layer_lines,
    write_routing_report,
)

LAYERS = 36


def history_of(steps):
    history = []
    for step in steps:
        metrics = {"routing/entropy": 0.5, "routing/static_alpha_entropy": 0.1}
        for layer in range(LAYERS):
            metrics[f"routing/layer_{layer}/entropy"] = layer / LAYERS
            metrics[f"routing/layer_{layer}/usage_argmax/silu"] = 0.9 if layer % 2 else 0.2
            metrics[f"routing/layer_{layer}/usage_argmax/gelu"] = 0.1 if layer % 2 else 0.8
            metrics[f"routing/layer_{layer}/usage_mean/silu"] = 0.7
            if step:  # compared with the start from the second measurement on
                metrics[f"routing/layer_{layer}/flip_rate"] = 0.0
                metrics[f"routing/layer_{layer}/kl_from_initial"] = 0.0
        history.append({"step": step, "metrics": metrics})
    return history


def test_grid_has_one_row_per_layer_and_a_column_per_measurement_that_has_the_statistic():
    layers, steps, grid = layer_step_grid(history_of([0, 5, 10]), "flip_rate")
    assert layers == list(range(LAYERS)) and steps == [5, 10]
    assert len(grid) == LAYERS and all(row == [0.0, 0.0] for row in grid)
    layers, steps, grid = layer_step_grid(history_of([0, 5, 10]), "entropy")
    assert steps == [0, 5, 10] and grid[9] == [0.25] * 3


def test_rate_axes_start_at_zero_and_an_all_zero_series_is_readable():
    assert axis_top([0.0, 0.0, float("nan")]) == 1.0
    assert axis_top([0.02, 0.3]) == 0.3
    assert axis_top([0.2], upper=1.0) == 1.0


def test_report_writes_every_plot_for_a_deep_model(tmp_path):
    written = write_routing_report(tmp_path, history_of([0, 3, 7]))
    assert {"heatmap", "entropy", "flip_rate", "kl"} <= set(written)
    for name in (ENTROPY_FILE, DRIFT_FILE, KL_FILE):
        assert (tmp_path / name).stat().st_size > 10_000, name


def test_per_layer_table_names_the_top_activation_and_its_share():
    lines = per_layer_lines(history_of([0])[0]["metrics"])
    assert lines[0].split() == ["layer", "entropy", "top", "activation", "share"]
    assert len(lines) == 1 + LAYERS
    assert lines[1].split() == ["0", "0.0000", "gelu", "80.0%"]
    assert lines[2].split() == ["1", f"{1 / LAYERS:.4f}", "silu", "90.0%"]
    assert per_layer_lines({"routing/entropy": math.nan}) == []


def test_without_matplotlib_only_the_json_report_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what importing it raises where it is not installed
    written = write_routing_report(tmp_path, history_of([0, 3]))
    assert list(written) == ["report"]
    assert [path.name for path in tmp_path.iterdir()] == [REPORT_FILE]
    assert json.loads((tmp_path / REPORT_FILE).read_text())["final"]["routing/entropy"] == 0.5
