"""The fused activation-mixing op against the naive [B, T, F, K] implementation: values and every gradient.

Tolerances: fp32 within 1e-5 norm-wise relative (‖a−b‖/‖b‖) for both fp32 CPU backends (the C++ kernel and the
torch functions), fp64 gradcheck, bf16 within 2e-2 of the fp32 result.
"""

import pytest
import torch

from modeling_polyglu import activation_mixing
from modeling_polyglu.activation_mixing import ACTIVATIONS, mix_activations, mix_activations_naive

from .utils import ALL_VARIANTS, tiny_model, variant_id

DICTIONARY = ("relu", "tanh", "silu", "gelu")

# (name, static shape as (S, 1, F or 1), token shape as (B, T, 1) or None, normalization, activations)
LAYOUTS = [
    ("fixed", None, None, "linear", ("silu",)),
    ("per_layer_static", (1, 1, 1), None, "softmax", ("silu", "gelu")),
    ("per_neuron_static", (1, 1, "F"), None, "softmax", DICTIONARY),
    ("per_sequence_neuron", ("B", 1, "F"), None, "softmax", DICTIONARY),
    ("per_token", None, ("B", "T", 1), "softmax", DICTIONARY),
    ("factorised_token_x_neuron", ("B", 1, "F"), ("B", "T", 1), "softmax", DICTIONARY),
    ("linear_coefficients", (1, 1, 1), None, "linear", DICTIONARY),
    ("linear_token_gate", None, ("B", "T", 1), "linear", ("gelu",)),
]


