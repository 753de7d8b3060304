"""The Triton kernel of the fused mixing (triton_mixing_kernel.py) against the naive [B, T, F, K] implementation.

Without a GPU the programs run in Triton's interpreter on CPU tensors, in a process started with TRITON_INTERPRET=1
(test_triton_mixing_kernel_process.py starts it; triton.jit reads the variable when triton is imported, which
the package does through torch._dynamo). With CUDA the same tests run compiled on the GPU
(benchmarks/gpu_check.sh). Skipped without triton (or numpy, which the interpreter needs) unless
POLYGLU_REQUIRE_TRITON=1.

Tolerances, norm-wise relative ‖a−b‖/‖b‖ against the naive path on the same inputs:
* fp32: outputs and the gate / up gradients within 1e-5; router-logit gradients within 1e-4 (they are sums of
  cancelling terms: even the C++ kernel differs from naive by up to 1.1e-4 on some fixtures);
* bf16 storage (fp32 arithmetic inside): against naive in fp32 on the bf16-rounded inputs, outputs and gate / up
  gradients within 4e-3 (one bf16 rounding of each result is ~1.1e-3 norm-wise), router gradients within 1e-4.
"""

import os

import pytest
import torch

from modeling_polyglu import activation_mixing
from modeling_polyglu.activation_mixing import mix_activations, mix_activations_naive
from modeling_polyglu.configuration_polyglu import MIXING_FFN_TYPES

from .test_activation_mixing import DICTIONARY, LAYOUTS, make_inputs, relative
from .test_cpu_mixing_kernel import assert_activation_agrees_with_torch_over_a_wide_range
from .utils import ALL_VARIANTS, require_usable_triton, tiny_model, variant_id

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

require_usable_triton()


if not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
    # triton.jit decorates triton's own library functions in interpreter mode only when the variable is set before
    # triton is first imported (torch._dynamo imports it with the package): test_triton_mixing_kernel_process.py
    # runs this module in a child process that starts with it
    pytest.skip("runs in a child process with TRITON_INTERPRET=1 (test_triton_mixing_kernel_process.py)",
                allow_module_level=True)

from modeling_polyglu import triton_mixing_kernel as kernel  # noqa: E402

assert CUDA or kernel.INTERPRETED

ODD_SHAPE = (3, 11, 45)
MODEL_FFN_TYPES = MIXING_FFN_TYPES + ("swiglu", "mlp_gelu")  # every mixer; a gated and a plain fixed activation
FP32_BOUND = 1e-5
ROUTER_BOUND = 1e-4
BF16_BOUND = 4e-3
SMALL_TILES = "forward=4x32@4,backward=4x32@4:2"  # POLYGLU_TRITON_TILES
SMALL_TILES_SHAPE = (2, 11, 37)  # 2 token programs of 2 and 1 steps, 2 neuron blocks, partial tiles at every edge
# hard routing applies to softmax mixings only; a plain (ungated) FFN changes only the loads and stores
CASES = [(layout, hard, gated) for layout in LAYOUTS for gated in (True, False) for hard in (False, True)
         if not (hard and layout[3] == "linear")
         and not (hard and not gated and layout[0] != "factorised_token_x_neuron")]


def on_device(inputs, dtype=None, device=DEVICE):
    """gate and up in ``dtype``, the router logits in fp32 (as the models keep their routers)."""
    return [None if t is None else t.detach().to(device, dtype if i < 2 else None).requires_grad_()
            for i, t in enumerate(inputs)]


