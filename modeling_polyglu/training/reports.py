"""Routing reports people look at: `routing_report.json` plus PNG plots (usage heatmap, entropy and drift over steps).

Every file is written beside its destination and moved into place (the monitor rewrites them during training).
The plots need matplotlib (the training extras); without it the JSON report is still written.
"""

import importlib.util
import json
from pathlib import Path
from typing import Optional

from ..conversion.staging import write_file_atomically, write_text_atomically

REPORT_FILE = "routing_report.json"
HEATMAP_FILE = "routing_usage_heatmap.png"
ENTROPY_FILE = "routing_entropy.png"
DRIFT_FILE = "routing_flip_rate.png"
KL_FILE = "routing_kl.png"


def _layer_index(key: str) -> int:
    return int(key.split("/")[1].split("_")[1])


def pyplot():
    """matplotlib.pyplot on the file-only backend, imported where a plot is drawn (the JSON needs none of it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: Path, dpi: int = 110) -> Path:
    """Write a figure as the PNG at `path` (staged, then moved into place) and free it."""
    try:
        return write_file_atomically(path, lambda staging: figure.savefig(staging, dpi=dpi))
    finally:
        plt.close(figure)


def usage_table(metrics: dict, statistic: str = "usage_mean") -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, activations, rows) of per-layer activation usage; NaN where a layer lacks an activation."""
    entries = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "routing" and parts[2] == statistic:
            entries[(_layer_index(key), parts[3])] = value
    layers = sorted({layer for layer, _ in entries})
    activations = list(dict.fromkeys(name for _, name in sorted(entries, key=lambda item: item[0])))
    rows = [[entries.get((layer, name), float("nan")) for name in activations] for layer in layers]
    return layers, activations, rows


def per_layer_lines(metrics: dict) -> list[str]:
    """A console table, one row per routed layer: entropy / ln K, the most chosen activation and its share."""
    layers, activations, shares = usage_table(metrics, "usage_argmax")
    if not layers:
        return []
    lines = [f"{'layer':>5}  {'entropy':>7}  {'top activation':<14}  {'share':>6}"]
    for layer, row in zip(layers, shares):
        top = max(range(len(activations)), key=lambda k: row[k] if row[k] == row[k] else -1.0)
        entropy = metrics.get(f"routing/layer_{layer}/entropy", float("nan"))
        lines.append(f"{layer:>5}  {entropy:>7.4f}  {activations[top]:<14}  {row[top]:>6.1%}")
    return lines


def plot_usage_heatmap(metrics: dict, path: Path, title: str) -> Optional[Path]:
    layers, activations, rows = usage_table(metrics)
    if not layers:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(2.4 + 1.1 * len(activations), 1.4 + 0.4 * len(layers)))
    image = axis.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(activations)), activations)
    axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    for y, row in enumerate(rows):
        for x, value in enumerate(row):
            if value == value:  # not NaN
                axis.text(x, y, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="mean routing probability")
    figure.tight_layout()
    return save_figure(plt, figure, path)


def layer_step_grid(history: list[dict], statistic: str) -> tuple[list[int], list[int], list[list[float]]]:
    """(layers, steps, grid[layer][measurement]) of one per-layer statistic; NaN where a measurement lacks it."""
    suffix = f"/{statistic}"
    layers = sorted({_layer_index(key) for entry in history for key in entry["metrics"]
                     if key.startswith("routing/layer_") and key.endswith(suffix)})
    # measurements that have it (flip rate and KL start after the first)
    measured = [entry for entry in history if entry["step"] is not None
                and any(f"routing/layer_{layer}{suffix}" in entry["metrics"] for layer in layers)]
    grid = [[entry["metrics"].get(f"routing/layer_{layer}{suffix}", float("nan")) for entry in measured] for layer in layers]
    return layers, [entry["step"] for entry in measured], grid


def axis_top(values: list[float], upper: Optional[float] = None) -> float:
    """Top of a 0-based axis: `upper` if fixed, else the largest finite value; an all-zero series gets 0..1, not
    matplotlib's −0.04..0.04."""
    if upper is not None:
        return upper
    top = max((value for value in values if value == value), default=0.0)
    return top if top > 0 else 1.0


