"""The slow first forward (C++ kernel build, torch.compile) says once what is happening and that it is cached."""

import torch

from modeling_polyglu import activation_mixing, cpu_mixing_kernel


def test_kernel_build_is_announced_before_it_starts(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("POLYGLU_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_mixing_kernel, "_LIBRARY", {})

    def failing_build(manifest):
        print("build started", flush=True)
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpu_mixing_kernel, "_build", failing_build)
    monkeypatch.setattr(cpu_mixing_kernel.warnings, "warn", lambda *args, **kwargs: None)
    assert cpu_mixing_kernel.load_library() is None
    captured = capsys.readouterr()
    assert "building the C++ CPU mixing kernel (once, ~20 s); it is cached in " + str(tmp_path) in captured.err
    assert captured.out == "build started\n"


def test_torch_compile_is_announced_once(monkeypatch, capsys):
    monkeypatch.setattr(activation_mixing, "_COMPILE_ANNOUNCED", [])
    monkeypatch.setattr(activation_mixing, "_COMPILED", {})
    monkeypatch.delenv("POLYGLU_DISABLE_COMPILE", raising=False)
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: (lambda *args: function(*args)))  # no Inductor
    for name in ("first", "second", "first"):
        assert activation_mixing._call_kernel(name, torch.neg, "cpu", torch.ones(2)).tolist() == [-1.0, -1.0]
    assert capsys.readouterr().err.count("compiling the activation-mixing kernels with torch.compile") == 1
