"""The activation-mixing math shared by every feed-forward variant, as pure functions over explicit tensors.

Every FFN of this package computes ``h = u ⊙ m(g)`` (gated) or ``h = m(g)`` (plain), with
``m(g) = Σ_k c_k · φ_k(g)`` over a small dictionary of activations φ_k. The mixers (modeling_polyglu.py) only
produce the coefficients, in a factorised form that never needs a ``[B, T, d_ff, K]`` tensor:

* ``static_logits``: broadcastable to ``[S, 1, F, K]`` with S ∈ {1, B} — per layer, per neuron, or per
  sequence and neuron (PolyGLU's α plus one Gumbel draw per sequence, neuron and activation);
* ``token_logits``: ``[B, T, 1, K]`` — per token (PolyGLU's β·f(pooled x), MoA's W_g x + b, ...).

``normalization="softmax"`` mixes with ``softmax_k((static_k + token_k) / τ)`` (optionally hard: the argmax
one-hot, straight-through in training); ``normalization="linear"`` mixes with ``c_k = static_k + token_k``
directly (learnable activations, Dynamic GEGLU's gate); with neither tensor the single activation is applied.

Two implementations with one signature:

* :func:`mix_activations` (default): an ``autograd.Function`` that saves only g, u and the small coefficient
  tensors and recomputes the activations and weights in backward. fp32 on CPU runs one C++ pass per direction
  (cpu_mixing_kernel.py); other dtypes and devices run the functions below, looping over K in ``[B, T, F]``
  slices, torch.compile'd where Inductor works (eager otherwise, or with POLYGLU_DISABLE_COMPILE=1); routed
  mixings on CUDA run the Triton programs of triton_mixing_kernel.py where triton is installed, and
  ``backend="triton"`` (``mixing_backend="triton"``) runs them for every mixing, fixed activations included;
* :func:`mix_activations_naive`: stacks everything into ``[B, T, F, K]`` and lets autograd differentiate — the
  readable oracle the tests compare the default path against, selectable with ``mixing_backend="naive"``.

This file is part of the remote code saved next to a checkpoint: it imports only torch (and cpu_mixing_kernel.py,
saved with it; triton_mixing_kernel.py only on first use, where triton is importable).
"""

import importlib.util
import math
import os
import re
import sys
import warnings
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .cpu_mixing_kernel import load_library as load_cpu_kernel
from .cpu_mixing_kernel import mix_backward as cpu_mix_backward
from .cpu_mixing_kernel import mix_forward as cpu_mix_forward
from .cpu_mixing_kernel import supports as cpu_kernel_supports


class Activation(NamedTuple):
    """An activation and its derivative, both elementwise."""

    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715
_SMALLEST_LOG_WEIGHT = -60.0


def _relu_derivative(x):
    return (x > 0).to(x.dtype)


def _tanh_derivative(x):
    t = torch.tanh(x)
    return 1.0 - t * t


def _silu_derivative(x):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _gelu_erf_derivative(x):
    cdf = 0.5 * (1.0 + torch.erf(x * _SQRT_HALF))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _gelu_tanh_derivative(x):
    inner = _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x * x * x)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * x * x)


def _sigmoid_derivative(x):
    s = torch.sigmoid(x)
    return s * (1.0 - s)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(torch.relu, _relu_derivative),
    "tanh": Activation(torch.tanh, _tanh_derivative),
    "silu": Activation(F.silu, _silu_derivative),
    "gelu": Activation(F.gelu, _gelu_erf_derivative),  # exact erf form, as PolyGLU's reference uses
    "gelu_tanh": Activation(_gelu_tanh, _gelu_tanh_derivative),
    "sigmoid": Activation(torch.sigmoid, _sigmoid_derivative),
    "identity": Activation(lambda x: x, torch.ones_like),
}


def _check_inputs(gate, activations, static_logits, token_logits, normalization):
    unknown = [name for name in activations if name not in ACTIVATIONS]
    if unknown:
        raise ValueError(f"Unknown activation(s) {unknown}; choose from {sorted(ACTIVATIONS)}.")
    if normalization not in ("softmax", "linear"):
        raise ValueError(f"normalization must be 'softmax' or 'linear', got {normalization!r}.")
    if gate.dim() != 3:
        raise ValueError(f"gate must be [batch, seq, d_ff], got shape {tuple(gate.shape)}.")
    for name, logits in (("static_logits", static_logits), ("token_logits", token_logits)):
        if logits is not None and (logits.dim() != 4 or logits.shape[-1] != len(activations)):
            raise ValueError(
                f"{name} must be 4-D with last dimension K={len(activations)} (one per activation), "
                f"got shape {tuple(logits.shape)}."
            )
    if static_logits is None and token_logits is None and len(activations) != 1:
        raise ValueError("Mixing several activations needs static_logits and/or token_logits.")


