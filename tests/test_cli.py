"""The `polyglu` command: the demo end to end, clear errors, and outputs that appear whole or not at all."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_polyglu.conversion.staging import DestinationExistsError, atomic_directory, write_file_atomically
from modeling_polyglu.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    destination = tmp_path / "demo"
    assert main(["demo", "--pretrain-steps", "60", "--sft-steps", "16", "--output-dir", str(destination)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((destination / "demo_summary.json").read_text())
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"] - 0.5  # SFT taught the chat format
    assert summary["retrofit_mean_kl"] <= 1e-4
    assert summary["fresh_process_module"].startswith("transformers_modules.")
    assert 0.0 <= summary["routing_final"]["routing/entropy"] <= 1.0
    for path in summary["report_files"].values():
        assert Path(path).is_file()
    assert "held-out accuracy" in printed and "routing: entropy" in printed
    assert (destination / "sft" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_existing_destination_is_refused_in_one_line(tmp_path):
    destination = tmp_path / "taken"
    destination.mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_polyglu.cli", "demo", "--output-dir", str(destination), "--sft-steps", "1"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "already exists" in completed.stderr and "--overwrite" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("command, option", [
    (["demo"], "--ffn-type"),
    (["convert", "qwen3"], "--router-init-activation"),
    (["convert", "polychromatic"], "--tokenizer"),
    (["inspect"], "--text"),
    (["bench"], "--suite"),
    (["sft"], "--routing_probe_tokens"),
    (["pretrain"], "--routing_probe_tokens"),
    (["compare"], "--match"),
])
def test_every_command_prints_its_help(command, option, capsys):
    """argparse %-formats every help string: one bare percent sign made `--help` a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ") and option in printed


@pytest.mark.parametrize("arguments, message", [
    (["--sft-steps", "0"], "polyglu demo: error: argument --sft-steps: expected a whole number >= 1, got '0'"),
    (["--pretrain-steps", "-3"], "polyglu demo: error: argument --pretrain-steps: expected a whole number >= 1, got '-3'"),
    (["--base-model", "{tmp}/qwen3"], "polyglu demo: error: --base-model {tmp}/qwen3: no such directory; pass the "
                                      "directory of a saved checkpoint (config.json and weights)."),
    (["--base-model", "{tmp}/untokenized"], "polyglu demo: error: --base-model {tmp}/untokenized: no tokenizer in it "
                                            "(tokenizer.json or tokenizer_config.json), which the demo's chat data "
                                            "needs; save the model's tokenizer there (tokenizer.save_pretrained(DIR))."),
], ids=["no_sft_steps", "negative_pretrain_steps", "missing_base_model", "base_model_without_tokenizer"])
def test_the_demo_refuses_bad_arguments_before_any_stage(arguments, message, tmp_path, capsys):
    """Each was found only at its stage (the fine-tuning refused --max_steps 0 after the pretraining), or not at all
    (negative pretraining steps trained by epochs)."""
    (tmp_path / "untokenized").mkdir()
    (tmp_path / "untokenized" / "config.json").write_text("{}")
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    try:
        code = main(["demo", "--output-dir", str(tmp_path / "demo"), *arguments])
    except SystemExit as exit_info:  # argparse's own refusals
        code = exit_info.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == message.format(tmp=tmp_path) and "[1/4]" not in "\n".join(error)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--generate-lengths", "64,0", "comma-separated whole numbers >= 1"),
    ("--convert-shard-mb", "x", "comma-separated whole numbers >= 1"),
    ("--decode-tokens", "0", "a whole number >= 1"),
    ("--convert-total-gb", "-1", "a number > 0"),
])
def test_bench_sizes_below_one_are_refused_by_the_parser(option, value, expected, capsys):
    """--generate-lengths 0 reached generate() and ended in a ValueError traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", option, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"polyglu bench: error: argument {option}: expected {expected}, got {value!r}"
    )


@pytest.mark.parametrize("command", ["sft", "pretrain", "compare"])
def test_a_missing_or_broken_yaml_recipe_is_one_line(command, tmp_path, capsys):
    """TRL's and transformers' parsers read --config with a FileNotFoundError or a yaml ScannerError traceback."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1e-4\n")
    for argument, message in (
        (f"--config={tmp_path / 'missing.yaml'}", f"--config {tmp_path / 'missing.yaml'}: no such file; pass a YAML "
                                                  "recipe (see recipes/*.yaml)."),
        (str(broken), f"--config {broken}: not valid YAML at line 2, column 1 (expected ',' or ']', but got "
                      "'<stream end>'); fix the file."),
    ):
        arguments = [argument] if argument.startswith("--config=") else ["--config", argument]
        assert main([command, *arguments, "--output_dir", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.strip() == f"polyglu {command}: error: {message}"
    assert not (tmp_path / "out").exists()


def test_unknown_ffn_type_is_rejected_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--ffn-type", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_atomic_directory_leaves_nothing_after_a_failure(tmp_path):
    destination = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(destination) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_when_asked(tmp_path):
    destination = tmp_path / "model"
    with atomic_directory(destination) as staging:
        (staging / "config.json").write_text("{}")
    with pytest.raises(DestinationExistsError):
        with atomic_directory(destination):
            pass
    with atomic_directory(destination, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in destination.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_is_replaced_only_by_a_complete_write(tmp_path):
    report = tmp_path / "routing_report.json"
    write_file_atomically(report, lambda staging: staging.write_text('{"step": 1}'))
    assert report.read_text() == '{"step": 1}'

    def interrupted(staging):
        staging.write_text('{"st')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_file_atomically(report, interrupted)
    assert report.read_text() == '{"step": 1}'  # the last complete report, not half of the next
    assert [path.name for path in tmp_path.iterdir()] == ["routing_report.json"]
    write_file_atomically(report, lambda staging: staging.write_text('{"step": 2}'))
    assert report.read_text() == '{"step": 2}'


def test_the_training_extra_modules_are_setup_cfgs_train_extra():
    import configparser

    from modeling_polyglu.cli import TRAINING_EXTRA_MODULES

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    requirements = setup["options.extras_require"]["train"].split()
    names = {requirement.split(">")[0].split("<")[0].split("=")[0] for requirement in requirements}
    assert names == TRAINING_EXTRA_MODULES


@pytest.mark.parametrize("argv, missing", [
    (["sft", "--help"], "trl"),
    (["compare", "--help"], "trl"),
    (["demo", "--output-dir", "{tmp}/demo"], "datasets"),
])
def test_a_missing_training_extra_is_one_line_before_any_work(argv, missing, tmp_path):
    """A base install (no [train] extra) asked for a training command: the module and the install line, exit 2."""
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    script = (f"import sys; sys.modules[{missing!r}] = None\n"  # what importing it raises where it is not installed
              "from modeling_polyglu.cli import main; sys.exit(main(sys.argv[1:]))")
    completed = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-3000:]
    command = f"polyglu {argv[0]}"
    assert completed.stderr.strip() == (
        f"{command}: error: {missing} is not installed, and {command} needs the training extras: "
        "pip install 'polyglu[train]' (in a checkout: pip install -e '.[train]')"
    )
    assert "[1/4]" not in completed.stdout, "the demo started its pipeline before it found the missing module"
    assert not list(tmp_path.iterdir())
