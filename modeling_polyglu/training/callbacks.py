"""Trainer callbacks of `polyglu sft`: a τ schedule and monitoring of the applied routing, with their options.

* :class:`RoutingArguments` — the routing options of `polyglu sft` (parsed next to TRL's own arguments).
* :class:`RoutingTauCallback` — keeps τ fixed (the checkpoint's `routing_tau`) or anneals it linearly/cosine; the
  final τ is written to the model config, so the saved model evaluates with it.
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

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .reports import write_routing_report
from .routing_stats import RoutingProbe, concatenate_snapshot, probe_batches, routing_alerts, unwrap_polyglu_model

SNAPSHOT_FILE = "routing_initial_snapshot{suffix}.safetensors"
INITIAL_METRICS_FILE = "routing_initial_metrics.json"
TAU_SCHEDULES = ("fixed", "linear", "cosine")


@dataclass
class RoutingArguments:
    """Routing options of `polyglu sft` (they appear next to TRL's own arguments)."""

    routing_monitor_steps: int = field(default=50, metadata={"help": "Measure the applied routing every N steps (0: off)."})
    routing_probe_size: int = field(default=32, metadata={"help": "Examples held out from training as the routing probe set."})
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


class RoutingMonitorCallback(TrainerCallback):
    """Measures and logs the applied routing on a fixed probe set during training (see the module docstring)."""

    def __init__(self, trainer, probe_token_lists: list[list[int]], arguments: RoutingArguments, pad_token_id: int):
        self.trainer = trainer
        self.arguments = arguments
        self.probe = RoutingProbe(max_neurons=arguments.routing_max_neurons)
        world, rank = trainer.args.world_size, trainer.args.process_index
        usable = (len(probe_token_lists) // world) * world  # equal shards: every rank runs the same number of forwards
        if usable == 0:
            raise ValueError(f"routing_probe_size ({len(probe_token_lists)}) must be at least the number of processes ({world}).")
        shard = probe_token_lists[:usable][rank::world]
        self.batches = probe_batches(shard, arguments.routing_probe_batch_size, pad_token_id)
        self.snapshot = None
        self.initial_metrics = {}
        self.history: list[dict] = []
        self.alerts: list[dict] = []
        self.monitor_seconds = 0.0
        self.measurement_seconds: list[float] = []  # the first includes one-time kernel compilation for probe shapes
        self.train_started = None
        self.last_measured_step = None

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
        if snapshot_path.is_file() and metrics_path.is_file():
            # resumed run: compare against the original start, not the checkpoint
            self.snapshot = load_file(str(snapshot_path))
            self.initial_metrics = json.loads(metrics_path.read_text())
            metrics, _ = self._measure(model, state.global_step)
        else:
            metrics, snapshot = self._measure(model, state.global_step)
            self.snapshot = concatenate_snapshot(snapshot)
            self.initial_metrics = metrics
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            save_file({key: value.contiguous() for key, value in self.snapshot.items()}, str(snapshot_path))
            if self.trainer.is_world_process_zero():
                metrics_path.write_text(json.dumps(metrics, indent=2))
        self.trainer.log(dict(metrics))

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
        for kind, message in routing_alerts(
            metrics, self.initial_metrics, self.arguments.routing_collapse_threshold, self.arguments.routing_flip_rate_threshold
        ):
            self.alerts.append({"step": state.global_step, "kind": kind, "message": message})
            if self.trainer.is_world_process_zero():
                warnings.warn(f"Routing alert at step {state.global_step}: {message}", stacklevel=2)
            if self.arguments.routing_stop_on_alert:
                control.should_training_stop = True


def add_routing_callbacks(trainer, arguments: RoutingArguments, probe_token_lists, pad_token_id: int):
    """Attach the τ schedule and (unless monitoring is off) the routing monitor to a trainer."""
    trainer.add_callback(RoutingTauCallback(arguments))
    monitor = None
    if arguments.routing_monitor_steps > 0 and probe_token_lists:
        monitor = RoutingMonitorCallback(trainer, probe_token_lists, arguments, pad_token_id)
        trainer.add_callback(monitor)
    return monitor