def _logits_slice(static_logits, token_logits, k):
    """The (unscaled) logit or coefficient of activation k, broadcastable to [B, T, F] (or None if fixed).

    Inside the kernels the logits are K-major ([K, S, 1, F] and [K, B, T, 1]): slice k is then contiguous along
    d_ff, which lets Inductor vectorise the loops (a K-last layout makes every load strided and the code scalar).
    """
    parts = [t[k] for t in (static_logits, token_logits) if t is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _softmax_weights(static_logits, token_logits, num_activations, tau, hard):
    """Per-activation weights as a list of K tensors broadcast to [B, T, F], exactly normalised per element.

    Returns (weights_used_in_forward, soft_weights): equal unless ``hard``, where the first are one-hot.
    """
    scaled = [_logits_slice(static_logits, token_logits, k) / tau for k in range(num_activations)]
    running_max = scaled[0]
    for z in scaled[1:]:
        running_max = torch.maximum(running_max, z)
    # floor at e^-60: a weight that small changes nothing in fp32, while exp() of saturated logits would produce
    # subnormal numbers, which make CPU arithmetic an order of magnitude slower
    exps = [torch.exp(torch.clamp(z - running_max, min=_SMALLEST_LOG_WEIGHT)) for z in scaled]
    total = exps[0]
    for e in exps[1:]:
        total = total + e
    soft = [e / total for e in exps]
    if not hard:
        return soft, soft
    # argmax with ties going to the lowest index, as torch.argmax does
    choice = torch.zeros_like(running_max, dtype=torch.long)
    for k in range(num_activations - 1, -1, -1):
        choice = torch.where(scaled[k] == running_max, k, choice)
    one_hot = [(choice == k).to(running_max.dtype) for k in range(num_activations)]
    return one_hot, soft


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a [K, B, T, F] gradient over the dimensions that ``like`` ([K, S, 1, F] or [K, B, T, 1]) broadcasts."""
    dims = [d for d in range(grad.dim()) if like.shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _mix_forward(gate, static_logits, token_logits, activations, tau, normalization, hard):
    fns = [ACTIVATIONS[name].function for name in activations]
    if static_logits is None and token_logits is None:
        return fns[0](gate)
    if normalization == "linear":
        weights = [_logits_slice(static_logits, token_logits, k) for k in range(len(fns))]
    else:
        weights, _ = _softmax_weights(static_logits, token_logits, len(fns), tau, hard)
    mixed = None
    for k, fn in enumerate(fns):
        if hard and normalization == "softmax":
            # exact zeros keep inf/nan of an unchosen activation out of the result
            term = torch.where(weights[k] > 0, fn(gate), torch.zeros((), dtype=gate.dtype, device=gate.device))
        else:
            term = weights[k] * fn(gate)
        mixed = term if mixed is None else mixed + term
    return mixed


def _mix_backward(grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard, needs):
    """Gradients w.r.t. (gate, up, static_logits, token_logits), recomputing activations and weights.

    The elementwise part runs as one kernel that also writes the per-activation coefficient gradients [K, B, T, F];
    their reductions to the logits' shapes run afterwards. (Fusing the reductions into the kernel makes Inductor
    recompute the whole elementwise chain once per reduction, several times slower.)
    """
    needs_coefficients = (static_logits is not None and needs[2]) or (token_logits is not None and needs[3])
    grad_gate, grad_up, grad_coef = _call_kernel(
        "backward_elementwise", _mix_backward_elementwise, gate.device.type,
        grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard,
        needs[:2] + (needs_coefficients,),
    )
    grad_static = grad_token = None
    if grad_coef is not None:
        if static_logits is not None and needs[2]:
            grad_static = _reduce_to(grad_coef, static_logits).to(static_logits.dtype)
        if token_logits is not None and needs[3]:
            grad_token = _reduce_to(grad_coef, token_logits).to(token_logits.dtype)
    return grad_gate, grad_up, grad_static, grad_token


def _mix_backward_elementwise(grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard, needs):
    pairs = [ACTIVATIONS[name] for name in activations]
    num = len(pairs)
    grad_mixed = grad_out if up is None else grad_out * up
    fixed = static_logits is None and token_logits is None
    if fixed:
        weights = soft = [None]
    elif normalization == "linear":
        weights = soft = [_logits_slice(static_logits, token_logits, k) for k in range(num)]
    else:
        weights, soft = _softmax_weights(static_logits, token_logits, num, tau, hard)

    values = [pair.function(gate) for pair in pairs]
    slope = mixed = None
    for k, pair in enumerate(pairs):
        w = weights[k]
        term_slope = pair.derivative(gate) if w is None else w * pair.derivative(gate)
        slope = term_slope if slope is None else slope + term_slope
        if needs[1]:
            term = values[k] if w is None else w * values[k]
            mixed = term if mixed is None else mixed + term
    grad_gate = (grad_mixed * slope).to(gate.dtype) if needs[0] else None
    grad_up = (grad_out * mixed.to(gate.dtype)).to(up.dtype) if up is not None and needs[1] else None

    grad_coef = None
    if not fixed and needs[2]:
        if normalization == "linear":
            grad_coef = [grad_mixed * values[k] for k in range(num)]
        else:
            # d/dz_k of Σ_j softmax_j(z) φ_j = w_k (φ_k - Σ_j w_j φ_j); straight-through uses the soft weights
            soft_mixed = soft[0] * values[0]
            for k in range(1, num):
                soft_mixed = soft_mixed + soft[k] * values[k]
            grad_coef = [grad_mixed * soft[k] * (values[k] - soft_mixed) / tau for k in range(num)]
        grad_coef = torch.stack(grad_coef)  # [K, B, T, F], float32 or wider
    return grad_gate, grad_up, grad_coef


def _mix_forward_output(gate, up, static_logits, token_logits, activations, tau, normalization, hard):
    mixed = _mix_forward(gate, static_logits, token_logits, activations, tau, normalization, hard).to(gate.dtype)
    return mixed if up is None else mixed * up


_COMPILED = {}
_COMPILE_ANNOUNCED = []  # the kernel whose first call printed the one-time compilation notice


def compilation_enabled(device_type: str) -> bool:
    """torch.compile the elementwise kernels? Off with POLYGLU_DISABLE_COMPILE=1, or where Inductor cannot run."""
    if os.environ.get("POLYGLU_DISABLE_COMPILE", "0") not in ("", "0"):
        return False
    if device_type not in ("cpu", "cuda") or not hasattr(torch, "compile"):
        return False
    return not _COMPILED.get("failed", False)


def _kernel(name: str, function, device_type: str):
    """The compiled `function` when compilation is enabled and works, else `function` itself."""
    if not compilation_enabled(device_type) or torch.compiler.is_compiling():
        return function
    if name not in _COMPILED:
        # one kernel per (activations, normalization, hard, logits layout): a process that builds several variants
        # (per-layer ffn_types, sweeps) exceeds dynamo's default budget of 8 and would silently run eagerly
        dynamo_config = torch._dynamo.config
        if getattr(dynamo_config, "recompile_limit", 64) < 64:
            dynamo_config.recompile_limit = 64
        _COMPILED[name] = torch.compile(function, dynamic=None)
    return _COMPILED[name]


def _call_kernel(name, function, device_type, *args):
    kernel = _kernel(name, function, device_type)
    if kernel is function:
        return function(*args)
    if not _COMPILE_ANNOUNCED:  # Inductor's first compilation takes ~20 s and prints nothing
        _COMPILE_ANNOUNCED.append(name)
        print("polyglu: compiling the activation-mixing kernels with torch.compile (first forward only, ~20 s; "
              "Inductor caches them for later runs, POLYGLU_DISABLE_COMPILE=1 runs eagerly).", file=sys.stderr, flush=True)
    try:
        return kernel(*args)
    except Exception as error:  # no C++ compiler, unsupported platform, ...: fall back to eager, once and loudly
        _COMPILED["failed"] = True
        warnings.warn(f"torch.compile of the activation-mixing kernels failed ({type(error).__name__}: {error}); "
                      "using the eager implementation.", RuntimeWarning, stacklevel=3)
        return function(*args)


def _cpu_kernel_for(gate, up, static_logits, token_logits, activations, normalization):
    """The C++ CPU kernel library when it handles these inputs (fp32 on CPU), else None."""
    if gate.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if not cpu_kernel_supports(gate, up, activations, static_logits, token_logits, normalization):
        return None
    return load_cpu_kernel()


MIXING_BACKENDS = ("fused", "triton")  # of mix_activations; the model's mixing_backend adds "naive"
DISABLE_TRITON_ENV = "POLYGLU_DISABLE_TRITON_KERNEL"  # "fused" on CUDA then runs the torch.compile'd functions
TILES_ENV = "POLYGLU_TRITON_TILES"  # tiles of the Triton programs instead of the defaults (tile_overrides)
_TRITON = {}
_TRITON_UNBUILDABLE = set()  # devices ("cuda:0") where a program failed to build or fit: "fused" skips Triton there


# triton 3.2 (beside torch 2.6) cannot compile the programs: its code generator does not carry tuples through
# static loops. The interpreter runs them there, the GPU compiler fails; 3.3-3.9 compile them (tests, one-off).
MIN_TRITON_VERSION = (3, 3)


def triton_kernel():
    """triton_mixing_kernel.py's functions as a dict, imported on first use; None where triton is not importable
    or older than MIN_TRITON_VERSION (then ``_TRITON["missing"]`` says why)."""
    if "kernel" not in _TRITON:
        _TRITON["kernel"], _TRITON["missing"] = _load_triton_kernel()
    return _TRITON["kernel"]


def _load_triton_kernel():
    if importlib.util.find_spec("triton") is None:
        return None, "needs the triton package (pip install triton), which is not importable here"
    try:  # imports inside try: transformers' remote-code check does not require triton for them
        import triton

        found = triton.__version__
        if _major_minor(found) < MIN_TRITON_VERSION:
            wanted = ".".join(map(str, MIN_TRITON_VERSION))
            return None, f"needs triton >= {wanted}, found {found} (pip install -U triton, or torch >= 2.7)"
        from .triton_mixing_kernel import BUILD_ERRORS, mix_backward, mix_forward, supports, unsupported_reason
    except ImportError as error:  # a broken triton install: the torch path, with one warning
        warnings.warn(f"triton is installed but its mixing kernel cannot be imported ({error}); using the "
                      "torch path.", RuntimeWarning, stacklevel=3)
        return None, f"cannot import its kernel ({error})"
    functions = {"forward": mix_forward, "backward": mix_backward, "supports": supports,
                 "unsupported_reason": unsupported_reason, "build_errors": BUILD_ERRORS}
    return functions, None


def _major_minor(version: str) -> tuple:
    """(3, 3) of "3.3.1" or "3.3.0+git1234"; MIN_TRITON_VERSION where the text does not start with two numbers
    (an unusual build is given the benefit of the doubt: a program it cannot build falls back, see _run_triton)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else MIN_TRITON_VERSION