def triton_versus_naive(layout, shape, hard=False, gated=True, tau=0.7, dtype=torch.float32, scale=1.0,
                        device=DEVICE):
    """(output error, [gate, up] errors, [router-logit] errors) of backend="triton" against the naive path.

    The naive path runs in fp32 on the same (dtype-rounded) inputs and the same upstream gradient.
    """
    _, _, _, normalization, activations = layout
    inputs = make_inputs(layout, shape, gated=gated)
    inputs = [t if t is None or i < 2 else (t.detach() * scale) for i, t in enumerate(inputs)]
    tested = on_device(inputs, dtype, device)
    reference = [None if t is None else t.detach().float().requires_grad_() for t in tested]
    kwargs = dict(tau=tau, normalization=normalization, hard=hard)
    output = mix_activations(*tested[:2], activations, *tested[2:], **kwargs, backend="triton")
    expected = mix_activations_naive(*reference[:2], activations, *reference[2:], **kwargs)
    assert output.dtype == dtype and torch.isfinite(output).all()
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    leaves = [(i, t) for i, t in enumerate(tested) if t is not None]
    grads = torch.autograd.grad(output, [t for _, t in leaves], upstream)
    expected_grads = torch.autograd.grad(expected, [reference[i] for i, _ in leaves], upstream.float())
    inputs_errors, router_errors = [], []
    for (i, leaf), grad, expected_grad in zip(leaves, grads, expected_grads):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype and torch.isfinite(grad).all()
        (inputs_errors if i < 2 else router_errors).append(relative(grad.float(), expected_grad))
    return relative(output.float(), expected), inputs_errors, router_errors


@pytest.fixture
def small_tiles(monkeypatch):
    """GPU-like tiles in the interpreter: several token programs per sequence, several row steps per program and
    several neuron blocks, with partial tiles at every edge — the partial sums of the backward get exercised.
    Set the way a user tunes them, through the environment."""
    monkeypatch.setenv(kernel.TILES_ENV, SMALL_TILES)
    assert kernel.tiles(*SMALL_TILES_SHAPE, backward=True) == {"BLOCK_T": 4, "BLOCK_F": 32, "ROW_STEPS": 2,
                                                                "num_warps": 4}


def test_tile_overrides_parse_each_direction_and_refuse_what_is_not_a_tile(monkeypatch):
    assert kernel.tile_overrides("") == {"forward": None, "backward": None}
    assert kernel.tile_overrides(" backward=16x64@8 ") == {"forward": None, "backward": (16, 64, 8, None)}
    monkeypatch.setenv(kernel.TILES_ENV, "backward=16x64@8")
    default_forward = kernel.tiles(2, 300, 1000, backward=False)
    monkeypatch.delenv(kernel.TILES_ENV)
    assert default_forward == kernel.tiles(2, 300, 1000, backward=False)  # the other direction keeps its default
    monkeypatch.setenv(kernel.TILES_ENV, "backward=16x64@8")
    # ROW_STEPS defaults to 16 tiles down the sequence, fewer where the sequence is shorter
    assert kernel.tiles(2, 300, 1000, backward=True) == {"BLOCK_T": 16, "BLOCK_F": 64, "ROW_STEPS": 16, "num_warps": 8}
    assert kernel.tiles(2, 40, 1000, backward=True)["ROW_STEPS"] == 3
    for text in ("forward=8x100@4", "forward=8x256@4:16", "sideways=8x8@4", "forward=8x256", "backward=512x512@4",
                 "forward=8x256@64"):
        with pytest.raises(ValueError, match=f"{kernel.TILES_ENV}=.*is not a tile; write e.g."):
            kernel.tile_overrides(text)


@pytest.mark.parametrize("layout, hard, gated", CASES,
                         ids=[f"{c[0][0]}-{'hard' if c[1] else 'soft'}-{'gated' if c[2] else 'plain'}" for c in CASES])
def test_fp32_matches_naive_on_every_layout(layout, hard, gated):
    output_error, input_errors, router_errors = triton_versus_naive(layout, ODD_SHAPE, hard=hard, gated=gated)
    assert output_error <= FP32_BOUND
    assert max(input_errors) <= FP32_BOUND, input_errors
    assert max(router_errors, default=0.0) <= ROUTER_BOUND, router_errors


@pytest.mark.parametrize("layout, hard", [(LAYOUTS[5], False), (LAYOUTS[5], True), (LAYOUTS[4], False),
                                          (LAYOUTS[6], False)], ids=["polyglu", "polyglu-hard", "moa", "la"])
def test_fp32_matches_naive_across_many_programs(layout, hard, small_tiles):
    output_error, input_errors, router_errors = triton_versus_naive(layout, SMALL_TILES_SHAPE, hard=hard)
    assert output_error <= FP32_BOUND
    assert max(input_errors) <= FP32_BOUND, input_errors
    assert max(router_errors, default=0.0) <= ROUTER_BOUND, router_errors


