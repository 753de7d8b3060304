"""The C++ kernel's cache entry: verified before it is loaded, rebuilt once when bad, usable without a compiler.

A stand-in compiler (a shell script that copies the library this machine built, and counts its calls) keeps the
rebuilds fast; the loads are real `dlopen`s, in this process or a fresh one.
"""

import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from modeling_polyglu import cpu_mixing_kernel

LOAD = "from modeling_polyglu import cpu_mixing_kernel as k; print('loaded' if k.load_library() else 'fallback')"


@pytest.fixture(scope="module")
def built_library():
    """The library load_library built (or found) in the default cache."""
    if cpu_mixing_kernel.load_library() is None:
        pytest.skip("the C++ kernel cannot be built on this machine")
    return Path(cpu_mixing_kernel._verified_library(cpu_mixing_kernel._manifest_path()))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYGLU_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("POLYGLU_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpu_mixing_kernel, "_LIBRARY", {})
    return tmp_path / "cache" / "kernels"


def stand_in_compiler(tmp_path, library: Path) -> tuple[Path, Path]:
    """(script, call log): the script writes `library` to its -o argument and logs $POLYGLU_WRAPPED per call."""
    log, script = tmp_path / "compiler-calls.log", tmp_path / "fake-c++"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "call ${{POLYGLU_WRAPPED:-plain}}" >> "{log}"\n'
        'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then out="$2"; fi; shift; done\n'
        f'cp "{library}" "$out"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def install_entry(cache_dir: Path, library: Path) -> Path:
    """A valid cache entry (library + manifest) holding a copy of `library`; returns the cached library."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    staged = cache_dir / "staged.so"
    shutil.copy(library, staged)
    return Path(cpu_mixing_kernel._install(str(staged), cpu_mixing_kernel._manifest_path()))


def fresh_process(env_changes: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    env.pop("POLYGLU_DISABLE_CPU_KERNEL", None)
    return subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, timeout=120)


def test_a_truncated_cached_library_is_rebuilt_once_not_loaded(built_library, cache, tmp_path):
    """Loading the truncated .so used to kill every later process with SIGBUS (exit 135)."""
    cached = install_entry(cache, built_library)
    cached.write_bytes(built_library.read_bytes()[: built_library.stat().st_size // 2])
    compiler, log = stand_in_compiler(tmp_path, built_library)
    env = {"POLYGLU_KERNEL_CACHE": str(cache.parent), "CXX": str(compiler)}
    first = fresh_process(env)
    assert first.returncode == 0 and first.stdout.strip() == "loaded", first.stderr
    assert calls(log) == ["call plain"]
    second = fresh_process(env)
    assert second.returncode == 0 and second.stdout.strip() == "loaded", second.stderr
    assert calls(log) == ["call plain"], "a verified entry must not be rebuilt"


@pytest.mark.parametrize("damage", ["empty", "garbage", "no_manifest"])
def test_a_bad_entry_is_rebuilt_once_then_used(built_library, cache, tmp_path, monkeypatch, damage):
    cached = install_entry(cache, built_library)
    if damage == "empty":
        cached.write_bytes(b"")
    elif damage == "garbage":
        cached.write_bytes(os.urandom(cached.stat().st_size))  # same size, different digest
    else:
        Path(cpu_mixing_kernel._manifest_path()).unlink()
    compiler, log = stand_in_compiler(tmp_path, built_library)
    monkeypatch.setenv("CXX", str(compiler))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_mixing_kernel.load_library() is not None
    assert calls(log) == ["call plain"]


def test_a_bad_entry_that_cannot_be_rebuilt_falls_back_with_one_warning(built_library, cache, monkeypatch):
    cached = install_entry(cache, built_library)
    cached.write_bytes(b"\x7fELF" + b"\x00" * 64)
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="Could not build polyglu's C\\+\\+ CPU mixing kernel") as caught:
        assert cpu_mixing_kernel.load_library() is None
        assert cpu_mixing_kernel.load_library() is None
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_a_valid_entry_is_used_without_any_compiler_on_path(built_library, cache, tmp_path, monkeypatch):
    install_entry(cache, built_library)
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("CXX", raising=False)

    def no_build(manifest):
        raise AssertionError("the verified entry should have been loaded")

    monkeypatch.setattr(cpu_mixing_kernel, "_build", no_build)
    assert cpu_mixing_kernel.load_library() is not None


def test_cxx_with_arguments_is_split_like_a_shell_would(built_library, cache, tmp_path):
    compiler, log = stand_in_compiler(tmp_path, built_library)
    completed = fresh_process({"POLYGLU_KERNEL_CACHE": str(cache.parent), "CXX": f"env POLYGLU_WRAPPED=yes {compiler}"})
    assert completed.returncode == 0 and completed.stdout.strip() == "loaded", completed.stderr
    assert calls(log) == ["call yes"]
