"""Routing reports people look at: `routing_report.json` plus PNG plots (usage heatmap, entropy and drift over steps)."""

import json
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPORT_FILE = "routing_report.json"
HEATMAP_FILE = "routing_usage_heatmap.png"
ENTROPY_FILE = "routing_entropy.png"
DRIFT_FILE = "routing_flip_rate.png"
KL_FILE = "routing_kl.png"


def _layer_index(key: str) -> int:
    return int(key.split("/")[1].split("_")[1])


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


def plot_usage_heatmap(metrics: dict, path: Path, title: str) -> Optional[Path]:
    layers, activations, rows = usage_table(metrics)
    if not layers:
        return None
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
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_series(history: list[dict], statistic: str, path: Path, ylabel: str, title: str) -> Optional[Path]:
    keys = sorted(
        {key for entry in history for key in entry["metrics"] if key.startswith("routing/layer_") and key.endswith(f"/{statistic}")},
        key=_layer_index,
    )
    overall = f"routing/{statistic}"
    if not keys:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(entry["step"], entry["metrics"][key]) for entry in history if key in entry["metrics"]]
        axis.plot(*zip(*points), label=f"layer {_layer_index(key)}", linewidth=1)
    points = [(entry["step"], entry["metrics"][overall]) for entry in history if overall in entry["metrics"]]
    if points:
        axis.plot(*zip(*points), label="mean", color="black", linewidth=2.5)
    static = [(entry["step"], entry["metrics"]["routing/static_alpha_entropy"]) for entry in history
              if statistic == "entropy" and "routing/static_alpha_entropy" in entry["metrics"]]
    if static:  # what the reference monitored: blind to the input-dependent term, τ and pooling
        axis.plot(*zip(*static), label="static softmax(α) entropy (reference metric)", color="gray", linestyle="--")
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_routing_report(output_dir, history: list[dict], extra: Optional[dict] = None) -> dict:
    """Write the JSON report and the plots; return {name: path} of what was written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = history[-1]["metrics"] if history else {}
    report = {"final": final, "history": history, **(extra or {})}
    written = {"report": output_dir / REPORT_FILE}
    written["report"].write_text(json.dumps(report, indent=2))
    heatmap = plot_usage_heatmap(final, output_dir / HEATMAP_FILE, "Applied routing per layer (eval, noise-free)")
    if heatmap:
        written["heatmap"] = heatmap
    if len(history) > 1:
        for name, statistic, filename, ylabel, title in (
            ("entropy", "entropy", ENTROPY_FILE, "entropy / ln K", "Routing entropy of the applied routing"),
            ("flip_rate", "flip_rate", DRIFT_FILE, "share of argmax choices changed", "Routing flips since the start"),
            ("kl", "kl_from_initial", KL_FILE, "KL(current ‖ initial)", "Routing drift since the start"),
        ):
            path = _plot_series(history, statistic, output_dir / filename, ylabel, title)
            if path:
                written[name] = path
    return {name: str(path) for name, path in written.items()}