def _run_triton(kernel: dict, direction: str, backend: str, device: torch.device, *args):
    """A Triton program's result, or None where "fused" falls back because this GPU cannot build or fit it
    (``backend="triton"`` raises instead)."""
    try:
        return kernel[direction](*args)
    except kernel["build_errors"] as error:
        if backend != "fused":
            raise
        _triton_build_failed(device, error)
        return None


def _triton_build_failed(device: torch.device, error: Exception) -> None:
    """Remember that Triton could not build or fit a program for this GPU: "fused" stops trying it there."""
    _TRITON_UNBUILDABLE.add(str(device))
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    warnings.warn(f"the Triton mixing kernel cannot run on {device} ({type(error).__name__}: {message}); "
                  f"mixing_backend='fused' uses the torch functions there from now on "
                  f"({DISABLE_TRITON_ENV}=1 skips the attempt).", RuntimeWarning, stacklevel=4)


def _triton_kernel_for(backend, gate, up, static_logits, token_logits, activations, normalization):
    """The Triton kernel's functions when they run these inputs, else None.

    "fused": routed mixings of CUDA tensors where triton is importable, POLYGLU_DISABLE_TRITON_KERNEL is not set
    and no program failed to build for the device (a fixed activation stays on torch's kernels, as in
    transformers' models). "triton": every mixing, or an error that names the fix. Inside torch.compile both leave
    the op to Inductor, which traces the torch functions.
    """
    if backend not in MIXING_BACKENDS:
        choices = ", ".join(map(repr, MIXING_BACKENDS))
        raise ValueError(f"backend={backend!r} is not supported; choose one of {choices}.")
    if torch.compiler.is_compiling():
        return None
    if backend == "fused":
        if gate.device.type != "cuda" or (static_logits is None and token_logits is None):
            return None
        if os.environ.get(DISABLE_TRITON_ENV, "0") not in ("", "0") or str(gate.device) in _TRITON_UNBUILDABLE:
            return None
        kernel = triton_kernel()
        supported = kernel is not None and kernel["supports"](gate, up, activations, static_logits, token_logits,
                                                               normalization)
        return kernel if supported else None
    kernel = triton_kernel()
    if kernel is None:
        reason = _TRITON.get("missing") or "cannot load the Triton kernel"
        raise RuntimeError(f"mixing_backend='triton' {reason}; use mixing_backend='fused'.")
    if not kernel["supports"](gate, up, activations, static_logits, token_logits, normalization):
        raise RuntimeError(kernel["unsupported_reason"](gate, up, activations, static_logits, token_logits,
                                                        normalization))
    return kernel


