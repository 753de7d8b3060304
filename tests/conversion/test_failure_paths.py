"""Conversions fed bad inputs and faults: nothing of the user's is lost, errors are one line with a non-zero exit.

Real `polyglu convert polychromatic` runs on a small reference checkpoint (the fastest conversion); the staging rules
they exercise are shared with `convert qwen3` and the demo.
"""

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from modeling_polyglu.cli import describe_os_error, main
from modeling_polyglu.conversion import polychromatic
from modeling_polyglu.conversion.staging import OWNER_FILE, atomic_directory

from ..reference_polychromatic import make_reference_state_dict, write_reference_checkpoint


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "src" / "reference.pt"
    path.parent.mkdir()
    write_reference_checkpoint(path, make_reference_state_dict(seed=5), "sft", 0.1)
    return path


def convert(source, destination, *extra):
    return main(["convert", "polychromatic", "--src", str(source), "--dst", str(destination), *extra])


def one_error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_a_destination_that_appears_meanwhile_is_kept_whole(reference, tmp_path, capsys, monkeypatch):
    """Two runs to one --dst: the one finishing second fails; the first one's output is untouched."""
    destination = tmp_path / "dst"
    real_card = polychromatic.write_model_card

    def other_run_finishes_first(*args, **kwargs):
        monkeypatch.setattr(polychromatic, "write_model_card", real_card)
        assert convert(reference, destination, "--tau", "0.25") == 0
        return real_card(*args, **kwargs)

    monkeypatch.setattr(polychromatic, "write_model_card", other_run_finishes_first)
    capsys.readouterr()
    assert convert(reference, destination) == 2
    assert "appeared while this run was writing" in one_error_line(capsys)
    assert json.loads((destination / "config.json").read_text())["routing_tau"] == 0.25
    assert (destination / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize("where", ["source_parent", "source_itself"])
def test_overwrite_never_replaces_a_directory_holding_the_source(reference, tmp_path, capsys, where):
    destination = reference.parent if where == "source_parent" else reference
    (reference.parent / "notes.txt").write_text("mine")
    (reference.parent / "config.json").write_text("{}")  # looks like a model directory: still refused
    assert convert(reference, destination, "--overwrite") == 2
    assert "is or contains the source" in one_error_line(capsys)
    assert reference.is_file() and (reference.parent / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_only_model_directories(reference, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    assert convert(reference, ".", "--overwrite") == 2
    assert "is not a model directory" in one_error_line(capsys)
    assert (work / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(work)) == ["thesis.tex"]
    assert convert(reference, tmp_path / "model") == 0
    assert convert(reference, tmp_path / "model", "--overwrite", "--tau", "0.5") == 0  # a converted model: replaced
    assert json.loads((tmp_path / "model" / "config.json").read_text())["routing_tau"] == 0.5


def test_staging_of_a_killed_run_is_removed_by_the_next_run(reference, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = {}
        for name, pid in (("dead", int(dead.stdout)), ("alive", alive.pid)):
            staging = tmp_path / f".tmp-dst-{name}"
            staging.mkdir()
            (staging / "model.safetensors").write_bytes(b"x" * 1024)
            (staging / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
            leftovers[name] = staging
        foreign = tmp_path / ".tmp-dst-not-ours"  # no owner file: never touched
        foreign.mkdir()
        assert convert(reference, tmp_path / "dst") == 0
        assert not leftovers["dead"].exists()
        assert leftovers["alive"].exists() and foreign.exists()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_converted_directories_honour_the_umask(reference, tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "plain") as staging:
            (staging / "config.json").write_text("{}")
        assert convert(reference, tmp_path / "dst") == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "dst" / "config.json").stat().st_mode) == mode & 0o666


def test_a_failing_write_is_one_line_and_leaves_nothing(reference, tmp_path, capsys):
    """A file-size limit makes the kernel fail writes past 16 KiB (EFBIG), as a full disk fails them (ENOSPC)."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error return instead of the signal's kill
    capsys.readouterr()
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, limits[1]))
    try:
        code = convert(reference, tmp_path / "dst")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert code == 1
    error = one_error_line(capsys)
    assert "model.safetensors: could not be written" in error and "File too large" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_os_errors_name_the_fix():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/model.safetensors")
    assert describe_os_error(full).endswith("; free disk space or choose another destination")
    wrapped = OSError("/data/out/model.safetensors: could not be written (IoError(Os { kind: StorageFull }))")
    assert "free disk space" in describe_os_error(wrapped)
    assert "read-only" in describe_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x"))


def test_a_read_only_destination_is_one_line(reference, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert convert(reference, parent / "dst") == 1
        assert "Permission denied" in one_error_line(capsys)
    finally:
        parent.chmod(0o755)


def _safetensors_source(tmp_path, change):
    state_dict = make_reference_state_dict(seed=5)
    state_dict.pop("output_head.weight", None)  # tied to the embeddings: safetensors stores shared memory once
    change(state_dict)
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata={"tau": "0.1"})
    return path


@pytest.mark.parametrize("breakage, message", [
    ("empty_pt", "is empty (0 bytes)"),
    ("random_bytes", "not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"),
    ("tau_none", "entry 'tau' is None, not a number > 0; pass --tau"),
    ("tau_text", "metadata field 'tau' is 'abc', not a number > 0"),
    ("int32_tensor", "is int32; model weights must be float32, bfloat16 or float16"),
    ("bool_tensor", "is bool; model weights must be float32"),
    ("mixed_dtypes", "tensors mix dtypes"),
])
def test_bad_reference_files_fail_in_one_line(tmp_path, capsys, breakage, message):
    if breakage == "empty_pt":
        source = tmp_path / "c.pt"
        source.write_bytes(b"")
    elif breakage == "random_bytes":
        source = tmp_path / "c.pt"
        source.write_bytes(b"\x00" + os.urandom(4095))  # neither zip (PK) nor pickle (0x80) magic
    elif breakage == "tau_none":
        source = tmp_path / "c.pt"
        torch.save({"model": make_reference_state_dict(seed=5), "tau": None, "step": 1}, source)
    elif breakage == "tau_text":
        source = _safetensors_source(tmp_path, lambda sd: None)
        tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(source)))
        save_file(tensors, str(source), metadata={"tau": "abc"})
    elif breakage == "int32_tensor":
        source = _safetensors_source(tmp_path, lambda sd: sd.update({"model_core.0.gqa.W_q.weight": sd["model_core.0.gqa.W_q.weight"].int()}))
    elif breakage == "bool_tensor":
        source = _safetensors_source(tmp_path, lambda sd: sd.update({"rmsnorm.gama": sd["rmsnorm.gama"] > 0}))
    else:
        source = _safetensors_source(tmp_path, lambda sd: sd.update({"model_core.1.gqa.W_k.weight": sd["model_core.1.gqa.W_k.weight"].half()}))
    assert convert(source, tmp_path / "dst") == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "dst").exists()


def test_inspect_on_a_missing_directory_names_it(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    error = one_error_line(capsys)
    assert "nope: no such directory" in error and "huggingface.co" not in error