def _cell_edges(steps: list[int]) -> list[float]:
    """Column edges halfway between measured steps; the first and last columns end at their step, so the axis
    covers exactly the steps measured (no negative steps)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    return [steps[0]] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1]]


def _plot_series(history: list[dict], statistic: str, path: Path, ylabel: str, title: str,
                 upper: Optional[float] = None) -> Optional[Path]:
    """The mean over layers against the step (top) above a layer × step heatmap with a colour bar (bottom).

    A heatmap reads at a glance for 28-36 layers, where one line per layer needs a legend over the data and a
    colour cycle that repeats. Both share an integer step axis; values start at 0 (`upper`: a fixed top, e.g. 1).
    """
    layers, steps, grid = layer_step_grid(history, statistic)
    if not layers or not steps:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, (line_axis, heat_axis) = plt.subplots(
        2, 1, sharex=True, figsize=(7.5, 2.6 + 0.12 * len(layers)), height_ratios=(1, max(1.5, 0.08 * len(layers))),
        layout="constrained",
    )
    overall = [(entry["step"], entry["metrics"][f"routing/{statistic}"]) for entry in history
               if entry["step"] is not None and f"routing/{statistic}" in entry["metrics"]]
    if overall:
        line_axis.plot(*zip(*overall), color="black", linewidth=2, marker="o", markersize=3, label="mean over layers")
    static = [(entry["step"], entry["metrics"]["routing/static_alpha_entropy"]) for entry in history
              if statistic == "entropy" and entry["step"] is not None and "routing/static_alpha_entropy" in entry["metrics"]]
    if static:  # what the reference monitored: blind to the input-dependent term, τ and pooling
        line_axis.plot(*zip(*static), color="gray", linestyle="--", label="static softmax(α) entropy (reference metric)")
    top = axis_top([value for row in grid for value in row] + [value for _, value in overall], upper)
    line_axis.set_ylim(0.0, top * (1.0 if upper is not None else 1.05))
    line_axis.set_ylabel(ylabel)
    line_axis.set_title(title)
    if line_axis.get_legend_handles_labels()[0]:  # a statistic no layer reported draws no line
        line_axis.legend(fontsize=7, loc="best")
    line_axis.grid(alpha=0.3)
    mesh = heat_axis.pcolormesh(_cell_edges(steps), [layer - 0.5 for layer in layers] + [layers[-1] + 0.5], grid,
                                cmap="viridis", vmin=0.0, vmax=top, shading="flat")
    heat_axis.set_ylabel("layer")
    heat_axis.set_xlabel("training step")
    heat_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(steps) == 1:  # one column: its step is the only tick (no 5.5 … 6.5)
        heat_axis.set_xticks(steps)
    heat_axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    heat_axis.invert_yaxis()  # layer 0 at the top, as in the usage heatmap
    figure.colorbar(mesh, ax=heat_axis, label=ylabel)
    return save_figure(plt, figure, path)


def plots_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_routing_report(output_dir, history: list[dict], extra: Optional[dict] = None) -> dict:
    """Write the JSON report and, where matplotlib is installed, the plots; return {name: path} of what was written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = history[-1]["metrics"] if history else {}
    report = {"final": final, "history": history, **(extra or {})}
    written = {"report": write_text_atomically(output_dir / REPORT_FILE, json.dumps(report, indent=2))}
    if not plots_available():
        return {name: str(path) for name, path in written.items()}
    heatmap = plot_usage_heatmap(final, output_dir / HEATMAP_FILE, "Applied routing per layer (eval, noise-free)")
    if heatmap:
        written["heatmap"] = heatmap
    if len(history) > 1:
        for name, statistic, filename, ylabel, title, upper in (
            ("entropy", "entropy", ENTROPY_FILE, "entropy / ln K", "Routing entropy of the applied routing", 1.0),
            ("flip_rate", "flip_rate", DRIFT_FILE, "flip rate", "Routing flips since the start (share of argmax choices changed)", None),
            ("kl", "kl_from_initial", KL_FILE, "KL(current ‖ initial)", "Routing drift since the start", None),
        ):
            path = _plot_series(history, statistic, output_dir / filename, ylabel, title, upper)
            if path:
                written[name] = path
    return {name: str(path) for name, path in written.items()}
