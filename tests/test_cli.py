"""The `polyglu` command: the demo end to end, clear errors, and outputs that appear whole or not at all."""

import subprocess
import sys

import pytest

from modeling_polyglu.atomic_output import DestinationExistsError, atomic_directory
from modeling_polyglu.cli import main


def test_demo_trains_generates_saves_and_reloads(tmp_path, capsys):
    destination = tmp_path / "demo"
    assert main(["demo", "--steps", "40", "--output-dir", str(destination), "--ffn-type", "polyglu"]) == 0
    printed = capsys.readouterr().out
    assert "KV cache equal recomputation" in printed
    assert "max |Δlogit| = 0.00e+00" in printed
    losses = [line for line in printed.splitlines() if line.startswith("Held-out loss")]
    before, after = [float(word.rstrip(",.")) for word in losses[0].split() if word[0].isdigit()]
    assert after < before - 0.5  # it learned something in 40 steps
    assert (destination / "model.safetensors").is_file() and (destination / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_existing_destination_is_refused_in_one_line(tmp_path):
    destination = tmp_path / "taken"
    destination.mkdir()
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_polyglu.cli", "demo", "--output-dir", str(destination), "--steps", "1"],
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "already exists" in completed.stderr and "--overwrite" in completed.stderr
    assert "Traceback" not in completed.stderr


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
        (staging / "a.txt").write_text("first")
    with pytest.raises(DestinationExistsError):
        with atomic_directory(destination):
            pass
    with atomic_directory(destination, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in destination.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
