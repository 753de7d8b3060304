"""The GPU kernel of the fused activation mixing: two Triton programs, one per direction, for CUDA tensors.

``h = u ⊙ Σ_k c_k φ_k(g)`` and its backward run over tiles of ``[BLOCK_T tokens, BLOCK_F neurons]`` of one
sequence, with the structure of the C++ CPU kernel (cpu_mixing_kernel.py):

* **row-wise coefficients** (per layer or per token: moa, dualglu, la, dynamic_geglu) come in as a small
  ``[K, rows]`` table built with torch; hard routing evaluates, per tile, only the activations some row chose;
* **PolyGLU's per-neuron × per-token softmax, factorised**: ``w_k = a_k[f] b_k[r] / Σ_j a_j[f] b_j[r]`` from one
  table of exponentials per neuron and one per token (the same tables, scaling and floors as the CPU kernel), so no
  exponential runs per element; a tile where some denominator falls below ``e^-64`` (static and token preferences
  disagree by 64 τ) takes the exact per-element softmax instead;
* **the coefficient-gradient reductions fused into the backward**: each program sums its tile's logit gradients
  per token (over its neurons) and per neuron (over its tokens, looping down the sequence), so no
  ``[K, rows, d_ff]`` tensor is written — only small ``[blocks, K, ·]`` partial sums that torch adds up;
* fp32 arithmetic whatever the storage dtype (bf16 / fp16 / fp32 in, the same dtype out), and the gradients of
  the logits in fp32.

Like the CPU kernel it saves nothing but g, u and the logits: the activations and weights are recomputed in
backward. A single fixed activation (SwiGLU, ...) runs here only with ``mixing_backend="triton"``; the default
("fused") leaves it to torch's kernels, which keep those variants equal to transformers' models.

On CPU tensors the programs run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before this module is
imported (the tests do so) and numpy; it is far too slow for anything but tests. The programs use only Triton
APIs present in 3.6 (tuples of tensors unrolled with ``tl.static_range``, no newer language features).

This file is part of the remote code saved next to a checkpoint. activation_mixing.py imports it only where
triton is importable, and transformers' remote-code import check skips the guarded import below, so a checkpoint
still loads without triton.
"""

import contextlib
import functools
import math
import os
import re

import torch

try:  # a guarded import: transformers' remote-code check does not require what a try block imports
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("triton_mixing_kernel needs triton (pip install triton); without it mixing_backend='fused' "
                      "runs the torch path.") from error

from .activation_mixing import TILES_ENV
from .cpu_mixing_kernel import (
    ACTIVATION_CODES,
    FACTOR_FLOOR,
    FACTOR_SCALE,
    SMALLEST_WEIGHT,
    assemble_logit_gradients,
    layout_supported,
    neuron_token_logits,
    row_coefficients,
    static_gradient_from_blocks,
    uses_neuron_table,
)

# decided when the programs below are decorated: triton.jit reads TRITON_INTERPRET then, not at launch
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# what Triton raises where it cannot build or fit a program for the GPU (compilation, ptxas, shared memory): the
# "fused" backend then falls back to the torch functions (activation_mixing.py); a failed launch is not among them
BUILD_ERRORS = (triton.TritonError,)
_TILE_SPEC = re.compile(r"(\d+)x(\d+)@(\d+)(?::(\d+))?")

# coefficient layouts of the programs (the MODE constexpr)
_FIXED, _ROWWISE, _NEURON_TOKEN = 0, 1, 2
_CODE_BITS = 3  # activation codes (0..6) packed into one constexpr, 3 bits per activation

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_COEF = tl.constexpr(0.044715)
_SMALLEST_LOG_WEIGHT = tl.constexpr(-60.0)
_SMALLEST_WEIGHT = tl.constexpr(SMALLEST_WEIGHT)
# 2^120 e^-64: a scaled factorised denominator below it (e^-64 unscaled) is not trusted; see cpu_mixing_kernel.py
_EXACT_THRESHOLD = tl.constexpr(FACTOR_SCALE * FACTOR_SCALE * math.exp(-64.0))


