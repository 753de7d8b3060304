"""The C++ CPU kernel of the fused mixing: that it is built and used, its special paths, and its fallbacks.

Its values and gradients on every layout are compared with the naive implementation in test_activation_mixing.py
(which runs both backends); here: the kernel's exact-softmax fallback under saturated routing, threads splitting
the per-neuron reductions, extreme pre-activations, and what happens when it cannot be built or cannot take the
inputs. Tolerances: fp32, norm-wise relative 1e-5 against the naive implementation (1e-6 between thread counts).
"""

import warnings

import pytest
import torch

from modeling_polyglu import activation_mixing, cpu_mixing_kernel
from modeling_polyglu.activation_mixing import ACTIVATIONS, mix_activations, mix_activations_naive

DICTIONARY = ("relu", "tanh", "silu", "gelu")


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def polyglu_inputs(shape=(3, 11, 45), per_sequence=True, scale=1.0, seed=0):
    batch, length, width = shape
    generator = torch.Generator().manual_seed(seed)
    static_batch = batch if per_sequence else 1
    return [
        (torch.randn(*dims, generator=generator) * s).requires_grad_()
        for dims, s in [
            ((batch, length, width), 2.0),
            ((batch, length, width), 1.0),
            ((static_batch, 1, width, len(DICTIONARY)), scale),
            ((batch, length, 1, len(DICTIONARY)), scale),
        ]
    ]


def values_and_gradients(function, inputs, activations=DICTIONARY, **kwargs):
    output = function(inputs[0], inputs[1], activations, inputs[2], inputs[3], **kwargs)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(7))
    leaves = [t for t in inputs if t is not None]
    return [output.detach(), *torch.autograd.grad(output, leaves, upstream)]


