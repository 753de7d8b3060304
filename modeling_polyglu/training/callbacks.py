"""Trainer callbacks of `polyglu sft`: a τ schedule and monitoring of the applied routing, with their options.

* :class:`RoutingArguments` — the routing options of `polyglu sft` (parsed next to TRL's own arguments).
* :class:`RoutingTauCallback` — keeps τ fixed (the checkpoint's `routing_tau`) or anneals it linearly/cosine; the
  final τ is written to the model config, so the saved model evaluates with it.
* :class:`RoutingNoiseReplicaCallback` — tells the model its data-parallel replica, so that ranks seeded alike draw
  different Gumbel routing noise (together, what one process with their whole batch draws).
* :class:`RoutingMonitorCallback` — every `routing_monitor_steps` steps (and at start and end) measures the routing
  the model applies on a fixed probe set (see routing_stats.py), logs `routing/...` keys through `Trainer.log` (so
  they reach log_history and every report_to backend), raises alerts, and writes the report and plots at the end.
  The initial snapshot is saved in the output dir, so a resumed run still compares against the original start.
"""

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..conversion.staging import write_file_atomically, write_text_atomically
from .reports import plots_available, write_routing_report
from .routing_stats import (
    RoutingProbe, concatenate_snapshot, probe_batches, routing_alerts, tensor_parallel_size, unwrap_polyglu_model,
)

# The probe's default token budget: its forwards (≈ 1/3 of a training step's cost per token; LoRA's backward is
# cheaper, so count 1/2) should take PROBE_COST_SHARE of the run, leaving room for the statistics themselves.
PROBE_COST_SHARE = 0.02
TRAIN_COST_PER_TOKEN_IN_FORWARDS = 2.0
MIN_PROBE_TOKENS, MAX_PROBE_TOKENS = 64, 4096
SNAPSHOT_FILE = "routing_initial_snapshot{suffix}.safetensors"

INITIAL_METRICS_FILE = "routing_initial_metrics.json"
TAU_SCHEDULES = ("fixed", "linear", "cosine")


@dataclass
class RoutingArguments:
    """Routing options of `polyglu sft` (they appear next to TRL's own arguments)."""

    routing_monitor_steps: int = field(default=50, metadata={"help": "Measure the applied routing every N steps (0: off)."})
    routing_probe_size: int = field(default=32, metadata={"help": "Examples held out from training as the routing probe set (at most; the eval split's head when it has enough)."})
    routing_probe_tokens: int = field(
        default=0,
        # argparse %-formats help strings: a percent sign is written %%
        metadata={"help": "Tokens per process in one measurement (the probe examples are cut to this). 0 (default): "
                          f"sized so the monitor costs about {PROBE_COST_SHARE * 100:.0f}%% of the run, from max_steps, the batch "
                          f"size and the probe's example lengths, between {MIN_PROBE_TOKENS} and {MAX_PROBE_TOKENS}."},
    )
    routing_probe_batch_size: int = field(default=8, metadata={"help": "Batch size of the probe forwards."})
    routing_max_neurons: int = field(default=256, metadata={"help": "Neurons per layer kept for flip rate and KL."})
    routing_tau_schedule: str = field(default="fixed", metadata={"help": "fixed | linear | cosine."})
    routing_tau_start: Optional[float] = field(default=None, metadata={"help": "τ at step 0 (default: the model's)."})
    routing_tau_end: Optional[float] = field(default=None, metadata={"help": "τ at the last step (default: the start)."})
    routing_collapse_threshold: float = field(default=0.99, metadata={"help": "Alert when a layer newly sends this share of decisions to one activation."})
    routing_flip_rate_threshold: float = field(default=0.5, metadata={"help": "Alert when this share of routing decisions changed since the start."})
    routing_stop_on_alert: bool = field(default=False, metadata={"help": "Stop training when an alert fires."})

    def __post_init__(self):
        if self.routing_tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"routing_tau_schedule={self.routing_tau_schedule!r}; choose one of {', '.join(TAU_SCHEDULES)}.")
        for name in ("routing_tau_start", "routing_tau_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}.")
        for name, smallest in (("routing_monitor_steps", 0), ("routing_probe_size", 0), ("routing_probe_tokens", 0),
                               ("routing_probe_batch_size", 1), ("routing_max_neurons", 1)):
            if getattr(self, name) < smallest:
                raise ValueError(f"--{name} must be >= {smallest}, got {getattr(self, name)}.")
        if not 0 < self.routing_collapse_threshold <= 1:
            raise ValueError("--routing_collapse_threshold is a share of routing decisions, in (0, 1]; got "
                             f"{self.routing_collapse_threshold}.")
        if not 0 <= self.routing_flip_rate_threshold <= 1:  # 0: any change alerts
            raise ValueError("--routing_flip_rate_threshold is a share of routing decisions, in [0, 1]; got "
                             f"{self.routing_flip_rate_threshold}.")