class _MixActivationsFunction(torch.autograd.Function):
    """h = u ⊙ Σ_k c_k φ_k(g); saves g, u and the coefficient tensors only, recomputes the rest in backward.

    The Triton programs where :func:`_triton_kernel_for` picks them (CUDA); fp32 on CPU runs the C++ kernel of
    cpu_mixing_kernel.py; other dtypes and devices run the torch.compile'd (or eager) functions above.
    """

    @staticmethod
    def forward(ctx, gate, up, static_logits, token_logits, activations, tau, normalization, hard, backend):
        ctx.save_for_backward(gate, up, static_logits, token_logits)
        ctx.config = (activations, tau, normalization, hard)
        ctx.backend = backend
        ctx.triton = _triton_kernel_for(backend, gate, up, static_logits, token_logits, activations, normalization)
        if ctx.triton is not None:
            ctx.cpu_library = None
            output = _run_triton(ctx.triton, "forward", backend, gate.device,
                                 gate, up, static_logits, token_logits, activations, tau, normalization, hard)
            if output is not None:
                return output
            ctx.triton = None
        ctx.cpu_library = _cpu_kernel_for(gate, up, static_logits, token_logits, activations, normalization)
        if ctx.cpu_library is not None:
            return cpu_mix_forward(
                ctx.cpu_library, gate, up, static_logits, token_logits, activations, tau, normalization, hard
            )
        return _call_kernel(
            "forward", _mix_forward_output, gate.device.type,
            gate, up, static_logits, token_logits, activations, tau, normalization, hard,
        )

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, static_logits, token_logits = ctx.saved_tensors
        activations, tau, normalization, hard = ctx.config
        needs = tuple(ctx.needs_input_grad[:4])
        grads = None
        if ctx.triton is not None:
            grads = _run_triton(ctx.triton, "backward", ctx.backend, gate.device,
                                grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard,
                                needs)
        if grads is None and ctx.cpu_library is not None and grad_out.dtype == torch.float32:
            grads = cpu_mix_backward(
                ctx.cpu_library, grad_out, gate, up, static_logits, token_logits, activations, tau, normalization,
                hard, needs,
            )
        elif grads is None:
            grads = _mix_backward(
                grad_out.contiguous(), gate, up, static_logits, token_logits, activations, tau, normalization, hard,
                needs,
            )
        return (*grads, None, None, None, None, None)


