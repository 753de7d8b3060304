"""`polyglu compare`: the paired t-interval by hand, parameter matching, the paired initialisation, and a real
comparison that is SIGKILLed mid-run, resumed, reused on a re-run and summarised in comparison.json/.md."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_polyglu.cli import main as cli_main
from modeling_polyglu.training.compare import (
    matched_intermediate_size,
    paired_initial_model,
    summarise,
    with_fields,
)
from modeling_polyglu.training.pretrain import (
    PretrainArguments,
    build_config,
    complete_checkpoints,
    count_parameters,
    new_model,
)
from modeling_polyglu.training.pretrain_data import build_ascii_tokenizer
from modeling_polyglu.training.statistics import paired_t_interval, student_t_cdf, student_t_quantile

from .test_pretrain import write_corpus

# two-sided 95 % critical values t_{0.975, ν} from printed tables
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 29: 2.0452}


def test_t_quantiles_match_the_printed_table():
    for dof, value in T_TABLE.items():
        assert student_t_quantile(0.975, dof) == pytest.approx(value, abs=5e-5)
        assert student_t_cdf(value, dof) == pytest.approx(0.975, abs=1e-5)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=5e-5)
    assert student_t_cdf(0.0, 7) == 0.5


def test_t_quantiles_match_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 5, 12, 40):
        for probability in (0.6, 0.9, 0.975, 0.999):
            assert student_t_quantile(probability, dof) == pytest.approx(stats.t.ppf(probability, dof), rel=1e-9)


def test_paired_interval_against_a_hand_computation():
    # d = (0.1, 0.3, 0.2): mean 0.2, s = sqrt((0.01 + 0.01 + 0) / 2) = 0.1, t_{0.975,2} = 4.302653
    # half width = 4.302653 * 0.1 / sqrt(3) = 0.248414
    low, high = paired_t_interval([0.1, 0.3, 0.2])
    assert (low, high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert paired_t_interval([0.5]) is None

    runs = [{"ffn_type": ffn, "seed": seed, "final_eval_loss": loss, "num_parameters": 10, "intermediate_size": 4,
             "tokens_per_second": 1.0}
            for ffn, losses in (("swiglu", (2.0, 2.2, 2.1)), ("polyglu", (2.1, 2.5, 2.3)))
            for seed, loss in enumerate(losses)]
    baseline, variant = summarise(runs, "swiglu", ["swiglu", "polyglu"])
    assert baseline["delta_vs_baseline"] == 0.0 and baseline["ci95"] is None
    assert variant["delta_vs_baseline"] == pytest.approx(0.2)
    assert variant["std_eval_loss"] == pytest.approx(0.2)  # (2.1, 2.5, 2.3): s = 0.2
    assert variant["ci95"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-6)
    assert variant["significant"] is False


@pytest.mark.parametrize("ffn_type", ["geglu", "dualglu", "polyglu", "moa", "mlp_gelu"])
def test_parameter_matching_within_one_percent(ffn_type):
    config = build_config(PretrainArguments(config_overrides='{"intermediate_size": 96}'), build_ascii_tokenizer())
    target = count_parameters(new_model(with_fields(config, ffn_type="swiglu"), seed=0))
    size, counted = matched_intermediate_size(with_fields(config, ffn_type=ffn_type), target)
    real = count_parameters(new_model(with_fields(config, ffn_type=ffn_type, intermediate_size=size), seed=0))
    assert real == counted and abs(real - target) <= 0.01 * target
    if ffn_type == "mlp_gelu":  # two projections instead of three: d_ff grows by about 3/2
        assert size == pytest.approx(96 * 1.5, abs=2)
    with pytest.raises(ValueError, match="within 1%"):
        matched_intermediate_size(with_fields(config, ffn_type=ffn_type), target // 3)


def test_paired_initialisation_shares_what_shapes_allow():
    config = build_config(PretrainArguments(), build_ascii_tokenizer())
    reference = with_fields(config, ffn_type="swiglu")
    baseline = paired_initial_model(reference, reference, seed=3)
    same_shape = paired_initial_model(with_fields(config, ffn_type="polyglu"), reference, seed=3)
    smaller = paired_initial_model(with_fields(config, ffn_type="polyglu", intermediate_size=40), reference, seed=3)
    other_seed = paired_initial_model(with_fields(config, ffn_type="polyglu"), reference, seed=4)
    expected = baseline.state_dict()
    for model in (same_shape, smaller):
        state = model.state_dict()
        for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"):
            torch.testing.assert_close(state[name], expected[name], rtol=0, atol=0)
    torch.testing.assert_close(same_shape.state_dict()["model.layers.1.mlp.gate_proj.weight"],
                               expected["model.layers.1.mlp.gate_proj.weight"], rtol=0, atol=0)
    assert smaller.state_dict()["model.layers.1.mlp.gate_proj.weight"].shape[0] == 40
    assert not torch.equal(other_seed.state_dict()["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])


def _compare_command(corpus: Path, output: Path, *extra: str) -> list[str]:
    return [
        "compare", "--ffn-types", "swiglu,polyglu", "--seeds", "2", "--config", "tiny-debug", "--dataset", str(corpus),
        "--output_dir", str(output), "--max_steps", "16", "--eval_steps", "4", "--save_steps", "4",
        "--max_length", "32", "--eval_rows", "8", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--routing_monitor_steps", "0", "--disable_tqdm", "true", *extra,
    ]


# `polyglu ...` that kills itself with SIGKILL as the polyglu-seed0 run begins its 7th optimizer step
_KILLED_AT_STEP_6_OF_POLYGLU_SEED0 = """
import os, signal, sys
from transformers import Trainer
from modeling_polyglu.cli import main

