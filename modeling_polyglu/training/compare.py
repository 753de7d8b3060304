"""`polyglu compare`: from-scratch comparisons of ffn types over seeds, with paired confidence intervals.

    polyglu compare --ffn-types swiglu,dualglu,polyglu --seeds 3 --config tiny-debug --output_dir OUT [pretrain flags]

* Every (seed, variant) is one `polyglu pretrain` run into `OUT/runs/<ffn_type>-seed<k>/`, one after another.
  Re-running the command skips finished runs (their `run_summary.json` exists and records the same settings) and
  resumes an interrupted one from its last complete checkpoint.
* `--match params` (default) sets each variant's intermediate_size so that its parameter count is within 1 % of the
  baseline's (the baseline keeps the config's), as Shazeer's GLU paper shrinks d_ff for gated variants; `none` keeps
  the config's intermediate_size for all.
* Paired design: seed k gives every variant the same data order and the same initial weights wherever names and
  shapes agree with the baseline's initialisation (embeddings, attention, norms; FFN projections of equal shape).
  The per-seed differences (variant − baseline) of the final eval loss then give the paired t-interval.
* Outputs: `OUT/comparison.json`, `OUT/comparison.md` (the table a paper prints) and `OUT/loss_curves.png` (eval
  loss vs step, mean and ±1 std band per variant), each written atomically.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..configuration_polyglu import FFN_TYPES
from ..conversion.staging import write_text_atomically
from .pretrain import check_config_fields
from .reports import plots_available, pyplot, save_figure
from .statistics import interval_excludes_zero, mean, paired_t_interval, sample_std

COMPARISON_JSON = "comparison.json"
COMPARISON_MARKDOWN = "comparison.md"
LOSS_CURVES = "loss_curves.png"
MATCH_MODES = ("params", "none")
MATCH_TOLERANCE = 0.01


@dataclass
class CompareArguments:
    """What `polyglu compare` compares; every `polyglu pretrain` flag applies to each run."""

    ffn_types: str = field(default="swiglu,dualglu,polyglu", metadata={"help": "Comma-separated variants: an ffn type, optionally with config fields, e.g. dualglu:dualglu_mixing=static_equal."})
    seeds: str = field(default="3", metadata={"help": "Number of seeds (0..N-1) or a comma-separated list of seeds."})
    baseline: str = field(default="swiglu", metadata={"help": "The variant differences are measured against (same syntax as --ffn_types)."})
    match: str = field(default="params", metadata={"help": "params: match each variant's parameter count to the baseline's within 1 %% via intermediate_size; none: keep it."})

    def __post_init__(self):
        for variant in self.variants():
            parse_variant(variant)  # validates
        if self.match not in MATCH_MODES:
            raise ValueError(f"match={self.match!r}; choose one of {', '.join(MATCH_MODES)}.")
        self.seed_list()  # validates

    def variants(self) -> list[str]:
        names = [name.strip() for name in str(self.ffn_types).split(",") if name.strip()]
        if self.baseline not in names:
            names.insert(0, self.baseline)
        return list(dict.fromkeys(names))

    def seed_list(self) -> list[int]:
        try:
            values = [int(part) for part in str(self.seeds).split(",")]
        except ValueError:
            raise ValueError(f"seeds must be a count or a comma-separated list of integers, got {self.seeds!r}.") from None
        if len(values) == 1:
            if values[0] < 1:
                raise ValueError(f"seeds must be >= 1, got {values[0]}.")
            return list(range(values[0]))
        return list(dict.fromkeys(values))


def parse_variant(spec: str) -> tuple[str, dict]:
    """`ffn_type[:field=value[:field=value...]]` → (ffn_type, config fields); values are JSON where they parse."""
    ffn_type, *assignments = spec.split(":")
    if ffn_type not in FFN_TYPES:
        raise ValueError(f"Unknown ffn type {ffn_type!r} in {spec!r}; choose from {', '.join(FFN_TYPES)}.")
    fields = {}
    for assignment in assignments:
        name, separator, value = assignment.partition("=")
        if not separator or not name:
            raise ValueError(f"{spec!r}: write config fields as ffn_type:field=value, got {assignment!r}.")
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value
    check_config_fields(fields, repr(spec))
    return ffn_type, fields


def parameter_count(config) -> int:
    """Parameters of a PolyGLUForCausalLM built on the meta device (no memory, no initialisation)."""
    from ..modeling_polyglu import PolyGLUForCausalLM
    from .pretrain import count_parameters

    with torch.device("meta"):
        return count_parameters(PolyGLUForCausalLM(config))


def with_fields(config, **values):
    from ..configuration_polyglu import PolyGLUConfig

    merged = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        merged.pop(key, None)
    merged.update(values)
    return PolyGLUConfig(**merged)


def matched_intermediate_size(config, target: int, tolerance: float = MATCH_TOLERANCE) -> tuple[int, int]:
    """(intermediate_size, parameter count) of `config` closest to `target` parameters; the count is affine in d_ff."""
    base_size = config.intermediate_size
    base_count = parameter_count(config)
    step = max(base_size // 2, 1)
    slope = (parameter_count(with_fields(config, intermediate_size=base_size + step)) - base_count) / step
    size = max(1, base_size + round((target - base_count) / slope))
    count = parameter_count(with_fields(config, intermediate_size=size))
    if abs(count - target) > tolerance * target:
        raise ValueError(
            f"{config.ffn_type}: no intermediate_size gives {target:,} parameters within {tolerance:.0%} (closest: "
            f"{size} with {count:,}); use --match none or a larger model."
        )
    return size, count


def paired_initial_model(config, reference_config, seed: int):
    """The variant initialised under `seed`, then given the reference's initial tensors wherever name and shape agree.

    Parameters are copied whole, also where ZeRO-3 partitions both models as they are built (every rank takes part).
    """
    from .engines import copy_parameter, whole_shape
    from .pretrain import new_model

    model = new_model(config, seed)
    if reference_config.to_dict() == config.to_dict():
        return model
    reference = new_model(reference_config, seed)
    reference_tensors = reference.state_dict(keep_vars=True)  # the parameters themselves, ZeRO-3's attributes kept
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            source = reference_tensors.get(name)
            if source is not None and whole_shape(source) == whole_shape(tensor):
                copy_parameter(tensor, source)
    return model


def run_directory(output_dir, ffn_type: str, seed: int) -> Path:
    return Path(output_dir) / "runs" / f"{ffn_type.replace(':', '-')}-seed{seed}"


def check_reusable(summary: dict, arguments, training_args, run_dir: Path) -> None:
    """A finished run is reused only if it was made with the same model/data arguments and training settings."""
    from dataclasses import asdict

    from .pretrain import training_settings

    expected = {"arguments": asdict(arguments), "training_settings": training_settings(training_args)}
    for section, values in expected.items():
        stored = summary.get(section, {})
        for key, value in values.items():
            if stored.get(key) != value:
                raise ValueError(
                    f"{run_dir} finished with {key}={stored.get(key)!r}, this command asks for {value!r}; use another "
                    "--output_dir or delete that run."
                )


def summarise(runs: list[dict], baseline: str, variants: list[str]) -> list[dict]:
    """Per variant: n, mean/std of the final eval loss, paired delta vs the baseline and its 95 % t-interval."""
    baseline_by_seed = {run["seed"]: run["final_eval_loss"] for run in runs if run["ffn_type"] == baseline}
    rows = []
    for variant in variants:
        own = [run for run in runs if run["ffn_type"] == variant]
        if not own:
            continue
        losses = [run["final_eval_loss"] for run in own]
        differences = [run["final_eval_loss"] - baseline_by_seed[run["seed"]] for run in own if run["seed"] in baseline_by_seed]
        interval = paired_t_interval(differences) if variant != baseline else None
        rows.append({
            "ffn_type": variant,
            "n": len(own),
            "mean_eval_loss": mean(losses),
            "std_eval_loss": sample_std(losses),
            "delta_vs_baseline": mean(differences) if differences else None,
            "ci95": list(interval) if interval else None,
            "significant": interval_excludes_zero(interval),
            "num_parameters": own[0]["num_parameters"],
            "intermediate_size": own[0]["intermediate_size"],
            "tokens_per_second": mean([run["tokens_per_second"] for run in own if run["tokens_per_second"]] or [float("nan")]),
        })
    return rows


def _format(value, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def comparison_markdown(comparison: dict) -> str:
    baseline = comparison["baseline"]
    lines = [
        f"# From-scratch comparison against {baseline}",
        "",
        f"{comparison['settings']}",
        "",
        f"| ffn_type | parameters | d_ff | n | final eval loss (mean ± std) | Δ vs {baseline} | 95 % CI (paired t) | significant | tokens/s |",
        "|---|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for row in comparison["summary"]:
        interval = f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]" if row["ci95"] else "–"
        spread = f" ± {row['std_eval_loss']:.4f}" if row["std_eval_loss"] is not None else ""
        significant = "yes" if row["significant"] else ("baseline" if row["ffn_type"] == baseline else "no")
        lines.append(
            f"| {row['ffn_type']} | {row['num_parameters']:,} | {row['intermediate_size']} | {row['n']} | "
            f"{row['mean_eval_loss']:.4f}{spread} | {_format(row['delta_vs_baseline'], signed=True)} | {interval} | "
            f"{significant} | {row['tokens_per_second']:,.0f} |"
        )
    lines += ["", "Δ: mean over seeds of (variant − baseline) final eval loss, same seed = same data order and shared "
              "initial weights; the interval is the paired t-interval with n − 1 degrees of freedom.", ""]
    return "\n".join(lines)


def plot_loss_curves(runs: list[dict], variants: list[str], path: Path) -> None:
    """Eval loss vs step: mean over seeds per variant with a ±1 std band."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        curves = [dict(map(tuple, run["eval_loss_history"])) for run in runs if run["ffn_type"] == variant]
        steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
        if not steps:
            continue
        means = [mean([curve[step] for curve in curves]) for step in steps]
        spreads = [sample_std([curve[step] for curve in curves]) or 0.0 for step in steps]
        (line,) = axis.plot(steps, means, label=f"{variant} (n={len(curves)})")
        axis.fill_between(steps, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)],
                          color=line.get_color(), alpha=0.2)
    axis.set_xlabel("step")
    axis.set_ylabel("eval loss")
    axis.set_title("Held-out loss (mean ± 1 std over seeds)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(plt, figure, path, dpi=120)


def build_parser():
    from .pretrain import build_parser as build_pretrain_parser

    return build_pretrain_parser(extra_classes=(CompareArguments,), prog="polyglu compare")


def plan_runs(compare_args: CompareArguments, arguments, tokenizer) -> tuple[list[dict], object, int]:
    """(seed, ffn_type, intermediate_size, parameter count) of every run; the baseline's count is the target."""
    from .pretrain import build_config

    base_config = build_config(arguments, tokenizer)
    baseline_ffn, baseline_fields = parse_variant(compare_args.baseline)
    reference_config = with_fields(base_config, ffn_type=baseline_ffn, ffn_types=None, **baseline_fields)
    target = parameter_count(reference_config)
    sizes = {}
    for variant in compare_args.variants():
        ffn_type, fields = parse_variant(variant)
        config = with_fields(base_config, ffn_type=ffn_type, ffn_types=None, **fields)
        if compare_args.match == "params" and variant != compare_args.baseline:
            sizes[variant] = matched_intermediate_size(config, target)
        else:
            sizes[variant] = (config.intermediate_size, parameter_count(config))
    plan = [
        {"seed": seed, "ffn_type": variant, "intermediate_size": sizes[variant][0], "num_parameters": sizes[variant][1]}
        for seed in compare_args.seed_list() for variant in compare_args.variants()
    ]
    return plan, reference_config, target


def run_arguments_for(argv: list[str], arguments, entry: dict, run_dir: Path) -> list[str]:
    """The command line of one run: the comparison's, plus its folder, seed, ffn type, fields and d_ff."""
    ffn_type, fields = parse_variant(entry["ffn_type"])
    extra = ["--output_dir", str(run_dir), "--seed", str(entry["seed"]), "--ffn_type", ffn_type,
             "--intermediate_size", str(entry["intermediate_size"])]
    if fields:
        overrides = json.loads(arguments.config_overrides) if arguments.config_overrides else {}
        extra += ["--config_overrides", json.dumps({**overrides, **fields})]
    return list(argv) + extra


def run_compare(argv: list[str]) -> dict:
    from tqdm.auto import tqdm

    from .pretrain import (build_config, complete_checkpoints, load_tokenizer, parse_arguments, read_run_summary,
                           run_pretrain)

    parser = build_parser()
    compare_args, arguments, training_args, _ = parse_arguments(parser, argv)
    output_dir = Path(training_args.output_dir)
    if arguments.ffn_type is not None or arguments.intermediate_size is not None:
        raise ValueError("compare sets ffn_type and intermediate_size per run; use --ffn_types and --match instead.")
    plan, reference_config, target = plan_runs(compare_args, arguments, load_tokenizer(arguments.tokenizer))
    runs = []
    progress = tqdm(plan, desc="compare", unit="run")
    for entry in progress:
        run_dir = run_directory(output_dir, entry["ffn_type"], entry["seed"])
        progress.set_postfix_str(run_dir.name)
        _, run_arguments, run_training_args, run_routing_args = parse_arguments(
            parser, run_arguments_for(argv, arguments, entry, run_dir))
        summary = read_run_summary(run_dir)
        if summary is not None:
            check_reusable(summary, run_arguments, run_training_args, run_dir)
            progress.write(f"{run_dir.name}: finished before, reused (final eval loss {summary['final_eval_loss']:.4f})")
        else:
            checkpoints = complete_checkpoints(run_dir)
            model = None
            if checkpoints:
                run_training_args.resume_from_checkpoint = str(checkpoints[-1])
                progress.write(f"{run_dir.name}: resuming from {checkpoints[-1].name}")
            else:
                config = build_config(run_arguments, load_tokenizer(run_arguments.tokenizer))
                model = paired_initial_model(config, with_fields(reference_config, vocab_size=config.vocab_size), entry["seed"])
            summary = run_pretrain(run_arguments, run_training_args, run_routing_args, model=model, quiet=True)
            progress.write(f"{run_dir.name}: final eval loss {summary['final_eval_loss']:.4f} "
                           f"({summary['num_parameters']:,} parameters)")
        runs.append({
            "ffn_type": entry["ffn_type"], "seed": entry["seed"], "final_eval_loss": summary["final_eval_loss"],
            "num_parameters": summary["num_parameters"], "intermediate_size": summary["intermediate_size"],
            "tokens_per_second": summary["tokens_per_second"], "run_dir": str(run_dir),
            "final_step": summary["final_step"], "tokens_per_step": summary["tokens_per_step"],
            "eval_loss_history": summary["eval_loss_history"],
        })
    progress.close()
    comparison = {
        "baseline": compare_args.baseline,
        "baseline_num_parameters": target,
        "match": compare_args.match,
        "settings": (f"Config {arguments.model_config}, dataset {arguments.dataset}, {runs[0]['final_step']} steps of "
                     f"{runs[0]['tokens_per_step']:,} tokens, lr {training_args.learning_rate}, seeds "
                     f"{', '.join(map(str, compare_args.seed_list()))}, match {compare_args.match}."),
        "runs": runs,
        "summary": summarise(runs, compare_args.baseline, compare_args.variants()),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / COMPARISON_JSON, json.dumps(comparison, indent=2))
    write_text_atomically(output_dir / COMPARISON_MARKDOWN, comparison_markdown(comparison))
    if plots_available():
        plot_loss_curves(runs, compare_args.variants(), output_dir / LOSS_CURVES)
    else:
        print(f"polyglu compare: matplotlib is not installed, so {LOSS_CURVES} was not drawn (pip install matplotlib).",
              file=sys.stderr)
    return comparison


def main(argv: Optional[list] = None) -> int:
    comparison = run_compare(list(sys.argv[1:] if argv is None else argv))
    print(comparison_markdown(comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())