def mix_activations(
    gate: torch.Tensor,
    up: Optional[torch.Tensor],
    activations: tuple[str, ...],
    static_logits: Optional[torch.Tensor] = None,
    token_logits: Optional[torch.Tensor] = None,
    tau: float = 1.0,
    normalization: str = "softmax",
    hard: bool = False,
    backend: str = "fused",
) -> torch.Tensor:
    """``u ⊙ Σ_k c_k φ_k(g)`` (or without ``u``), recomputing the activations in backward.

    Args:
        gate: ``[B, T, F]`` pre-activations g.
        up: ``[B, T, F]`` values u, or None for a non-gated (type I) FFN.
        activations: names from :data:`ACTIVATIONS`, one per mixing coefficient.
        static_logits: ``[S, 1, F or 1, K]`` (S ∈ {1, B}) or None.
        token_logits: ``[B, T, 1, K]`` or None.
        tau: softmax temperature (softmax normalisation only).
        normalization: ``"softmax"`` or ``"linear"``.
        hard: one-hot argmax weights in forward (softmax only); gradients of the soft weights (straight-through).
        backend: ``"fused"`` (the kernel that fits the inputs) or ``"triton"`` (the Triton programs, or an error).
    """
    activations = tuple(activations)
    _check_inputs(gate, activations, static_logits, token_logits, normalization)
    k_major = [None if t is None else t.movedim(-1, 0).contiguous() for t in (static_logits, token_logits)]
    return _MixActivationsFunction.apply(
        gate, up, *k_major, activations, float(tau), normalization, bool(hard), backend
    )