@triton.jit
def _tanh_and_sech2(x):
    """(tanh x, 1 - tanh^2 x) within ~1e-7: (1 - e) / (1 + e) with e = exp(-2|x|) from |x| = 0.55 on, an odd
    polynomial below (where the quotient would cancel); the polynomial is the CPU kernel's. From 0.55 on sech^2 is
    4e / (1 + e)^2, not 1 - t^2, which would keep a last-ulp error of t where sech^2 is 0 (GELU-tanh's slope
    multiplies it by ~x^3)."""
    magnitude = tl.abs(x)
    e = tl.exp(-2.0 * magnitude)
    inverse = 1.0 / (1.0 + e)
    large = (1.0 - e) * inverse
    square = x * x
    q = -0.0062876008450984955 * square + 0.021082019433379173
    q = q * square - 0.053855109959840775
    q = q * square + 0.13332617282867432
    q = q * square - 0.33333319425582886
    small = magnitude + magnitude * square * q
    is_small = magnitude < 0.55
    result = tl.where(is_small, small, large)
    sech2 = tl.where(is_small, 1.0 - small * small, 4.0 * e * inverse * inverse)
    return tl.where(x < 0.0, -result, result), sech2


@triton.jit
def _sigmoid_and_complement(x):
    """(s, 1 - s) for s = 1 / (1 + e^-x), the exponent capped at 80 as on CPU; 1 - s as e·s, without the
    subtraction that keeps s's last-ulp error (SiLU's slope multiplies it by x)."""
    e = tl.exp(tl.minimum(-x, 80.0))
    s = 1.0 / (1.0 + e)
    return s, e * s


@triton.jit
def _activation(x, CODE: tl.constexpr):
    """(φ(x), φ'(x)) in fp32 for the activation code CODE (cpu_mixing_kernel.ACTIVATION_CODES)."""
    if CODE == 0:  # relu
        value = tl.maximum(x, 0.0)
        slope = tl.where(x > 0.0, 1.0, 0.0)
    elif CODE == 1:  # tanh
        value, slope = _tanh_and_sech2(x)
    elif CODE == 2:  # silu
        s, complement = _sigmoid_and_complement(x)
        value = x * s
        slope = s * (1.0 + x * complement)
    elif CODE == 3:  # gelu, erf form
        cdf = 0.5 * (1.0 + tl.erf(x * _SQRT_HALF))
        value = x * cdf
        slope = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif CODE == 4:  # gelu, tanh approximation
        x2 = x * x
        # named first: Triton's interpreter cannot pass an expression with a constexpr to a jit function
        inner = _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x2 * x)
        t, sech2 = _tanh_and_sech2(inner)
        value = 0.5 * x * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * x * sech2 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * x2)
    elif CODE == 5:  # sigmoid
        value, complement = _sigmoid_and_complement(x)
        slope = value * complement
    else:  # identity
        value = x
        slope = tl.zeros_like(x) + 1.0
    return value, slope