def make_inputs(layout, shape, dtype=torch.float32, gated=True, seed=0):
    _, static, token, _, activations = layout
    batch, length, width = shape
    sizes = {"B": batch, "T": length, "F": width}
    generator = torch.Generator().manual_seed(seed)

    def tensor(*dims, scale=1.0):
        return (torch.randn(*dims, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()

    k = len(activations)
    return (
        tensor(batch, length, width, scale=2.0),
        tensor(batch, length, width) if gated else None,
        None if static is None else tensor(*[sizes.get(d, d) for d in static], k),
        None if token is None else tensor(*[sizes.get(d, d) for d in token], k),
    )


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(layout, shape, hard=False, gated=True, tau=0.7, dtype=torch.float32):
    _, _, _, normalization, activations = layout
    inputs = make_inputs(layout, shape, dtype, gated)
    kwargs = dict(tau=tau, normalization=normalization, hard=hard)
    fused = mix_activations(inputs[0], inputs[1], activations, inputs[2], inputs[3], **kwargs)
    naive = mix_activations_naive(inputs[0], inputs[1], activations, inputs[2], inputs[3], **kwargs)
    upstream = torch.randn(fused.shape, generator=torch.Generator().manual_seed(9), dtype=fused.dtype)
    leaves = [t for t in inputs if t is not None]
    fused_grads = torch.autograd.grad(fused, leaves, upstream)
    naive_grads = torch.autograd.grad(naive, leaves, upstream)
    return relative(fused, naive), [relative(a, b) for a, b in zip(fused_grads, naive_grads)]


@pytest.fixture(params=["cpu_kernel", "torch"])
def backend(request, monkeypatch):
    """fp32 on CPU runs the C++ kernel; with it disabled, the torch functions (eager in the test suite)."""
    monkeypatch.setenv("POLYGLU_DISABLE_CPU_KERNEL", "0" if request.param == "cpu_kernel" else "1")
    return request.param


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_matches_naive_in_fp32_on_odd_shapes(layout, hard, gated, backend):
    value_error, gradient_errors = compare(layout, (6, 42, 123), hard=hard, gated=gated)
    assert value_error <= 1e-5
    assert max(gradient_errors) <= 1e-5, gradient_errors


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_gradcheck_in_fp64(layout):
    _, _, _, normalization, activations = layout
    inputs = make_inputs(layout, (2, 3, 5), torch.float64)
    leaves = [t for t in inputs if t is not None]

    def function(*tensors):
        it = iter(tensors)
        gate, up = next(it), next(it)
        static = next(it) if inputs[2] is not None else None
        token = next(it) if inputs[3] is not None else None
        return mix_activations(gate, up, activations, static, token, tau=0.7, normalization=normalization)

    assert torch.autograd.gradcheck(function, leaves)


@pytest.mark.parametrize("layout", LAYOUTS[2:6], ids=[layout[0] for layout in LAYOUTS[2:6]])
def test_bf16_stays_close_to_fp32(layout):
    _, _, _, normalization, activations = layout
    full = make_inputs(layout, (3, 17, 64), torch.float32)
    half = [None if t is None else t.detach().to(torch.bfloat16).requires_grad_() for t in full]
    reference = mix_activations(full[0], full[1], activations, full[2], full[3], normalization=normalization)
    result = mix_activations(half[0], half[1], activations, half[2], half[3], normalization=normalization)
    assert result.dtype == torch.bfloat16
    assert relative(result.float(), reference) <= 2e-2
    result.float().sum().backward()
    reference.sum().backward()
    assert relative(half[0].grad.float(), full[0].grad) <= 3e-2


def test_temperature_and_hard_routing_behave():
    layout = LAYOUTS[5]
    gate, up, static, token = make_inputs(layout, (2, 4, 8))
    sharp = mix_activations(gate, up, DICTIONARY, static, token, tau=1e-4)
    hard = mix_activations(gate, up, DICTIONARY, static, token, tau=1.0, hard=True)
    assert relative(sharp, hard) <= 1e-4  # τ → 0 approaches argmax routing
    choice = (static + token).argmax(-1)  # [B, T, F]
    stacked = torch.stack([ACTIVATIONS[name].function(gate) for name in DICTIONARY], -1)
    expected = stacked.gather(-1, choice.unsqueeze(-1)).squeeze(-1) * up
    # the chosen activation exactly (the CPU kernel's activations agree with torch's to ~3e-7)
    torch.testing.assert_close(hard, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("width", [1, 37])
def test_grouped_hard_routing_equals_per_element_hard_routing(width):
    from modeling_polyglu.activation_mixing import mix_activations_grouped

    generator = torch.Generator().manual_seed(4)
    gate, up = torch.randn(3, 5, 37, generator=generator), torch.randn(3, 5, 37, generator=generator)
    static = torch.randn(1, 1, width, 4, generator=generator)
    expected = mix_activations(gate, up, DICTIONARY, static, None, hard=True)
    # the grouped path applies torch's activations, the fused CPU kernel its own (within ~3e-7 of them)
    torch.testing.assert_close(mix_activations_grouped(gate, up, DICTIONARY, static), expected, rtol=1e-6, atol=1e-6)


def test_hard_static_routing_model_uses_the_grouped_path_at_inference():
    model = tiny_model(ffn_type="dualglu", dualglu_mixing="learned_static", routing_hard=True)
    reference = tiny_model(ffn_type="dualglu", dualglu_mixing="learned_static", routing_hard=True, mixing_backend="naive")
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative(model(input_ids).logits, reference(input_ids).logits) <= 1e-6


def test_hard_routing_ignores_non_finite_unchosen_activations():
    gate = torch.tensor([[[1e4, -1e4]]])
    static = torch.tensor([[[[10.0, 0.0], [10.0, 0.0]]]])
    result = mix_activations(gate, None, ("identity", "sigmoid"), static, None, hard=True)
    assert torch.equal(result, gate)


def test_bad_inputs_are_rejected_with_clear_messages():
    gate = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="Unknown activation"):
        mix_activations(gate, None, ("swish",))
    with pytest.raises(ValueError, match="last dimension K=2"):
        mix_activations(gate, None, ("relu", "tanh"), torch.zeros(1, 1, 4, 3))
    with pytest.raises(ValueError, match="needs static_logits and/or token_logits"):
        mix_activations(gate, None, ("relu", "tanh"))
    with pytest.raises(ValueError, match=r"gate must be \[batch, seq, d_ff\]"):
        mix_activations(torch.randn(3, 4), None, ("relu",))


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("training", [False, True])
def test_every_variant_gives_the_same_model_with_either_backend(variant, training):
    ffn_type, options = variant
    fused = tiny_model(ffn_type=ffn_type, **options).train(training)
    naive = tiny_model(ffn_type=ffn_type, mixing_backend="naive", **options).train(training)
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    outputs = []
    for model in (fused, naive):
        torch.manual_seed(11)  # the same Gumbel noise in training mode
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        outputs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (naive_loss, naive_grads) = outputs
    assert relative(fused_loss, naive_loss) <= 1e-5
    assert fused_grads.keys() == naive_grads.keys()
    for name, gradient in naive_grads.items():
        # absolute floor: a saturated router's gradient (~1e-4 in norm with hard routing) is a sum of cancelling fp32
        # terms, so ulp-level differences of the activations move it by a few 1e-9 — either backend is that far
        # from the fp64 gradient
        difference = (fused_grads[name].double() - gradient.double()).norm().item()
        assert difference <= 1e-5 * gradient.double().norm().item() + 1e-8, name


def test_compiled_kernels_match_eager(monkeypatch):
    """The torch.compile path (default outside the test suite) computes the same values and gradients."""
    layout = LAYOUTS[5]
    inputs = make_inputs(layout, (2, 5, 24))
    leaves = [t for t in inputs if t is not None]
    results = []
    monkeypatch.setenv("POLYGLU_DISABLE_CPU_KERNEL", "1")  # fp32 on CPU would run the C++ kernel instead
    for disabled in ("1", "0"):
        monkeypatch.setenv("POLYGLU_DISABLE_COMPILE", disabled)
        output = mix_activations(inputs[0], inputs[1], DICTIONARY, inputs[2], inputs[3], tau=0.5)
        results.append((output, torch.autograd.grad(output.sum(), leaves)))
    assert activation_mixing._COMPILED.get("failed") is not True, "compilation fell back to eager"
    assert {"forward", "backward_elementwise"} <= set(activation_mixing._COMPILED)
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert relative(compiled, eager) <= 1e-6
    for a, b in zip(compiled_grads, eager_grads):
        assert relative(a, b) <= 1e-6


class _CannotBuild(Exception):
    """Stands for what Triton raises where a GPU cannot build or fit a program (triton.TritonError)."""


def _triton_that_cannot_build(direction: str) -> dict:
    """A Triton kernel whose forward or backward program fails to build; the other direction computes naively."""

    def forward(gate, up, static_logits, token_logits, activations, tau, normalization, hard):
        if direction == "forward":
            raise _CannotBuild("PTXAS error: Internal Triton PTX codegen error\nsecond line")
        k_last = [None if t is None else t.movedim(0, -1) for t in (static_logits, token_logits)]
        return mix_activations_naive(gate, up, activations, *k_last, tau, normalization, hard).detach()

    def backward(*args):
        raise _CannotBuild("out of resource: shared memory")

    return {"forward": forward, "backward": backward, "build_errors": (_CannotBuild,)}


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_fused_falls_back_to_the_torch_functions_where_triton_cannot_build_a_program(monkeypatch, direction):
    """On a GPU that Triton cannot build a program for, "fused" warns once and computes without it (the same
    values), and stops trying on that device; backend="triton" raises the error instead."""
    layout = LAYOUTS[5]  # PolyGLU's factorised token × neuron softmax
    unbuildable = set()
    monkeypatch.setattr(activation_mixing, "_TRITON_UNBUILDABLE", unbuildable)
    monkeypatch.setattr(activation_mixing, "_triton_kernel_for",
                        lambda backend, *args: _triton_that_cannot_build(direction))
    inputs = make_inputs(layout, (3, 11, 45))
    reference = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with pytest.warns(RuntimeWarning, match=r"cannot run on cpu \(_CannotBuild: (PTXAS error: Internal Triton PTX "
                                            r"codegen error|out of resource: shared memory)\); mixing_backend='fused' "
                                            r"uses the torch functions there from now on"):
        output = mix_activations(*inputs[:2], layout[4], *inputs[2:], tau=0.7)
        output.backward(torch.ones_like(output))
    expected = mix_activations_naive(*reference[:2], layout[4], *reference[2:], tau=0.7)
    expected.backward(torch.ones_like(expected))
    assert relative(output, expected) < 1e-6
    for tensor, expected_tensor in zip(inputs, reference):
        assert relative(tensor.grad, expected_tensor.grad) < 1e-4
    assert unbuildable == {"cpu"}
    with pytest.raises(_CannotBuild):
        mix_activations(*inputs[:2], layout[4], *inputs[2:], tau=0.7, backend="triton").sum().backward()


def test_fused_skips_triton_on_a_device_where_a_program_failed_to_build(monkeypatch):
    class GateOnTheGPU:
        device = torch.device("cuda", 0)

    kernel = {"supports": lambda *args: True}
    monkeypatch.setattr(activation_mixing, "triton_kernel", lambda: kernel)
    monkeypatch.setattr(activation_mixing, "_TRITON_UNBUILDABLE", set())
    monkeypatch.delenv(activation_mixing.DISABLE_TRITON_ENV, raising=False)
    static_logits = torch.zeros(4, 1, 1, 8)
    arguments = ("fused", GateOnTheGPU(), None, static_logits, None, DICTIONARY, "softmax")
    assert activation_mixing._triton_kernel_for(*arguments) is kernel
    activation_mixing._TRITON_UNBUILDABLE.add("cuda:0")
    assert activation_mixing._triton_kernel_for(*arguments) is None
    assert activation_mixing._triton_kernel_for("triton", *arguments[1:]) is kernel  # asked for: still tried