@pytest.fixture
def counted_kernel_calls(monkeypatch):
    calls = {"forward": 0, "backward": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(activation_mixing, "cpu_mix_forward", counting("forward", activation_mixing.cpu_mix_forward))
    monkeypatch.setattr(activation_mixing, "cpu_mix_backward", counting("backward", activation_mixing.cpu_mix_backward))
    return calls


def test_kernel_builds_here_and_runs_for_routed_fp32_cpu_inputs_only(counted_kernel_calls):
    assert cpu_mixing_kernel.load_library() is not None, "the C++ kernel did not build on this machine"
    inputs = polyglu_inputs()
    values_and_gradients(mix_activations, inputs)
    assert counted_kernel_calls == {"forward": 1, "backward": 1}
    gate = torch.randn(2, 3, 8, requires_grad=True)
    mix_activations(gate, gate.detach(), ("silu",)).sum().backward()  # SwiGLU: torch's kernels, Qwen3's exact bits
    assert counted_kernel_calls == {"forward": 1, "backward": 1}


def test_other_dtypes_and_too_many_activations_take_the_torch_path(counted_kernel_calls):
    half = [t.detach().bfloat16().requires_grad_() if i < 2 else t for i, t in enumerate(polyglu_inputs())]
    values_and_gradients(mix_activations, half)
    gate = torch.randn(2, 3, 8, requires_grad=True)
    many = ("relu", "tanh", "silu", "gelu", "gelu_tanh", "sigmoid", "identity", "relu", "tanh")
    mix_activations(gate, None, many, torch.randn(1, 1, 1, len(many))).sum().backward()
    assert counted_kernel_calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("hard", [False, True])
def test_saturated_routing_takes_the_exact_path_and_stays_accurate(hard):
    """Static and token logits that disagree by far more than τ: the factorised denominator underflows e^-20."""
    inputs = polyglu_inputs(scale=30.0)
    fused = values_and_gradients(mix_activations, inputs, tau=0.1, hard=hard)
    naive = values_and_gradients(mix_activations_naive, inputs, tau=0.1, hard=hard)
    for a, b in zip(fused, naive):
        assert torch.isfinite(a).all()
        assert relative(a, b) <= 1e-5


@pytest.mark.parametrize("per_sequence", [False, True])
def test_threads_split_rows_without_changing_the_result(per_sequence):
    inputs = polyglu_inputs(shape=(2, 37, 70), per_sequence=per_sequence)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = values_and_gradients(mix_activations, inputs)
        torch.set_num_threads(2)
        assert cpu_mixing_kernel._rows_per_block(2, 37, 2) < 37  # the column sums are split into several blocks
        several = values_and_gradients(mix_activations, inputs)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(several, single):
        assert relative(a, b) <= 1e-6


def assert_activation_agrees_with_torch_over_a_wide_range(name: str, device: str = "cpu", backend: str = "fused"):
    """φ and φ' of one activation through the fused op, fp32, on x in [-120, 120], against the torch functions in
    fp64. The slopes are where cancellation hides: 1 - sigmoid(x) and 1 - tanh(x)^2 at large x, where a last-ulp error
    of sigmoid or tanh (AVX2's refined reciprocal of 1 is 1 - 2^-24) becomes x·6e-8 in SiLU's slope and ~x^3·1e-7 in
    GELU-tanh's (0.011 at x = 120)."""
    gate = torch.linspace(-120.0, 120.0, 24000, device=device).reshape(3, 8, -1).requires_grad_()
    unit_coefficient = torch.ones(1, 1, 1, 1, device=device)  # a fixed activation alone would take torch's kernels
    fused = mix_activations(gate, None, (name,), unit_coefficient, normalization="linear", backend=backend)
    (fused_slope,) = torch.autograd.grad(fused.sum(), gate)
    wide = gate.detach().double()
    reference = ACTIVATIONS[name].function(wide)
    reference_slope = ACTIVATIONS[name].derivative(wide)
    assert torch.isfinite(fused).all() and torch.isfinite(fused_slope).all()
    # absolute: erf-based GELU's tail is 1 - erf, whose absolute error (1.5e-7, as in torch's own kernel) dominates
    assert (fused.double() - reference).abs().max() <= 2e-7 * reference.abs().clamp_min(1.0).max()
    assert (fused_slope.double() - reference_slope).abs().max() <= 2e-6
    assert relative(fused, reference) <= 1e-6


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_agree_with_torch_over_a_wide_range(name):
    assert_activation_agrees_with_torch_over_a_wide_range(name)


def test_a_kernel_that_cannot_be_built_falls_back_once_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYGLU_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_mixing_kernel, "_LIBRARY", {})

    def no_compiler(path):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpu_mixing_kernel, "_build", no_compiler)
    inputs = polyglu_inputs()
    with pytest.warns(RuntimeWarning, match="Could not build polyglu's C\\+\\+ CPU mixing kernel"):
        fused = values_and_gradients(mix_activations, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        again = values_and_gradients(mix_activations, inputs)
    naive = values_and_gradients(mix_activations_naive, inputs)
    for a, b, c in zip(fused, again, naive):
        assert relative(a, c) <= 1e-5
        assert torch.equal(a, b)
    assert not list(tmp_path.rglob("*.so"))


def test_disabled_kernel_is_not_used(monkeypatch, counted_kernel_calls):
    monkeypatch.setenv("POLYGLU_DISABLE_CPU_KERNEL", "1")
    values_and_gradients(mix_activations, polyglu_inputs())
    assert counted_kernel_calls == {"forward": 0, "backward": 0}


def test_compiler_output_lands_atomically_in_the_cache(monkeypatch, tmp_path):
    """A build writes into a temporary directory beside the target and renames: no partial library is visible."""
    monkeypatch.setenv("POLYGLU_KERNEL_CACHE", str(tmp_path))
    seen = []

    def fake_run(command, **kwargs):
        output = command[command.index("-o") + 1]
        seen.append(output)
        with open(output, "wb") as handle:
            handle.write(b"not a library")
        return type("Completed", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(cpu_mixing_kernel.subprocess, "run", fake_run)
    manifest = cpu_mixing_kernel._manifest_path()
    target = cpu_mixing_kernel._build(manifest)
    assert seen and seen[0] != target and ".build-" in seen[0]
    assert open(target, "rb").read() == b"not a library"
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == sorted([target.rsplit("/", 1)[-1], manifest.rsplit("/", 1)[-1]])
    assert cpu_mixing_kernel._verified_library(manifest) == target


@pytest.mark.parametrize("static_shape, token_shape", [
    ((1, 1, 24, 4), (2, 1, 1, 4)),  # one token logit per sequence, broadcast along it
    ((2, 1, 24, 4), (1, 1, 1, 4)),
    (None, (2, 1, 1, 4)),
    ((1, 1, 1, 4), (1, 5, 1, 4)),
    ((2, 1, 1, 4), (2, 5, 1, 4)),
])
def test_broadcast_logits_get_gradients_of_their_own_shape(static_shape, token_shape, counted_kernel_calls):
    generator = torch.Generator().manual_seed(2)

    def leaf(shape):
        return None if shape is None else torch.randn(*shape, generator=generator).requires_grad_()

    inputs = [leaf((2, 5, 24)), leaf((2, 5, 24)), leaf(static_shape), leaf(token_shape)]
    fused = values_and_gradients(mix_activations, inputs)
    naive = values_and_gradients(mix_activations_naive, inputs)
    assert counted_kernel_calls == {"forward": 1, "backward": 1}
    for a, b in zip(fused, naive):
        assert a.shape == b.shape
        assert relative(a, b) <= 1e-5