def tau_at(progress: float, start: float, end: float, schedule: str) -> float:
    """τ after `progress` ∈ [0, 1] of training."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "fixed":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RoutingTauCallback(TrainerCallback):
    """Sets τ before every optimizer step per the schedule; the config holds the final τ when the model is saved."""

    def __init__(self, arguments: RoutingArguments):
        self.arguments = arguments
        self.start = self.end = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = unwrap_polyglu_model(model)
        self.start = self.arguments.routing_tau_start or base.config.routing_tau
        self.end = self.arguments.routing_tau_end or self.start
        self._apply(base, state)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(unwrap_polyglu_model(model), state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        base = unwrap_polyglu_model(model)
        base.set_routing_tau(tau_at(1.0, self.start, self.end, self.arguments.routing_tau_schedule))

    def _apply(self, base, state):
        if self.arguments.routing_tau_schedule == "fixed" and self.arguments.routing_tau_start is None:
            return
        progress = state.global_step / max(state.max_steps, 1)
        base.set_routing_tau(tau_at(progress, self.start, self.end, self.arguments.routing_tau_schedule))


def data_parallel_layout(args, model) -> tuple[int, int]:
    """(data-parallel groups, this rank's group): what the probe set is sharded over and the routing noise drawn for.

    Under tensor parallelism the ranks of a group must run the same forwards (their collectives pair up), and each
    computes the routing of its own slice of d_ff; transformers lays the tensor-parallel dimension innermost, so a
    group is `tp_size` consecutive ranks.
    """
    tensor_parallel = tensor_parallel_size(unwrap_polyglu_model(model))
    return args.world_size // tensor_parallel, args.process_index // tensor_parallel


class RoutingNoiseReplicaCallback(TrainerCallback):
    """Tells the model which data-parallel replica this rank is, so that ranks seeded alike draw different noise."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = unwrap_polyglu_model(model)
        if hasattr(base, "set_routing_noise_replica"):  # remote code saved before it existed draws as it did then
            groups, group = data_parallel_layout(args, model)
            base.set_routing_noise_replica(group, groups)


def default_probe_token_budget(max_steps: int, monitor_steps: int, tokens_per_step: float) -> int:
    """Probe tokens per measurement so that all measurements (start, every `monitor_steps`, end) cost ≈ PROBE_COST_SHARE."""
    measurements = 1 + math.ceil(max_steps / monitor_steps) if monitor_steps > 0 else 2
    budget = PROBE_COST_SHARE * TRAIN_COST_PER_TOKEN_IN_FORWARDS * max_steps * tokens_per_step / measurements
    return int(min(max(budget, MIN_PROBE_TOKENS), MAX_PROBE_TOKENS))


def cut_to_token_budget(token_lists: list[list[int]], budget: int) -> list[list[int]]:
    """The leading examples whose tokens fit in `budget`; the last one kept is cut to fill it."""
    kept, left = [], budget
    for ids in token_lists:
        if left <= 0:
            break
        kept.append(ids[:left])
        left -= len(kept[-1])
    return kept


class RoutingMonitorCallback(TrainerCallback):
    """Measures and logs the applied routing on a fixed probe set during training (see the module docstring)."""

    def __init__(self, trainer, probe_token_lists: list[list[int]], arguments: RoutingArguments, pad_token_id: int):
        self.trainer = trainer
        self.arguments = arguments
        self.probe = RoutingProbe(max_neurons=arguments.routing_max_neurons)
        self.probe_token_lists, self.pad_token_id = probe_token_lists, pad_token_id
        self.shards, self.shard_index = data_parallel_layout(trainer.args, trainer.model)
        if len(probe_token_lists) < self.shards:
            raise ValueError(
                f"routing_probe_size ({len(probe_token_lists)}) must be at least the number of data-parallel "
                f"processes ({self.shards})."
            )
        # fixed now when given; the default budget needs max_steps and is chosen at on_train_begin
        self.probe_tokens = arguments.routing_probe_tokens or MAX_PROBE_TOKENS
        self._select_probe(self.probe_tokens)
        self.snapshot = None
        self.initial_metrics = {}
        self.history: list[dict] = []
        self.alerts: list[dict] = []
        self.stopped_by: Optional[dict] = None  # the alert that stopped training (--routing_stop_on_alert)
        self.monitor_seconds = 0.0
        self.measurement_seconds: list[float] = []  # the first includes one-time kernel compilation for probe shapes
        self.train_started = None
        self.last_measured_step = None

    def _select_probe(self, tokens_per_process: int) -> None:
        """This rank's probe batches: the examples cut to the budget, then dealt out in equal counts to the ranks
        (to the data-parallel groups: the ranks of a tensor-parallel group run the same examples together)."""
        world, rank = self.shards, self.shard_index
        kept = cut_to_token_budget(self.probe_token_lists, tokens_per_process * world)
        if len(kept) < world:  # less than one example per rank: every rank gets one example, cut to the budget
            kept = [ids[:tokens_per_process] for ids in self.probe_token_lists[:world]]
        usable = (len(kept) // world) * world  # equal shards: every rank runs the same number of forwards
        shard = kept[:usable][rank::world]
        self.batches = probe_batches(shard, self.arguments.routing_probe_batch_size, self.pad_token_id)
        self.probe_examples = len(shard)
        self.probe_token_count = sum(len(ids) for ids in shard)

    def _default_budget(self, args, state) -> int:
        """Tokens per measurement for ≈ PROBE_COST_SHARE of the run (see default_probe_token_budget)."""
        lengths = [len(ids) for ids in self.probe_token_lists]
        row_tokens = args.max_length if getattr(args, "packing", False) and getattr(args, "max_length", None) else sum(lengths) / len(lengths)
        tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * row_tokens
        return default_probe_token_budget(state.max_steps, self.arguments.routing_monitor_steps, tokens_per_step)

    def _paths(self, output_dir: str):

        suffix = f".rank{self.trainer.args.process_index}" if self.trainer.args.world_size > 1 else ""
        return Path(output_dir) / SNAPSHOT_FILE.format(suffix=suffix), Path(output_dir) / INITIAL_METRICS_FILE

    def _measure(self, model, step: int) -> dict:
        started = time.perf_counter()
        metrics, snapshot = self.probe.measure(self.trainer.model_wrapped or model, self.batches, self.snapshot)
        self.measurement_seconds.append(time.perf_counter() - started)
        self.monitor_seconds += self.measurement_seconds[-1]
        self.last_measured_step = step
        self.history.append({"step": step, "metrics": metrics})
        return metrics, snapshot

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.train_started = time.perf_counter()
        snapshot_path, metrics_path = self._paths(args.output_dir)
        resumed = snapshot_path.is_file() and metrics_path.is_file()
        if resumed:  # the probe the snapshot was taken on, whatever the budget would be now
            with safe_open(str(snapshot_path), framework="pt") as handle:
                self.probe_tokens = int((handle.metadata() or {}).get("probe_tokens", self.probe_tokens))
        elif not self.arguments.routing_probe_tokens:
            self.probe_tokens = self._default_budget(args, state)
        self._select_probe(self.probe_tokens)
        if self.trainer.is_world_process_zero():
            tqdm.write(  # the progress bar is already drawn
                f"Routing monitor: {self.probe_token_count} probe tokens from {self.probe_examples} example(s) per "
                f"process and measurement (--routing_probe_tokens, default sized to ~{PROBE_COST_SHARE:.0%} of the "
                f"run), at the start, every {self.arguments.routing_monitor_steps} steps and at the end "
                "(--routing_monitor_steps; 0 turns monitoring off)."
            )
            if not plots_available():
                tqdm.write("Routing monitor: matplotlib is not installed, so routing_report.json comes without its "
                           "plots (pip install matplotlib).")
        if resumed:
            # resumed run: compare against the original start, not the checkpoint
            self.snapshot = load_file(str(snapshot_path))
            self.history = history_from_log(state.log_history, before_step=state.global_step)
            self.initial_metrics = json.loads(metrics_path.read_text())
            metrics, _ = self._measure(model, state.global_step)
        else:
            metrics, snapshot = self._measure(model, state.global_step)
            self.snapshot = concatenate_snapshot(snapshot)
            self.initial_metrics = metrics
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            tensors = {key: value.contiguous() for key, value in self.snapshot.items()}
            # staged: a resumed run trusts any snapshot it finds
            write_file_atomically(snapshot_path, lambda staging: save_file(
                tensors, str(staging), metadata={"probe_tokens": str(self.probe_tokens)}
            ))
            if self.trainer.is_world_process_zero():
                write_text_atomically(metrics_path, json.dumps(metrics, indent=2))
        self.trainer.log(dict(metrics))
        self._print_summary(state.global_step, metrics, [])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.arguments.routing_monitor_steps
        last_step = state.global_step >= state.max_steps or control.should_training_stop
        if last_step or (every > 0 and state.global_step % every == 0):
            # the last measurement happens here, not in on_train_end, where report_to writers are already closed
            self._log_and_alert(model, state, control)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.trainer.is_world_process_zero():
            elapsed = time.perf_counter() - (self.train_started or time.perf_counter())
            extra = {
                "alerts": self.alerts,
                "monitor_seconds": self.monitor_seconds,
                "measurement_seconds": self.measurement_seconds,
                "train_seconds": elapsed,
                "monitor_overhead": self.monitor_seconds / elapsed if elapsed > 0 else None,

                "probe_tokens_per_process": self.probe_token_count,
                "probe_token_budget": self.probe_tokens,
                "probe_examples_per_process": self.probe_examples,
                "initial": self.initial_metrics,
            }
            self.written = write_routing_report(args.output_dir, self.history, extra)

    def _log_and_alert(self, model, state, control):
        if self.last_measured_step == state.global_step:
            return
        metrics, _ = self._measure(model, state.global_step)
        # Trainer.log clears control.should_log; keep the step's own loss/lr logging that was scheduled
        should_log = control.should_log
        self.trainer.log(dict(metrics))
        control.should_log = should_log
        alerts = routing_alerts(
            metrics, self.initial_metrics, self.arguments.routing_collapse_threshold, self.arguments.routing_flip_rate_threshold
        )
        self._print_summary(state.global_step, metrics, alerts)
        for kind, message in alerts:
            self.alerts.append({"step": state.global_step, "kind": kind, "message": message})
            if self.trainer.is_world_process_zero():
                warnings.warn(f"Routing alert at step {state.global_step}: {message}", stacklevel=2)
            if self.arguments.routing_stop_on_alert:
                control.should_training_stop = True
                self.stopped_by = self.stopped_by or self.alerts[-1]


    def _print_summary(self, step: int, metrics: dict, alerts: list) -> None:
        """One short console line per measurement (the per-layer keys go to log_history and report_to only)."""
        if self.trainer.is_world_process_zero() and _console_printers(self.trainer):
            tqdm.write(routing_summary_line(step, metrics, len(alerts), self.measurement_seconds[-1]))


def routing_summary_line(step: int, metrics: dict, alert_count: int, seconds: float) -> str:
    parts = [f"routing @ step {step}:"]
    for key, label, spec in (("routing/entropy", "entropy", ".3f"), ("routing/flip_rate", "flips", ".2%"),
                             ("routing/kl_from_initial", "KL", ".2e"), ("routing/nonfinite", "NaN/inf", ".0f")):
        if key in metrics:
            parts.append(f"{label} {format(metrics[key], spec)}")
    parts.append(f"alerts {alert_count} ({seconds:.1f} s)")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def _console_printers(trainer) -> list:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    return [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, (PrinterCallback, ProgressCallback))]


def remove_console_printers(trainer) -> None:
    """Quiet runs: no per-step log dictionaries or progress bar (log_history and report_to still get every key)."""
    for callback in _console_printers(trainer):
        trainer.remove_callback(callback)


def keep_routing_keys_off_the_console(trainer) -> None:
    """The console callbacks print every logged key: drop `routing/...` from what they print (the monitor prints a
    summary); logs with nothing else are not printed. log_history and report_to still get every key."""
    for callback in _console_printers(trainer):
        print_logs = callback.on_log

        def on_log(args, state, control, logs=None, print_logs=print_logs, **kwargs):
            shown = {key: value for key, value in (logs or {}).items() if not key.startswith("routing/")}
            if set(shown) - {"epoch", "step"}:
                return print_logs(args, state, control, logs=shown, **kwargs)
            return None

        callback.on_log = on_log


def history_from_log(log_history: list[dict], before_step: int) -> list[dict]:
    """The monitor's measurements before `before_step` from a checkpoint's log history (what a resumed run lost)."""
    history = []
    for entry in log_history:
        metrics = {key: value for key, value in entry.items() if key.startswith("routing/")}
        if metrics and entry.get("step", before_step) < before_step:
            if history and history[-1]["step"] == entry["step"]:
                history[-1]["metrics"].update(metrics)
            else:
                history.append({"step": entry["step"], "metrics": metrics})
    return history


def add_routing_callbacks(trainer, arguments: RoutingArguments, probe_token_lists, pad_token_id: int):
    """Attach the τ schedule, the noise replica and (unless monitoring is off) the routing monitor to a trainer."""
    trainer.add_callback(RoutingTauCallback(arguments))
    trainer.add_callback(RoutingNoiseReplicaCallback())
    monitor = None
    if arguments.routing_monitor_steps > 0 and probe_token_lists:
        monitor = RoutingMonitorCallback(trainer, probe_token_lists, arguments, pad_token_id)
        trainer.add_callback(monitor)
        keep_routing_keys_off_the_console(trainer)
    return monitor