@triton.jit
def _tile(sequence, first_token, first_neuron, T, F, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Rows (b·T + t, [BLOCK_T]), neurons ([BLOCK_F]), the in-bounds mask and the element offsets of one tile."""
    tokens = first_token + tl.arange(0, BLOCK_T)
    neurons = first_neuron + tl.arange(0, BLOCK_F)
    rows = sequence * T + tokens
    inside = (tokens < T)[:, None] & (neurons < F)[None, :]
    offsets = rows.to(tl.int64)[:, None] * F + neurons[None, :]
    return rows, tokens < T, neurons, neurons < F, inside, offsets


@triton.jit
def _row_table(table_ptr, k, R, rows, row_inside):
    """Entry k of a [K, R] per-row table, as a [BLOCK_T, 1] column."""
    return tl.load(table_ptr + k * R + rows, mask=row_inside, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _scaled_logit(static_logits_ptr, token_logits_ptr, k, static_offset, static_k_stride, R, rows, row_inside,
                  neurons, neuron_inside, inv_tau):
    """(s_k[f] + t_k[r]) / τ on the tile, rounded in the naive order."""
    s = tl.load(static_logits_ptr + k * static_k_stride + static_offset + neurons, mask=neuron_inside, other=0.0)
    t = tl.load(token_logits_ptr + k * R + rows, mask=row_inside, other=0.0)
    return (s[None, :] + t[:, None]) * inv_tau


@triton.jit
def _neuron_token_soft_weights(static_logits_ptr, static_factor_ptr, token_logits_ptr, token_factor_ptr,
                               static_offset, static_k_stride, R, rows, row_inside, neurons, neuron_inside, inside,
                               inv_tau, K: tl.constexpr):
    """PolyGLU's softmax_k((s_k[f] + t_k[r]) / τ) on the tile: a tuple of K [BLOCK_T, BLOCK_F] weights.

    Factorised from the two factor tables; a tile where some in-bounds denominator is below the threshold
    recomputes its weights exactly (exponentials per element, largest logit subtracted, floor e^-60).
    """
    numerators = ()
    total = tl.zeros(inside.shape, dtype=tl.float32)
    for k in tl.static_range(K):
        a = tl.load(static_factor_ptr + k * static_k_stride + static_offset + neurons, mask=neuron_inside, other=0.0)
        b = tl.load(token_factor_ptr + k * R + rows, mask=row_inside, other=0.0)
        numerator = a[None, :] * b[:, None]
        numerators = numerators + (numerator,)
        total += numerator
    use_exact = tl.min(tl.min(tl.where(inside, total, _EXACT_THRESHOLD), axis=1), axis=0) < _EXACT_THRESHOLD
    top = tl.zeros(inside.shape, dtype=tl.float32)
    if use_exact:
        top = _scaled_logit(static_logits_ptr, token_logits_ptr, 0, static_offset, static_k_stride, R, rows,
                            row_inside, neurons, neuron_inside, inv_tau)
        for k in tl.static_range(1, K):
            top = tl.maximum(top, _scaled_logit(static_logits_ptr, token_logits_ptr, k, static_offset,
                                                static_k_stride, R, rows, row_inside, neurons, neuron_inside,
                                                inv_tau))
        total = tl.zeros(inside.shape, dtype=tl.float32)
        for k in tl.static_range(K):
            z = _scaled_logit(static_logits_ptr, token_logits_ptr, k, static_offset, static_k_stride, R, rows,
                              row_inside, neurons, neuron_inside, inv_tau)
            total += tl.exp(tl.maximum(z - top, _SMALLEST_LOG_WEIGHT))
    inverse = 1.0 / tl.where(inside, total, 1.0)
    weights = ()
    for k in tl.static_range(K):
        numerator = numerators[k]
        if use_exact:
            z = _scaled_logit(static_logits_ptr, token_logits_ptr, k, static_offset, static_k_stride, R, rows,
                              row_inside, neurons, neuron_inside, inv_tau)
            numerator = tl.exp(tl.maximum(z - top, _SMALLEST_LOG_WEIGHT))
        weights = weights + (tl.maximum(numerator * inverse, _SMALLEST_WEIGHT),)
    return weights


@triton.jit
def _neuron_token_choice(static_logits_ptr, token_logits_ptr, static_offset, static_k_stride, R, rows, row_inside,
                         neurons, neuron_inside, K: tl.constexpr):
    """Hard routing: a tuple of K one-hot fp32 masks of the argmax activation (ties to the lowest index)."""
    best = _scaled_logit(static_logits_ptr, token_logits_ptr, 0, static_offset, static_k_stride, R, rows, row_inside,
                         neurons, neuron_inside, 1.0)
    choice = tl.zeros(best.shape, dtype=tl.int32)
    for k in tl.static_range(1, K):
        z = _scaled_logit(static_logits_ptr, token_logits_ptr, k, static_offset, static_k_stride, R, rows,
                          row_inside, neurons, neuron_inside, 1.0)
        better = z > best
        best = tl.where(better, z, best)
        choice = tl.where(better, k, choice)
    masks = ()
    for k in tl.static_range(K):
        masks = masks + (tl.where(choice == k, 1.0, 0.0),)
    return masks


@triton.jit
def _mix_forward_kernel(
    gate_ptr, up_ptr, out_ptr,
    weights_ptr,  # ROWWISE: the applied coefficients [K, R]
    static_logits_ptr, static_factor_ptr, token_logits_ptr, token_factor_ptr,  # NEURON_TOKEN: [K, S, F], [K, R]
    R, T, F, static_k_stride, static_sequence_stride, inv_tau,
    CODES: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr, HARD: tl.constexpr, HAS_UP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # grid (token blocks, neuron blocks, sequences): the longest count on the axis that admits 2^31 programs
    sequence = tl.program_id(2)
    rows, row_inside, neurons, neuron_inside, inside, offsets = _tile(
        sequence, tl.program_id(0) * BLOCK_T, tl.program_id(1) * BLOCK_F, T, F, BLOCK_T, BLOCK_F)
    g = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    mixed = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
    if MODE == 0:
        mixed, _ = _activation(g, CODES & 7)
    elif MODE == 1:
        for k in tl.static_range(K):
            w = _row_table(weights_ptr, k, R, rows, row_inside)
            # a coefficient no row of the tile uses (hard routing, a zero linear coefficient) skips its activation;
            # exact zeros keep an unchosen activation's inf/nan out of the result
            if tl.max(tl.max(tl.abs(w), axis=1), axis=0) > 0.0:
                value, _ = _activation(g, (CODES >> (3 * k)) & 7)
                mixed += tl.where(w != 0.0, w * value, 0.0)
    else:
        static_offset = sequence * static_sequence_stride
        if HARD:
            weights = _neuron_token_choice(static_logits_ptr, token_logits_ptr, static_offset, static_k_stride, R,
                                           rows, row_inside, neurons, neuron_inside, K)
        else:
            weights = _neuron_token_soft_weights(static_logits_ptr, static_factor_ptr, token_logits_ptr,
                                                 token_factor_ptr, static_offset, static_k_stride, R, rows,
                                                 row_inside, neurons, neuron_inside, inside, inv_tau, K)
        for k in tl.static_range(K):
            value, _ = _activation(g, (CODES >> (3 * k)) & 7)
            if HARD:
                mixed += tl.where(weights[k] > 0.0, value, 0.0)
            else:
                mixed += weights[k] * value
    if HAS_UP:
        mixed = mixed * tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, mixed.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _mix_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
    weights_ptr, soft_ptr,  # ROWWISE: applied and soft coefficients [K, R] (the same table unless hard)
    static_logits_ptr, static_factor_ptr, token_logits_ptr, token_factor_ptr,  # NEURON_TOKEN tables
    row_partial_ptr,  # [neuron blocks, K, R]: per-row sums of the logit gradient over each program's neurons
    column_partial_ptr,  # [B, token programs, K, F]: per-neuron sums over each program's tokens (NEURON_TOKEN)
    R, T, F, static_k_stride, static_sequence_stride, inv_tau,
    CODES: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr, MODE: tl.constexpr, HARD: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_UP: tl.constexpr, NEEDS_GATE: tl.constexpr, NEEDS_UP: tl.constexpr,
    NEEDS_LOGIT_GRADS: tl.constexpr, NEEDS_ROW_SUMS: tl.constexpr, NEEDS_COLUMN_SUMS: tl.constexpr,
    ROW_STEPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One program: BLOCK_F neurons of ROW_STEPS · BLOCK_T tokens of one sequence, BLOCK_T tokens at a time
    (steps past the sequence's end are masked; a constant trip count also keeps triton 3.6's interpreter happy).

    Logit gradient per element: NEURON_TOKEN g_k = (dy u) w_k (φ_k - Σ_j w_j φ_j) / τ, summed both ways;
    ROWWISE the row sums of (dy u)(φ_k - Σ_j w_j φ_j) (softmax) or (dy u) φ_k (linear), which torch turns into
    the coefficient gradients (the coefficients being constant along a row).
    """
    token_program = tl.program_id(0)
    neuron_block = tl.program_id(1)
    sequence = tl.program_id(2)
    first_neuron = neuron_block * BLOCK_F
    static_offset = sequence * static_sequence_stride
    slot = tl.arange(0, K_POW2)[:, None]
    column_sums = tl.zeros([K_POW2, BLOCK_F], dtype=tl.float32)
    for step in range(ROW_STEPS):
        first_token = (token_program * ROW_STEPS + step) * BLOCK_T
        rows, row_inside, neurons, neuron_inside, inside, offsets = _tile(
            sequence, first_token, first_neuron, T, F, BLOCK_T, BLOCK_F)
        g = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(grad_out_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        grad_mixed = dy
        if HAS_UP:
            grad_mixed = dy * tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        mixed = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        slope = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        soft_mixed = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        if MODE == 0:
            mixed, slope = _activation(g, CODES & 7)
        elif MODE == 1:
            values = ()
            for k in tl.static_range(K):
                w = _row_table(weights_ptr, k, R, rows, row_inside)
                value = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
                if NEEDS_LOGIT_GRADS:  # every activation enters the coefficient gradients
                    value, derivative = _activation(g, (CODES >> (3 * k)) & 7)
                    if SOFTMAX:
                        soft_mixed += _row_table(soft_ptr, k, R, rows, row_inside) * value
                    mixed += tl.where(w != 0.0, w * value, 0.0)
                    slope += tl.where(w != 0.0, w * derivative, 0.0)
                elif tl.max(tl.max(tl.abs(w), axis=1), axis=0) > 0.0:
                    value, derivative = _activation(g, (CODES >> (3 * k)) & 7)
                    mixed += tl.where(w != 0.0, w * value, 0.0)
                    slope += tl.where(w != 0.0, w * derivative, 0.0)
                values = values + (value,)
            if NEEDS_ROW_SUMS:
                for k in tl.static_range(K):
                    if SOFTMAX:
                        product = grad_mixed * (values[k] - soft_mixed)
                    else:
                        product = grad_mixed * values[k]
                    row_sum = tl.sum(product, axis=1)
                    tl.store(row_partial_ptr + (neuron_block * K + k) * R + rows, row_sum, mask=row_inside)
        else:
            soft = _neuron_token_soft_weights(static_logits_ptr, static_factor_ptr, token_logits_ptr,
                                              token_factor_ptr, static_offset, static_k_stride, R, rows, row_inside,
                                              neurons, neuron_inside, inside, inv_tau, K)
            applied = soft
            if HARD:
                applied = _neuron_token_choice(static_logits_ptr, token_logits_ptr, static_offset, static_k_stride,
                                               R, rows, row_inside, neurons, neuron_inside, K)
            values = ()
            for k in tl.static_range(K):
                value, derivative = _activation(g, (CODES >> (3 * k)) & 7)
                values = values + (value,)
                if HARD:  # exact zeros keep an unchosen activation's inf/nan out
                    mixed += tl.where(applied[k] > 0.0, value, 0.0)
                    slope += tl.where(applied[k] > 0.0, derivative, 0.0)
                else:
                    mixed += applied[k] * value
                    slope += applied[k] * derivative
                soft_mixed += soft[k] * value
            if NEEDS_LOGIT_GRADS:
                scale = grad_mixed * inv_tau
                for k in tl.static_range(K):
                    # d/dz_k of Σ_j softmax_j(z) φ_j = w_k (φ_k - Σ_j w_j φ_j); straight-through: soft weights
                    grad = tl.where(inside, scale * soft[k] * (values[k] - soft_mixed), 0.0)
                    if NEEDS_ROW_SUMS:
                        tl.store(row_partial_ptr + (neuron_block * K + k) * R + rows, tl.sum(grad, axis=1),
                                 mask=row_inside)
                    if NEEDS_COLUMN_SUMS:
                        column_sums = tl.where(slot == k, column_sums + tl.sum(grad, axis=0)[None, :], column_sums)
        if NEEDS_GATE:
            tl.store(grad_gate_ptr + offsets, (grad_mixed * slope).to(grad_gate_ptr.dtype.element_ty), mask=inside)
        if NEEDS_UP:
            tl.store(grad_up_ptr + offsets, (dy * mixed).to(grad_up_ptr.dtype.element_ty), mask=inside)
    if NEEDS_COLUMN_SUMS:
        neurons = first_neuron + tl.arange(0, BLOCK_F)
        block = (sequence * tl.num_programs(0) + token_program).to(tl.int64)
        target = (block * K + slot) * F + neurons[None, :]
        tl.store(column_partial_ptr + target, column_sums, mask=(slot < K) & (neurons < F)[None, :])


# ---- host side ---------------------------------------------------------------------------------------------------


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _packed_codes(activations: tuple) -> int:
    """The activations' codes in one integer, _CODE_BITS bits each (a compile-time constant of the programs)."""
    return sum(ACTIVATION_CODES[name] << (_CODE_BITS * k) for k, name in enumerate(activations))


def tiles(batch: int, length: int, width: int, backward: bool) -> dict:
    """Tile sizes and, in backward, ROW_STEPS tiles down the sequence per program: on a GPU, tiles of 1-2 K
    elements (8 tokens × 128-256 neurons) and programs of up to 128 tokens, which keeps the per-program partial
    sums at a few percent of the activations' bytes; in the interpreter, one program per sequence and neuron block
    (each program costs milliseconds there). ``POLYGLU_TRITON_TILES`` overrides them (:func:`tile_overrides`).
    """
    override = tile_overrides(os.environ.get(TILES_ENV, ""))["backward" if backward else "forward"]
    if override is not None:
        block_t, block_f, warps, row_steps = override
        steps = -(-length // block_t)
        return {"BLOCK_T": block_t, "BLOCK_F": block_f, "ROW_STEPS": min(row_steps or 16, steps), "num_warps": warps}
    if INTERPRETED:
        block_f = min(_next_power_of_2(width), 512)
        block_t = min(_next_power_of_2(length), max(1, 8192 // block_f))
        return {"BLOCK_T": block_t, "BLOCK_F": block_f, "ROW_STEPS": -(-length // block_t), "num_warps": 4}
    block_t = min(_next_power_of_2(length), 8)
    block_f = min(_next_power_of_2(width), 128 if backward else 256)
    return {"BLOCK_T": block_t, "BLOCK_F": block_f, "ROW_STEPS": min(16, -(-length // block_t)), "num_warps": 4}


@functools.lru_cache(maxsize=None)
def tile_overrides(text: str) -> dict:
    """``{"forward": (BLOCK_T, BLOCK_F, num_warps, None), "backward": (..., ROW_STEPS or None)}`` from a
    ``POLYGLU_TRITON_TILES`` value such as ``"forward=8x256@4,backward=8x128@4:16"`` (None: the default tiles).

    A tuning knob for the benchmarks (``polyglu bench --suite kernel`` sweeps it): every size a power of two,
    BLOCK_T · BLOCK_F at most 2^16, num_warps 1-32; ROW_STEPS (backward only) defaults to 16.
    """
    overrides = {"forward": None, "backward": None}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        direction, _, spec = part.partition("=")
        match = _TILE_SPEC.fullmatch(spec.strip())
        sizes = None if match is None else [int(value) if value else None for value in match.groups()]
        valid = (
            direction.strip() in overrides and sizes is not None
            and all(value & (value - 1) == 0 and value > 0 for value in sizes if value is not None)
            and sizes[0] * sizes[1] <= 1 << 16 and sizes[2] <= 32
            and (sizes[3] is None or direction.strip() == "backward")
        )
        if not valid:
            raise ValueError(f"{TILES_ENV}={text!r}: {part!r} is not a tile; write e.g. "
                             "'forward=8x256@4,backward=8x128@4:16' (BLOCK_TxBLOCK_F@num_warps[:ROW_STEPS], powers "
                             "of two, ROW_STEPS for backward only), or unset it for the default tiles.")
        overrides[direction.strip()] = tuple(sizes)
    return overrides


def runnable(gate: torch.Tensor) -> bool:
    """Can the programs run on this tensor's device? CUDA (compiled), or CPU in the interpreter."""
    return gate.device.type == "cuda" or (gate.device.type == "cpu" and INTERPRETED)


def supports(gate, up, activations, static_logits, token_logits, normalization) -> bool:
    """Inputs these programs take: a device they run on, float dtypes, and the CPU kernel's layouts."""
    tensors = [t for t in (gate, up) if t is not None]
    return (
        runnable(gate)
        and all(t.dtype in SUPPORTED_DTYPES and t.device == gate.device for t in tensors)
        and (up is None or up.shape == gate.shape)
        and layout_supported(gate, activations, static_logits, token_logits, normalization)
    )


def unsupported_reason(gate, up, activations, static_logits, token_logits, normalization) -> str:
    """Why :func:`supports` is False, as a sentence that names the fix."""
    if not runnable(gate):
        if gate.device.type == "cpu":
            return ("mixing_backend='triton' runs on CUDA tensors; on CPU only in Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before the first use, for tests). Use mixing_backend='fused' on CPU.")
        return f"mixing_backend='triton' runs on CUDA tensors, not on {gate.device.type}; use mixing_backend='fused'."
    dtypes = {t.dtype for t in (gate, up) if t is not None}
    if not dtypes <= set(SUPPORTED_DTYPES):
        return ("mixing_backend='triton' takes float32, bfloat16 or float16 activations, got "
                f"{sorted(map(str, dtypes))}; use mixing_backend='fused'.")
    static_shape = None if static_logits is None else tuple(static_logits.shape)
    return (f"mixing_backend='triton' does not take this mixing ({len(activations)} activations {activations}, "
            f"normalization={normalization!r}, static logits {static_shape}); "
            "it takes 1-8 activations with per-layer, per-token or (softmax) per-neuron coefficients. "
            "Use mixing_backend='fused'.")


def _mode(static_logits, token_logits, normalization) -> int:
    if static_logits is None and token_logits is None:
        return _FIXED
    return _NEURON_TOKEN if uses_neuron_table(static_logits, normalization) else _ROWWISE


def _factor_table(logits: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """exp(max((l - max_k l) / τ, -84)) · 2^60 for logits [K, N], as the CPU kernel builds its tables."""
    top = logits.max(dim=0, keepdim=True).values
    return torch.exp(torch.clamp((logits - top) * inv_tau, min=FACTOR_FLOOR)) * FACTOR_SCALE


class _Tables:
    """Every coefficient table of one call (empty placeholders where the layout has none)."""

    def __init__(self, gate, static_logits, token_logits, tau, normalization, hard):
        batch, length, _ = gate.shape
        self.mode = _mode(static_logits, token_logits, normalization)
        placeholder = gate.new_zeros(1, dtype=torch.float32)
        self.applied = self.soft = placeholder
        self.static_logits = self.static_factor = self.token_logits = self.token_factor = placeholder
        self.static_k_stride = self.static_sequence_stride = 0
        self.inv_tau = 1.0 / tau
        if self.mode == _ROWWISE:
            self.applied, soft = row_coefficients(static_logits, token_logits, batch, length, tau, normalization, hard)
            self.soft = self.applied if soft is None else soft
        elif self.mode == _NEURON_TOKEN:
            static, token, sequences = neuron_token_logits(static_logits, token_logits, batch, length)
            if token is None:
                token = torch.zeros(static.shape[0], batch * length, dtype=torch.float32, device=gate.device)
            self.static_logits, self.token_logits = static, token
            self.static_factor = _factor_table(static.view(static.shape[0], -1), self.inv_tau).view_as(static)
            self.token_factor = _factor_table(token, self.inv_tau)
            self.static_k_stride = static.shape[1]
            self.static_sequence_stride = gate.shape[2] if sequences > 1 else 0
            self.sequences = sequences


def _launch(kernel, grid, tile, *args, **constants):
    """Run a program on the device of its first tensor argument (Triton launches on the *current* CUDA device and
    its stream, which is another one where a model's layers sit on several GPUs, e.g. device_map="auto")."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **constants, BLOCK_T=tile["BLOCK_T"], BLOCK_F=tile["BLOCK_F"],
                     num_warps=tile["num_warps"], **({} if INTERPRETED else {"enable_fp_fusion": True}))


def mix_forward(gate, up, static_logits, token_logits, activations, tau, normalization, hard):
    """``u ⊙ Σ_k c_k φ_k(g)`` ([B, T, F], gate's dtype); the logits in activation_mixing's K-major layouts."""
    batch, length, width = gate.shape
    gate = gate.contiguous()
    up = None if up is None else up.contiguous()
    out = torch.empty_like(gate)
    tables = _Tables(gate, static_logits, token_logits, tau, normalization, hard)
    tile = tiles(batch, length, width, backward=False)
    grid = (triton.cdiv(length, tile["BLOCK_T"]), triton.cdiv(width, tile["BLOCK_F"]), batch)
    _launch(
        _mix_forward_kernel, grid, tile,
        gate, gate if up is None else up, out, tables.applied,
        tables.static_logits, tables.static_factor, tables.token_logits, tables.token_factor,
        batch * length, length, width, tables.static_k_stride, tables.static_sequence_stride, tables.inv_tau,
        CODES=_packed_codes(activations), K=len(activations), MODE=tables.mode, HARD=bool(hard),
        HAS_UP=up is not None,
    )
    return out


def mix_backward(grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard, needs):
    """(grad_gate, grad_up, grad_static [K, S, 1, Fs], grad_token [K, B', T', 1]); None where ``needs`` is False."""
    batch, length, width = gate.shape
    num, rows = len(activations), batch * length
    grad_out, gate = grad_out.contiguous(), gate.contiguous()
    up = None if up is None else up.contiguous()
    tables = _Tables(gate, static_logits, token_logits, tau, normalization, hard)
    needs_static = static_logits is not None and needs[2]
    needs_token = token_logits is not None and needs[3]
    neuron_token = tables.mode == _NEURON_TOKEN
    needs_row_sums = needs_token or (needs_static and not neuron_token)
    needs_column_sums = needs_static and neuron_token
    grad_gate = torch.empty_like(gate) if needs[0] else None
    grad_up = torch.empty_like(up) if up is not None and needs[1] else None

    tile = tiles(batch, length, width, backward=True)
    token_programs = triton.cdiv(length, tile["ROW_STEPS"] * tile["BLOCK_T"])
    neuron_blocks = triton.cdiv(width, tile["BLOCK_F"])
    placeholder = gate.new_zeros(1, dtype=torch.float32)
    row_partial = gate.new_empty(neuron_blocks, num, rows, dtype=torch.float32) if needs_row_sums else placeholder
    column_partial = (gate.new_empty(batch, token_programs, num, width, dtype=torch.float32) if needs_column_sums
                      else placeholder)
    _launch(
        _mix_backward_kernel, (token_programs, neuron_blocks, batch), tile,
        grad_out, gate, gate if up is None else up,
        gate if grad_gate is None else grad_gate, gate if grad_up is None else grad_up,
        tables.applied, tables.soft,
        tables.static_logits, tables.static_factor, tables.token_logits, tables.token_factor,
        row_partial, column_partial,
        rows, length, width, tables.static_k_stride, tables.static_sequence_stride, tables.inv_tau,
        CODES=_packed_codes(activations), K=num, K_POW2=_next_power_of_2(num), MODE=tables.mode, HARD=bool(hard),
        SOFTMAX=normalization == "softmax", HAS_UP=up is not None, NEEDS_GATE=grad_gate is not None,
        NEEDS_UP=grad_up is not None, NEEDS_LOGIT_GRADS=needs_row_sums or needs_column_sums,
        NEEDS_ROW_SUMS=needs_row_sums, NEEDS_COLUMN_SUMS=needs_column_sums,
        ROW_STEPS=tile["ROW_STEPS"],
    )
    row_sums = row_partial.sum(dim=0) if needs_row_sums else None  # [K, R]
    if neuron_token:
        grad_static = None
        if needs_column_sums:
            grad_static = static_gradient_from_blocks(column_partial, batch, tables.sequences)
        grad_static, grad_token = assemble_logit_gradients(row_sums, grad_static, static_logits, token_logits,
                                                           needs_token, batch, length)
    else:
        grad_static, grad_token = assemble_logit_gradients(
            row_sums, None, static_logits, token_logits, needs_token, batch, length,
            soft=tables.soft if normalization == "softmax" else None, tau=tau, static_from_rows=needs_static)
    return grad_gate, grad_up, grad_static, grad_token