@pytest.mark.parametrize("layout", [LAYOUTS[4], LAYOUTS[5]], ids=lambda layout: layout[0])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_frozen_routers_get_no_logit_gradients_and_the_same_input_gradients(layout, hard):
    """Routers frozen (PEFT): the backward skips the logit reductions; the gate and up gradients do not change."""
    _, _, _, normalization, activations = layout
    inputs = on_device(make_inputs(layout, ODD_SHAPE))
    frozen = [t if i < 2 or t is None else t.detach() for i, t in enumerate(inputs)]
    kwargs = dict(tau=0.7, normalization=normalization, hard=hard)
    output = mix_activations(*frozen[:2], activations, *frozen[2:], **kwargs, backend="triton")
    expected = mix_activations_naive(*frozen[:2], activations, *frozen[2:], **kwargs)
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    for grad, expected_grad in zip(torch.autograd.grad(output, frozen[:2], upstream),
                                   torch.autograd.grad(expected, frozen[:2], upstream)):
        assert relative(grad, expected_grad) <= FP32_BOUND


@pytest.mark.parametrize("layout", [LAYOUTS[i] for i in (0, 4, 5, 7)], ids=lambda layout: layout[0])
def test_bf16_storage_with_fp32_arithmetic(layout):
    output_error, input_errors, router_errors = triton_versus_naive(layout, ODD_SHAPE, dtype=torch.bfloat16)
    assert output_error <= BF16_BOUND
    assert max(input_errors) <= BF16_BOUND, input_errors
    assert max(router_errors, default=0.0) <= ROUTER_BOUND, router_errors


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in tanh's discarded polynomial
@pytest.mark.parametrize("name", sorted(activation_mixing.ACTIVATIONS))
def test_activations_agree_with_torch_over_a_wide_range(name):
    """Every activation, gelu_tanh and sigmoid included, which no mixing test's dictionary holds."""
    assert_activation_agrees_with_torch_over_a_wide_range(name, DEVICE, backend="triton")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_saturated_routing_takes_the_exact_path_and_stays_finite_and_close(hard):
    """α with std 100 and τ 0.1: the static and token preferences disagree by far more than 64 τ, so the factorised
    denominators underflow and the tiles take the exact per-element softmax."""
    output_error, input_errors, router_errors = triton_versus_naive(LAYOUTS[5], ODD_SHAPE, hard=hard, tau=0.1,
                                                                    scale=100.0)
    assert output_error <= FP32_BOUND
    assert max(input_errors) <= FP32_BOUND, input_errors
    assert max(router_errors) <= ROUTER_BOUND, router_errors


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the discarded nan
@pytest.mark.parametrize("static", [[[[[10.0, 0.0]]]], [[[[10.0, 0.0], [10.0, 0.0]]]]], ids=["per_layer", "per_neuron"])
def test_hard_routing_keeps_unchosen_non_finite_activations_out(static):
    """identity is chosen everywhere; sigmoid (unchosen) of ±inf would be fine, but silu(-inf) = -inf · 0 = nan."""
    gate = torch.tensor([[[1e4, -float("inf")]]], device=DEVICE, requires_grad=True)
    static = torch.tensor(static, device=DEVICE)
    result = mix_activations(gate, None, ("identity", "silu"), static, None, hard=True, backend="triton")
    assert torch.equal(result, gate.detach())
    (grad,) = torch.autograd.grad(result.sum(), gate)
    assert torch.equal(grad, torch.ones_like(grad))


@pytest.mark.parametrize("variant", [v for v in ALL_VARIANTS if not v[1] and v[0] in MODEL_FFN_TYPES], ids=variant_id)
def test_models_with_the_triton_backend_match_naive_in_training(variant):
    ffn_type, options = variant
    models = [tiny_model(ffn_type=ffn_type, mixing_backend=backend, **options).train().to(DEVICE)
              for backend in ("triton", "naive")]
    input_ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outputs = []
    for model in models:
        torch.manual_seed(11)  # the same Gumbel noise
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        outputs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (expected_loss, expected_grads) = outputs
    assert relative(loss, expected_loss) <= FP32_BOUND
    assert grads.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        # absolute floor as in test_activation_mixing: a saturated router's tiny gradient is a sum of cancelling terms
        difference = (grads[name].double() - expected.double()).norm().item()
        assert difference <= ROUTER_BOUND * expected.double().norm().item() + 1e-8, name