def mix_activations_grouped(gate: torch.Tensor, up: Optional[torch.Tensor], activations: tuple[str, ...],
                            static_logits: torch.Tensor) -> torch.Tensor:
    """Hard routing whose choice depends on the neuron only (static logits [1, 1, F or 1, K], no token term).

    Neurons are grouped by their chosen activation and each group evaluates that one activation — what hard routing
    at inference costs when nothing depends on the token. Not differentiable (inference only).
    """
    choice = static_logits.reshape(-1, static_logits.shape[-1]).argmax(-1)  # [F] or [1]
    if choice.numel() == 1:
        mixed = ACTIVATIONS[activations[int(choice)]].function(gate)
    else:
        mixed = torch.empty_like(gate)
        for k, name in enumerate(activations):
            neurons = (choice == k).nonzero().squeeze(-1)
            if neurons.numel():
                mixed[..., neurons] = ACTIVATIONS[name].function(gate[..., neurons])
    return mixed if up is None else mixed * up


def mix_activations_naive(
    gate: torch.Tensor,
    up: Optional[torch.Tensor],
    activations: tuple[str, ...],
    static_logits: Optional[torch.Tensor] = None,
    token_logits: Optional[torch.Tensor] = None,
    tau: float = 1.0,
    normalization: str = "softmax",
    hard: bool = False,
) -> torch.Tensor:
    """The same result as :func:`mix_activations`, written the obvious way over a ``[B, T, F, K]`` stack."""
    activations = tuple(activations)
    _check_inputs(gate, activations, static_logits, token_logits, normalization)
    if static_logits is None and token_logits is None:
        mixed = ACTIVATIONS[activations[0]].function(gate)
    else:
        stacked = torch.stack([ACTIVATIONS[name].function(gate) for name in activations], dim=-1)
        logits = sum(t for t in (static_logits, token_logits) if t is not None)
        if normalization == "linear":
            weights = logits
        else:
            weights = torch.softmax(logits / tau, dim=-1)
            if hard:
                one_hot = F.one_hot(weights.argmax(dim=-1), len(activations)).to(weights.dtype)
                weights = one_hot + weights - weights.detach()
        mixed = (weights * stacked).sum(dim=-1).to(gate.dtype)
    return mixed if up is None else mixed * up


def mixing_weights(
    static_logits: Optional[torch.Tensor],
    token_logits: Optional[torch.Tensor],
    tau: float = 1.0,
    normalization: str = "softmax",
    hard: bool = False,
) -> Optional[torch.Tensor]:
    """The mixing coefficients that are applied, materialised with every broadcast dimension (for inspection).

    Shape: the broadcast of the inputs, e.g. ``[B, T, F, K]`` for PolyGLU, ``[B, T, 1, K]`` for token routers.
    """
    if static_logits is None and token_logits is None:
        return None
    logits = sum(t for t in (static_logits, token_logits) if t is not None)
    if normalization == "linear":
        return logits
    # softmax over a short last dimension runs one scalar loop per row on CPU; K-major it vectorises (≈ 6× faster)
    weights = torch.softmax(logits.movedim(-1, 0) / tau, dim=0).movedim(0, -1).contiguous()
    if hard:
        weights = F.one_hot(weights.argmax(dim=-1), weights.shape[-1]).to(weights.dtype)
    return weights