original_training_step = Trainer.training_step

def training_step(self, *args, **kwargs):
    if self.args.output_dir.endswith("polyglu-seed0") and self.state.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_training_step(self, *args, **kwargs)

Trainer.training_step = training_step
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(arguments: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_polyglu.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_compare_resumes_after_sigkill_reuses_finished_runs_and_reports(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    output = tmp_path / "out"
    command = _compare_command(corpus, output)
    # SIGKILL the whole command in the middle of the second run (polyglu, seed 0): its checkpoint-4 is complete and
    # checkpoint-8 not begun. Waiting for the folder from outside misses it: a tiny run keeps each checkpoint ~40 ms.
    victim = output / "runs" / "polyglu-seed0"
    process = subprocess.run([sys.executable, "-c", _KILLED_AT_STEP_6_OF_POLYGLU_SEED0, *command], capture_output=True,
                             text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert [folder.name for folder in complete_checkpoints(victim)] == ["checkpoint-4"]
    assert not (victim / "run_summary.json").exists()

    resumed = _run_cli(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    console = resumed.stdout + resumed.stderr
    assert "swiglu-seed0: finished before, reused" in console
    assert "polyglu-seed0: resuming from checkpoint-" in console

    comparison = json.loads((output / "comparison.json").read_text())
    assert comparison["baseline"] == "swiglu"
    assert [(run["ffn_type"], run["seed"]) for run in comparison["runs"]] == [
        ("swiglu", 0), ("polyglu", 0), ("swiglu", 1), ("polyglu", 1)]
    for run in comparison["runs"]:
        assert set(run) >= {"ffn_type", "seed", "final_eval_loss", "num_parameters", "tokens_per_second", "run_dir",
                            "eval_loss_history"}
        assert [step for step, _ in run["eval_loss_history"]] == [0, 4, 8, 12, 16]
        assert run["final_eval_loss"] == run["eval_loss_history"][-1][1]
        assert abs(run["num_parameters"] - comparison["baseline_num_parameters"]) <= 0.01 * comparison["baseline_num_parameters"]
    resumed_summary = json.loads((victim / "run_summary.json").read_text())
    assert resumed_summary["resumed_from_step"] == 4

    by_key = {(run["ffn_type"], run["seed"]): run["final_eval_loss"] for run in comparison["runs"]}
    differences = [by_key[("polyglu", seed)] - by_key[("swiglu", seed)] for seed in (0, 1)]
    rows = {row["ffn_type"]: row for row in comparison["summary"]}
    assert set(rows["polyglu"]) >= {"ffn_type", "n", "mean_eval_loss", "std_eval_loss", "delta_vs_baseline", "ci95"}
    assert rows["polyglu"]["n"] == 2
    assert rows["polyglu"]["delta_vs_baseline"] == pytest.approx(sum(differences) / 2)
    half_width = 12.7062 * abs(differences[0] - differences[1]) / math.sqrt(2) / math.sqrt(2)  # s = |d0 − d1| / √2
    assert rows["polyglu"]["ci95"] == pytest.approx([sum(differences) / 2 - half_width, sum(differences) / 2 + half_width], abs=1e-4)
    table = (output / "comparison.md").read_text()
    assert "| polyglu |" in table and "significant" in table
    assert (output / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every run is a normal checkpoint with its remote code
    assert {"modeling_polyglu.py", "configuration_polyglu.py", "config.json", "README.md"} <= {p.name for p in victim.iterdir()}
    assert "AutoModelForCausalLM" in json.loads((victim / "config.json").read_text())["auto_map"]

    # the resumed run ends where an uninterrupted one does (same data order, restored optimizer and RNG)
    from modeling_polyglu.training.compare import build_parser
    from modeling_polyglu.training.pretrain import parse_arguments, run_pretrain

    _, arguments, training_args, routing_args = parse_arguments(
        build_parser(), command[1:] + ["--output_dir", str(tmp_path / "reference"), "--seed", "0", "--ffn_type",
                                       "polyglu", "--intermediate_size", str(resumed_summary["intermediate_size"])])
    config = build_config(arguments, build_ascii_tokenizer())
    model = paired_initial_model(config, with_fields(config, ffn_type="swiglu", intermediate_size=64), seed=0)
    reference = run_pretrain(arguments, training_args, routing_args, model=model, quiet=True)
    assert resumed_summary["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], abs=1e-4)

    # the same command again trains nothing; other settings into the same folder are refused in one line
    assert cli_main(command) == 0
    assert cli_main(command + ["--learning_rate", "1e-3"]) == 2


def test_variant_fields_reach_the_run_and_its_folder(tmp_path):
    from modeling_polyglu.training.compare import parse_variant, run_arguments_for, run_directory

    assert parse_variant("polyglu:routing_tau=0.5:routing_hard=true") == ("polyglu", {"routing_tau": 0.5, "routing_hard": True})
    with pytest.raises(ValueError, match="field=value"):
        parse_variant("dualglu:static_equal")
    with pytest.raises(ValueError, match="'dualglu_mix' is not a PolyGLUConfig field; did you mean 'dualglu_mixing'"):
        parse_variant("dualglu:dualglu_mix=static_equal")
    entry = {"ffn_type": "dualglu:dualglu_mixing=static_equal", "seed": 1, "intermediate_size": 48}
    run_dir = run_directory(tmp_path, entry["ffn_type"], 1)
    assert run_dir.name == "dualglu-dualglu_mixing=static_equal-seed1"
    arguments = PretrainArguments(config_overrides='{"routing_tau": 0.5}')
    argv = run_arguments_for(["--max_steps", "3"], arguments, entry, run_dir)
    assert json.loads(argv[argv.index("--config_overrides") + 1]) == {"routing_tau": 0.5, "dualglu_mixing": "static_equal"}


REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", sorted((REPOSITORY / "recipes" / "pretrain").glob("*.yaml")), ids=lambda path: path.stem)
def test_pretrain_recipes_parse_and_match_parameters(recipe, monkeypatch):
    """Every recipe parses, and its variants' parameter counts (Qwen3 tokenizer size) are planned as it says."""
    from modeling_polyglu.training.compare import build_parser, plan_runs
    from modeling_polyglu.training.pretrain import parse_arguments

    class QwenSizedTokenizer:  # the Qwen3 tokenizer's size and ids, without downloading it
        pad_token_id, bos_token_id, eos_token_id = 151643, None, 151643

        def __len__(self):
            return 151669

    monkeypatch.chdir(REPOSITORY)  # recipes name their model configs relative to the checkout, as their commands run
    compare_args, arguments, training_args, _ = parse_arguments(build_parser(), ["--config", str(recipe), "--output_dir", "x"])
    plan, _, target = plan_runs(compare_args, arguments, QwenSizedTokenizer())
    assert len(plan) == len(compare_args.variants()) * len(compare_args.seed_list())
    assert 80e6 < target < 140e6 and training_args.max_steps > 0 and training_args.bf16
    if compare_args.match == "params":
        assert all(abs(entry["num_parameters"] - target) <= 0.01 * target for entry in plan)