def test_the_backend_is_a_config_choice_and_fails_clearly_where_it_cannot_run(monkeypatch):
    model = tiny_model(ffn_type="polyglu", mixing_backend="triton").to(DEVICE)
    input_ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        model(input_ids)  # runs
    gate = torch.randn(1, 2, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="does not take this mixing"):
        mix_activations(gate, None, DICTIONARY, torch.zeros(1, 1, 8, 4), normalization="linear", backend="triton")
    if not CUDA:
        monkeypatch.setattr(kernel, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="runs on CUDA tensors; on CPU only in Triton's interpreter"):
            with torch.no_grad():
                model(input_ids)
    find_spec = activation_mixing.importlib.util.find_spec

    def without_triton(name):
        return None if name == "triton" else find_spec(name)

    monkeypatch.setattr(activation_mixing.importlib.util, "find_spec", without_triton)
    monkeypatch.setattr(activation_mixing, "_TRITON", {})
    with pytest.raises(RuntimeError, match=r"^mixing_backend='triton' needs the triton package \(pip install triton\)"):
        mix_activations(gate, None, ("silu",), backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        mix_activations(gate, None, ("silu",), backend="cuda")


@pytest.mark.parametrize(
    "version, usable", [("3.2.0", False), ("2.3.1", False), ("3.3.1", True), ("3.10.0+git9f2e", True), ("dev", True)]
)
def test_a_triton_too_old_to_compile_the_programs_is_not_used(monkeypatch, version, usable):
    """triton 3.2's compiler fails on the programs (the interpreter runs them): "fused" keeps to the torch path,
    "triton" names the version it needs."""
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(activation_mixing, "_TRITON", {})
    assert (activation_mixing.triton_kernel() is not None) == usable
    if not usable:
        gate = on_device(make_inputs(LAYOUTS[5], (2, 3, 8)))[0]
        with pytest.raises(RuntimeError, match=rf"^mixing_backend='triton' needs triton >= 3.3, found {version} "):
            mix_activations(gate, None, ("silu",), backend="triton")


def test_fused_picks_the_triton_kernel_for_routed_cuda_mixings_only(monkeypatch):
    calls = []
    real = activation_mixing.triton_kernel()
    monkeypatch.setattr(activation_mixing, "_TRITON", {"kernel": {
        **real, "forward": lambda *args: calls.append("forward") or real["forward"](*args)}})
    inputs = on_device(make_inputs(LAYOUTS[5], (2, 3, 8)))
    mix_activations(*inputs[:2], DICTIONARY, *inputs[2:])  # "fused"
    mix_activations(inputs[0], inputs[1], ("silu",))  # a fixed activation: torch's kernels
    assert calls == (["forward"] if CUDA else [])  # on CPU "fused" means the C++ kernel / torch path


def test_programs_launch_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the current CUDA device: each launch enters its tensors' device, or layers on another GPU
    (device_map="auto") would run on the wrong one. The wiring, with a stand-in tensor on cuda:1."""
    entered, launched = [], []

    class RecordingDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc_info):
            entered.append("left")

    class Program:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, list(entered)))

    class OnTheSecondGPU:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    tile = {"BLOCK_T": 1, "BLOCK_F": 1, "num_warps": 1}
    kernel._launch(Program(), (3,), tile, OnTheSecondGPU())
    assert launched == [((3,), [torch.device("cuda", 1)])] and entered[-1] == "left"
    entered.clear(), launched.clear()
    kernel._launch(Program(), (3,), tile, torch.zeros(1))  # a CPU tensor (the interpreter): no device to enter
    assert launched == [((3,), [])] and entered == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("layout", [LAYOUTS[4], LAYOUTS[5]], ids=lambda layout: layout[0])
def test_tensors_on_another_gpu_than_the_current_one_match_naive(layout):
    with torch.cuda.device(0):
        output_error, input_errors, router_errors = triton_versus_naive(layout, ODD_SHAPE, device="cuda:1")
    assert output_error < FP32_BOUND and max(input_errors) < FP32_BOUND and max(router_errors) < ROUTER_BOUND
