"""The CPU kernel of the fused activation mixing: one C++ pass per direction, built on first use.

``h = u ⊙ Σ_k c_k φ_k(g)`` and its backward run as two loops over ``[rows, d_ff]`` written with ATen's
``at::vec::Vectorized<float>`` (AVX-512 / AVX2 / portable, as torch itself was built). Compared with the
torch.compile'd Python of :mod:`activation_mixing`, the C++ loop can do three things Inductor cannot express:

* **factorised softmax with a per-vector fallback** — PolyGLU's weights ``softmax_k((s_k[f] + t_k[r]) / τ)`` are
  computed as ``a_k[f] · b_k[r] / Σ_j a_j[f] b_j[r]`` from two small tables of exponentials (one per neuron, one
  per token), so no ``exp`` runs per element; where a vector's true denominator falls below ``e^-64`` (static and
  token preferences disagree by 64 τ) that vector takes the exact per-element path instead;
* **both coefficient-gradient reductions in the same pass** — per token (a row sum) and per neuron (a column sum,
  kept per block of rows in L1/L2), so no ``[K, rows, d_ff]`` buffer is written;
* **one exponential per activation**, shared by its value and its derivative: ATen's 2-ulp polynomial ``exp``, a
  refined hardware reciprocal instead of a division, tanh from ``exp(-2|x|)`` (a polynomial near 0), erf by the
  Abramowitz-Stegun approximation torch's own vectorised GELU uses. Against torch's fp32 activations: within 3e-7
  relative (2e-7 absolute for erf-GELU's tail, as torch's).

Routed variants only: a single fixed activation (SwiGLU, ...) stays on torch's kernels, bit-identical to Qwen3.

The table entries are ``exp(max(x, -84))`` scaled by ``2^60`` (exactly: a power of two), so every product lies in
``[e^-84.8, e^83.2]``: normal floats whose sum cannot overflow. The clamp moves a term by at most ``e^-84`` of the
unscaled denominator, which the fallback keeps above ``e^-64``: an error below ``e^-20`` relative. Weights are
floored at ``e^-60``, as in the exact path, and the kernels run with flush-to-zero: subnormal numbers make x86
arithmetic an order of magnitude slower.

The library is compiled with the system C++ compiler into a per-user cache directory (``POLYGLU_KERNEL_CACHE``,
default ``~/.cache/polyglu``), keyed by the source, the CPU capability and the torch version (not the compiler),
written to a temporary name and renamed, so concurrent processes (DDP ranks) never load a half-written file. A
manifest written after the library records its size and SHA-256; an entry that does not match (truncated, foreign)
is rebuilt once rather than loaded. Where no compiler works, :func:`load_library` returns None, with one warning,
and the caller uses its torch.compile path.

This file is part of the remote code saved next to a checkpoint: it imports only torch and the standard library.
"""

import ctypes
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Optional

import torch

# kernel activation codes; the names are those of activation_mixing.ACTIVATIONS
ACTIVATION_CODES = {"relu": 0, "tanh": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "sigmoid": 5, "identity": 6}
MAX_ACTIVATIONS = 8
SMALLEST_WEIGHT = 8.75651076e-27  # e^-60: the floor of every softmax weight (a smaller one changes nothing in fp32)
# PolyGLU's factor tables: exp(max(x, FACTOR_FLOOR)) · FACTOR_SCALE (2^60); the C++ source spells the same numbers
FACTOR_FLOOR = -84.0
FACTOR_SCALE = 2.0 ** 60

_SOURCE = r"""
#include <ATen/cpu/vec/vec.h>
#include <cstdint>
#include <cstring>
#include <vector>

// Everything below is inlined into the loops: a call per vector (with its arguments spilled) costs more than the
// arithmetic of most activations.
#define POLYGLU_INLINE inline __attribute__((always_inline))
#define POLYGLU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluTanhCoef = 0.044715f;
// 2^120 e^-64: a scaled factorised denominator below it (e^-64 unscaled) is not trusted; see the module docstring
constexpr float kExactThreshold = 2.13187e+08f;
constexpr float kSmallestLogWeight = -60.0f;
constexpr float kSmallestWeight = 8.75651076e-27f;  // e^-60
constexpr float kFactorFloor = -84.0f;
constexpr float kFactorScale = 1.152921504606846976e18f;  // 2^60

enum : int32_t { kRelu = 0, kTanh = 1, kSilu = 2, kGelu = 3, kGeluTanh = 4, kSigmoid = 5, kIdentity = 6 };

// exp_u20: ATen's polynomial exp, within 2 ulp and several times cheaper than Sleef's exp
POLYGLU_INLINE Vec fast_exp(const Vec& x) { return x.exp_u20(); }

// 1 / x for the finite, positive denominators used below: the hardware estimate refined by Newton steps
// (within ~1 ulp), several times cheaper than a division
POLYGLU_INLINE Vec fast_reciprocal(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const Vec estimate(_mm512_rcp14_ps(x));
  return estimate * (Vec(2.0f) - x * estimate);
#elif defined(CPU_CAPABILITY_AVX2)
  Vec estimate(_mm256_rcp_ps(x));
  estimate = estimate * (Vec(2.0f) - x * estimate);
  return estimate * (Vec(2.0f) - x * estimate);
#else
  return Vec(1.0f) / x;
#endif
}

// exponent capped at 80: 1 + e stays finite (the reciprocal's Newton step would turn 1/inf into nan) and the
// result normal (sigmoid(-80) = 1.8e-35; subnormal outputs would slow every later matmul down)
POLYGLU_INLINE Vec sigmoid(const Vec& x) {
  return fast_reciprocal(Vec(1.0f) + fast_exp(at::vec::minimum(x.neg(), Vec(80.0f))));
}

// tanh within ~1e-7 relative, at a third of Sleef's cost: (1 - e) / (1 + e) with e = exp(-2|x|) where that has no
// cancellation (|x| >= 0.55), an odd polynomial below (x + x^3 Q(x^2), Q fitted for relative error on [0, 0.55]).
// With SLOPE also sech^2 = 1 - tanh^2, as 4e / (1 + e)^2 from 0.55 on: 1 - t^2 would turn the reciprocal's last-ulp
// error in t (AVX2's refined estimate of 1 / 1 is 1 - 2^-24) into 1.2e-7 where sech^2 is 0, which GELU-tanh's
// slope multiplies by ~x^3 (0.011 at x = 120).
template <bool SLOPE>
POLYGLU_INLINE void tanh_and_sech2(const Vec& x, Vec& value, Vec& sech2) {
  const Vec one(1.0f);
  const Vec magnitude = x.abs();
  const Vec e = fast_exp(Vec(-2.0f) * magnitude);
  const Vec inverse = fast_reciprocal(one + e);
  const Vec large = (one - e) * inverse;
  const Vec square = x * x;
  Vec q = Vec(-0.0062876008450984955f) * square + Vec(0.021082019433379173f);
  q = q * square + Vec(-0.053855109959840775f);
  q = q * square + Vec(0.13332617282867432f);
  q = q * square + Vec(-0.33333319425582886f);
  const Vec small = magnitude + magnitude * square * q;
  const Vec is_small = magnitude < Vec(0.55f);
  const Vec result = Vec::blendv(large, small, is_small);
  value = Vec::blendv(result, result.neg(), x < Vec(0.0f));
  if constexpr (SLOPE) sech2 = Vec::blendv(Vec(4.0f) * e * inverse * inverse, one - small * small, is_small);
}

// e^-x and the logistic function 1 / (1 + e^-x), the exponent capped at 80 as in sigmoid()
POLYGLU_INLINE Vec sigmoid_with_complement(const Vec& x, Vec& complement) {
  const Vec e = fast_exp(at::vec::minimum(x.neg(), Vec(80.0f)));
  const Vec s = fast_reciprocal(Vec(1.0f) + e);
  complement = e * s;  // 1 - s without the subtraction, which keeps s's last-ulp error (x (1 - s) in SiLU's slope)
  return s;
}

// GELU (erf form) and its derivative from one exponential: erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7,
// the approximation ATen's vectorised erf uses), whose exp(-y^2) with y = x / sqrt(2) is also the normal density's
template <bool SLOPE>
POLYGLU_INLINE void gelu(const Vec& x, Vec& value, Vec& slope) {
  const Vec one(1.0f), half(0.5f);
  const Vec y = x * Vec(kSqrtHalf);
  const Vec t = fast_reciprocal(Vec(0.3275911f) * y.abs() + one);
  Vec poly = Vec(1.061405429f) * t + Vec(-1.453152027f);
  poly = poly * t + Vec(1.421413741f);
  poly = poly * t + Vec(-0.284496736f);
  poly = poly * t + Vec(0.254829592f);
  const Vec gauss = fast_exp(Vec(-0.5f) * x * x);
  const Vec erf_abs = one - poly * t * gauss;
  const Vec cdf = half * (one + Vec::blendv(erf_abs, erf_abs.neg(), y < Vec(0.0f)));
  value = x * cdf;
  if constexpr (SLOPE) slope = cdf + x * gauss * Vec(kInvSqrt2Pi);
}

// Value (and, with SLOPE, derivative) of one activation on one vector.
template <int32_t CODE, bool SLOPE>
POLYGLU_INLINE void activation(const Vec& x, Vec& value, Vec& slope) {
  const Vec half(0.5f), one(1.0f), zero(0.0f);
  if constexpr (CODE == kRelu) {
    value = at::vec::maximum(x, zero);
    if constexpr (SLOPE) slope = Vec::blendv(zero, one, x > zero);
  } else if constexpr (CODE == kTanh) {
    tanh_and_sech2<SLOPE>(x, value, slope);
  } else if constexpr (CODE == kSilu) {
    if constexpr (SLOPE) {
      Vec complement;
      const Vec s = sigmoid_with_complement(x, complement);
      value = x * s;
      slope = s * (one + x * complement);
    } else {
      value = x * sigmoid(x);
    }
  } else if constexpr (CODE == kGelu) {
    gelu<SLOPE>(x, value, slope);
  } else if constexpr (CODE == kGeluTanh) {
    const Vec x2 = x * x;
    Vec t, sech2;
    tanh_and_sech2<SLOPE>(Vec(kSqrt2OverPi) * (x + Vec(kGeluTanhCoef) * x2 * x), t, sech2);
    value = half * x * (one + t);
    if constexpr (SLOPE) {
      slope = half * (one + t) + half * x * sech2 * Vec(kSqrt2OverPi) * (one + Vec(3.0f * kGeluTanhCoef) * x2);
    }
  } else if constexpr (CODE == kSigmoid) {
    if constexpr (SLOPE) {
      Vec complement;
      value = sigmoid_with_complement(x, complement);
      slope = value * complement;
    } else {
      value = sigmoid(x);
    }
  } else {
    value = x;
    if constexpr (SLOPE) slope = one;
  }
}

template <bool SLOPE>
POLYGLU_INLINE void activation(int32_t code, const Vec& x, Vec& value, Vec& slope) {
  switch (code) {
    case kRelu: activation<kRelu, SLOPE>(x, value, slope); return;
    case kTanh: activation<kTanh, SLOPE>(x, value, slope); return;
    case kSilu: activation<kSilu, SLOPE>(x, value, slope); return;
    case kGelu: activation<kGelu, SLOPE>(x, value, slope); return;
    case kGeluTanh: activation<kGeluTanh, SLOPE>(x, value, slope); return;
    case kSigmoid: activation<kSigmoid, SLOPE>(x, value, slope); return;
    default: activation<kIdentity, SLOPE>(x, value, slope); return;
  }
}

// Flush-to-zero and denormals-are-zero for this thread while it runs a kernel: a subnormal intermediate (the square
// of a tiny pre-activation, a weight of e^-100 before its floor) would otherwise cost a microcode assist each time.
// Values that small change nothing in fp32 results; the caller's floating-point state is restored afterwards.
struct FlushSubnormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

POLYGLU_INLINE bool any_lane(const Vec& mask) { return mask.zero_mask() != (1 << kLanes) - 1; }

POLYGLU_INLINE float lane_sum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float total = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

POLYGLU_INLINE int64_t lanes_at(int64_t f, int64_t F) { return F - f < kLanes ? F - f : kLanes; }

// ---- coefficients constant along a row (per token or per layer) ---------------------------------------------
// weights [K, R]. A zero coefficient skips its activation, which is what hard routing at inference needs: one
// activation evaluated per token.

template <int K>
void rowwise_forward(const float* gate, const float* up, float* out, const int32_t* codes, const float* weights,
                     int64_t R, int64_t F, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      float w[K];
      for (int k = 0; k < K; ++k) w[k] = weights[k * R + r];
      for (int64_t f = 0; f < F; f += kLanes) {
        const int64_t n = lanes_at(f, F);
        const Vec g = Vec::loadu(gate + r * F + f, n);
        Vec mixed(0.0f), value, unused;
        for (int k = 0; k < K; ++k) {
          if (w[k] == 0.0f) continue;
          activation<false>(codes[k], g, value, unused);
          mixed = mixed + Vec(w[k]) * value;
        }
        if (up) mixed = mixed * Vec::loadu(up + r * F + f, n);
        mixed.store(out + r * F + f, n);
      }
    }
  }
}

// row_products [K, R] (or nullptr): sum_f (dy * u) * (phi_k - sum_j soft_j phi_j) for softmax coefficients (soft
// [K, R]), sum_f (dy * u) * phi_k for linear ones (soft nullptr); the caller derives every coefficient gradient of
// the row from them, the coefficients being constant along it. Subtracting the soft mixture per element, before
// summing, keeps the precision when the activations are alike (SiLU and GELU).
template <int K>
void rowwise_backward(const float* grad_out, const float* gate, const float* up, float* grad_gate, float* grad_up,
                      float* row_products, const int32_t* codes, const float* weights, const float* soft,
                      int64_t R, int64_t F, int threads) {
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      float w[K], soft_w[K];
      Vec products[K];
      for (int k = 0; k < K; ++k) {
        w[k] = weights[k * R + r];
        soft_w[k] = soft ? soft[k * R + r] : 0.0f;
        products[k] = Vec(0.0f);
      }
      for (int64_t f = 0; f < F; f += kLanes) {
        const int64_t n = lanes_at(f, F);
        const int64_t at = r * F + f;
        const Vec g = Vec::loadu(gate + at, n);
        const Vec dy = Vec::loadu(grad_out + at, n);
        const Vec grad_mixed = up ? dy * Vec::loadu(up + at, n) : dy;
        Vec mixed(0.0f), slope(0.0f), soft_mixed(0.0f), values[K], derivative;
        for (int k = 0; k < K; ++k) {
          if (w[k] == 0.0f && !row_products) continue;
          activation<true>(codes[k], g, values[k], derivative);
          soft_mixed = soft_mixed + Vec(soft_w[k]) * values[k];
          if (w[k] == 0.0f) continue;  // an unchosen activation (hard routing) must not leak inf/nan in
          mixed = mixed + Vec(w[k]) * values[k];
          slope = slope + Vec(w[k]) * derivative;
        }
        if (grad_gate) (grad_mixed * slope).store(grad_gate + at, n);
        if (grad_up) (dy * mixed).store(grad_up + at, n);
        if (row_products) {
          for (int k = 0; k < K; ++k) products[k] = products[k] + grad_mixed * (values[k] - soft_mixed);
        }
      }
      if (row_products) {
        for (int k = 0; k < K; ++k) row_products[k * R + r] = lane_sum(products[k]);
      }
    }
  }
}

// ---- PolyGLU: softmax_k((s_k[f] + t_k[r]) / tau), a per-neuron table plus a per-token one ------------------
// static [K, S, F] (S in {1, B}: shared or per sequence) and token [K, R] tables, each as logits l and factors
// exp(max((l - max_k l) / tau, -84)) 2^60. The logits stay unscaled so that the exact path rounds (s + t) / tau in the
// naive order: with sharp routing (|l| / tau in the hundreds) scaling first would cost several ulps of weight.
struct NeuronTokenTables {
  const float* static_logits;
  const float* static_factor;
  const float* token_logits;
  const float* token_factor;
  int64_t S, R, T, F;
  float inv_tau;
};

// factors[k, i] = exp(max((l[k, i] - max_j l[j, i]) / tau, -84)) 2^60 for logits [K, count]
template <int K>
void fill_factors(const float* logits, float* factors, int64_t count, float inv_tau) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const int64_t n = lanes_at(i, count);
    Vec l[K];
    Vec top = l[0] = Vec::loadu(logits + i, n);
    for (int k = 1; k < K; ++k) {
      l[k] = Vec::loadu(logits + k * count + i, n);
      top = at::vec::maximum(top, l[k]);
    }
    for (int k = 0; k < K; ++k) {
      const Vec exponent = at::vec::maximum((l[k] - top) * Vec(inv_tau), Vec(kFactorFloor));
      (fast_exp(exponent) * Vec(kFactorScale)).store(factors + k * count + i, n);
    }
  }
}

// The tables of one call: the factors computed here, the token logits zero where the caller has none.
template <int K>
struct NeuronTokenScratch {
  std::vector<float> static_factor, token_logits, token_factor;
  NeuronTokenTables tables;

  NeuronTokenScratch(const float* static_logits, const float* token_logits_in, int64_t S, int64_t R, int64_t T,
                     int64_t F, float inv_tau)
      : static_factor(K * S * F), token_factor(K * R) {
    const float* token = token_logits_in;
    if (token == nullptr) {
      token_logits.assign(K * R, 0.0f);
      token = token_logits.data();
    }
    fill_factors<K>(static_logits, static_factor.data(), S * F, inv_tau);
    fill_factors<K>(token, token_factor.data(), R, inv_tau);
    tables = NeuronTokenTables{static_logits, static_factor.data(), token, token_factor.data(), S, R, T, F, inv_tau};
  }
};

template <int K>
struct RowTables {
  const float* static_logits[K];
  const float* static_factor[K];
  float token_logits[K];
  float token_factor[K];
  float inv_tau;

  RowTables(const NeuronTokenTables& tables, int64_t r) {
    const int64_t s = tables.S > 1 ? r / tables.T : 0;
    for (int k = 0; k < K; ++k) {
      static_logits[k] = tables.static_logits + (k * tables.S + s) * tables.F;
      static_factor[k] = tables.static_factor + (k * tables.S + s) * tables.F;
      token_logits[k] = tables.token_logits[k * tables.R + r];
      token_factor[k] = tables.token_factor[k * tables.R + r];
    }
    inv_tau = tables.inv_tau;
  }

  void logits(int64_t f, int64_t n, Vec* z) const {
    for (int k = 0; k < K; ++k) z[k] = Vec::loadu(static_logits[k] + f, n) + Vec(token_logits[k]);
  }

  // softmax weights at columns [f, f + n): factorised, or exact where the factorised denominator is too small
  // (tail lanes beyond n load zeros, so a partial vector always takes the exact path)
  void soft_weights(int64_t f, int64_t n, Vec* weight) const {
    Vec total(0.0f);
    for (int k = 0; k < K; ++k) {
      weight[k] = Vec::loadu(static_factor[k] + f, n) * Vec(token_factor[k]);
      total = total + weight[k];
    }
    if (any_lane(total < Vec(kExactThreshold))) {
      Vec z[K];
      logits(f, n, z);
      for (int k = 0; k < K; ++k) z[k] = z[k] * Vec(inv_tau);
      Vec top = z[0];
      for (int k = 1; k < K; ++k) top = at::vec::maximum(top, z[k]);
      total = Vec(0.0f);
      for (int k = 0; k < K; ++k) {
        weight[k] = fast_exp(at::vec::maximum(z[k] - top, Vec(kSmallestLogWeight)));
        total = total + weight[k];
      }
    }
    const Vec inverse = fast_reciprocal(total);
    for (int k = 0; k < K; ++k) weight[k] = at::vec::maximum(weight[k] * inverse, Vec(kSmallestWeight));
  }

  // lane masks of the argmax activation (ties to the lowest index, as torch.argmax); tau > 0 does not change it
  void hard_choice(int64_t f, int64_t n, Vec* chosen) const {
    Vec z[K];
    logits(f, n, z);
    Vec best = z[0], choice(0.0f);
    for (int k = 1; k < K; ++k) {
      const Vec better = z[k] > best;
      best = Vec::blendv(best, z[k], better);
      choice = Vec::blendv(choice, Vec(static_cast<float>(k)), better);
    }
    for (int k = 0; k < K; ++k) chosen[k] = choice == Vec(static_cast<float>(k));
  }
};

template <int K, bool HARD>
POLYGLU_INLINE Vec mix(const Vec* weight_or_mask, const Vec* x) {
  Vec total(0.0f);
  for (int k = 0; k < K; ++k) {
    total = total + (HARD ? Vec::blendv(Vec(0.0f), x[k], weight_or_mask[k]) : weight_or_mask[k] * x[k]);
  }
  return total;
}

template <int K, bool HARD>
void neuron_token_forward(const float* gate, const float* up, float* out, const int32_t* codes,
                          const NeuronTokenTables& tables, int threads) {
  const int64_t F = tables.F;
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < tables.R; ++r) {
      const RowTables<K> row(tables, r);
      for (int64_t f = 0; f < F; f += kLanes) {
        const int64_t n = lanes_at(f, F);
        Vec weight[K], values[K], unused;
        if (HARD) row.hard_choice(f, n, weight); else row.soft_weights(f, n, weight);
        const Vec g = Vec::loadu(gate + r * F + f, n);
        for (int k = 0; k < K; ++k) activation<false>(codes[k], g, values[k], unused);
        Vec mixed = mix<K, HARD>(weight, values);
        if (up) mixed = mixed * Vec::loadu(up + r * F + f, n);
        mixed.store(out + r * F + f, n);
      }
    }
  }
}

// Blocks of rows [t0, t1) within one sequence; static_partial [blocks, K, F] gets each block's column sums of
// the logit gradient, token_grad [K, R] the row sums.
template <int K, bool HARD>
void neuron_token_backward(const float* grad_out, const float* gate, const float* up, float* grad_gate,
                           float* grad_up, float* static_partial, float* token_grad, const int32_t* codes,
                           const NeuronTokenTables& tables, int64_t rows_per_block, int threads) {
  const int64_t F = tables.F, T = tables.T;
  const int64_t blocks_per_sequence = (T + rows_per_block - 1) / rows_per_block;
  const int64_t num_blocks = (tables.R / T) * blocks_per_sequence;
  const bool logit_grads = static_partial != nullptr || token_grad != nullptr;
#pragma omp parallel num_threads(threads)
  {
    const FlushSubnormals flush;
#pragma omp for schedule(static)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t first = (block / blocks_per_sequence) * T + (block % blocks_per_sequence) * rows_per_block;
      const int64_t last = first + rows_per_block < (block / blocks_per_sequence + 1) * T
                               ? first + rows_per_block : (block / blocks_per_sequence + 1) * T;
      float* column_sums = static_partial ? static_partial + block * K * F : nullptr;
      if (column_sums) std::memset(column_sums, 0, sizeof(float) * K * F);
      for (int64_t r = first; r < last; ++r) {
        const RowTables<K> row(tables, r);
        Vec row_sums[K];
        for (int k = 0; k < K; ++k) row_sums[k] = Vec(0.0f);
        for (int64_t f = 0; f < F; f += kLanes) {
          const int64_t n = lanes_at(f, F);
          const int64_t at = r * F + f;
          Vec soft[K], chosen[K], values[K], slopes[K];
          row.soft_weights(f, n, soft);
          if (HARD) row.hard_choice(f, n, chosen);
          const Vec g = Vec::loadu(gate + at, n);
          const Vec dy = Vec::loadu(grad_out + at, n);
          const Vec grad_mixed = up ? dy * Vec::loadu(up + at, n) : dy;
          for (int k = 0; k < K; ++k) activation<true>(codes[k], g, values[k], slopes[k]);
          const Vec* applied = HARD ? chosen : soft;
          if (grad_gate) (grad_mixed * mix<K, HARD>(applied, slopes)).store(grad_gate + at, n);
          if (grad_up) (dy * mix<K, HARD>(applied, values)).store(grad_up + at, n);
          if (!logit_grads) continue;
          // d/dz_k of sum_j softmax_j(z) phi_j = w_k (phi_k - sum_j w_j phi_j); straight-through uses soft weights
          const Vec soft_mixed = mix<K, false>(soft, values);
          const Vec scale = grad_mixed * Vec(tables.inv_tau);
          for (int k = 0; k < K; ++k) {
            const Vec grad = scale * soft[k] * (values[k] - soft_mixed);
            row_sums[k] = row_sums[k] + grad;
            if (column_sums) {
              float* target = column_sums + k * F + f;
              (Vec::loadu(target, n) + grad).store(target, n);
            }
          }
        }
        if (token_grad) {
          for (int k = 0; k < K; ++k) token_grad[k * tables.R + r] = lane_sum(row_sums[k]);
        }
      }
    }
  }
}

}  // namespace

#define POLYGLU_DISPATCH_K(K_VALUE, CALL)                 \
  switch (K_VALUE) {                                      \
    case 1: { constexpr int K = 1; CALL; return 0; }      \
    case 2: { constexpr int K = 2; CALL; return 0; }      \
    case 3: { constexpr int K = 3; CALL; return 0; }      \
    case 4: { constexpr int K = 4; CALL; return 0; }      \
    case 5: { constexpr int K = 5; CALL; return 0; }      \
    case 6: { constexpr int K = 6; CALL; return 0; }      \
    case 7: { constexpr int K = 7; CALL; return 0; }      \
    case 8: { constexpr int K = 8; CALL; return 0; }      \
    default: return 1;                                    \
  }

POLYGLU_EXPORT int polyglu_rowwise_forward(const float* gate, const float* up, float* out, const int32_t* codes,
                                       int64_t num_activations, const float* weights, int64_t R, int64_t F,
                                       int32_t threads) {
  POLYGLU_DISPATCH_K(num_activations, rowwise_forward<K>(gate, up, out, codes, weights, R, F, threads));
}

POLYGLU_EXPORT int polyglu_rowwise_backward(const float* grad_out, const float* gate, const float* up, float* grad_gate,
                                        float* grad_up, float* row_products, const int32_t* codes,
                                        int64_t num_activations, const float* weights, const float* soft,
                                        int64_t R, int64_t F, int32_t threads) {
  POLYGLU_DISPATCH_K(num_activations, rowwise_backward<K>(grad_out, gate, up, grad_gate, grad_up, row_products,
                                                          codes, weights, soft, R, F, threads));
}

POLYGLU_EXPORT int polyglu_neuron_token_forward(const float* gate, const float* up, float* out, const int32_t* codes,
                                                int64_t num_activations, const float* static_logits,
                                                const float* token_logits, int64_t S, int64_t R, int64_t T, int64_t F,
                                                float inv_tau, int32_t hard, int32_t threads) {
  if (hard) {
    POLYGLU_DISPATCH_K(num_activations, (neuron_token_forward<K, true>(
        gate, up, out, codes, NeuronTokenScratch<K>(static_logits, token_logits, S, R, T, F, inv_tau).tables,
        threads)));
  }
  POLYGLU_DISPATCH_K(num_activations, (neuron_token_forward<K, false>(
      gate, up, out, codes, NeuronTokenScratch<K>(static_logits, token_logits, S, R, T, F, inv_tau).tables,
      threads)));
}

POLYGLU_EXPORT int polyglu_neuron_token_backward(const float* grad_out, const float* gate, const float* up,
                                                 float* grad_gate, float* grad_up, float* static_partial,
                                                 float* token_grad, const int32_t* codes, int64_t num_activations,
                                                 const float* static_logits, const float* token_logits, int64_t S,
                                                 int64_t R, int64_t T, int64_t F, float inv_tau, int32_t hard,
                                                 int64_t rows_per_block, int32_t threads) {
  if (hard) {
    POLYGLU_DISPATCH_K(num_activations, (neuron_token_backward<K, true>(
        grad_out, gate, up, grad_gate, grad_up, static_partial, token_grad, codes,
        NeuronTokenScratch<K>(static_logits, token_logits, S, R, T, F, inv_tau).tables, rows_per_block, threads)));
  }
  POLYGLU_DISPATCH_K(num_activations, (neuron_token_backward<K, false>(
      grad_out, gate, up, grad_gate, grad_up, static_partial, token_grad, codes,
      NeuronTokenScratch<K>(static_logits, token_logits, S, R, T, F, inv_tau).tables, rows_per_block, threads)));
}
"""

_LIBRARY = {}
_DISABLE_ENV = "POLYGLU_DISABLE_CPU_KERNEL"
_CACHE_ENV = "POLYGLU_KERNEL_CACHE"

_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # very old or unusual builds
        return "DEFAULT"


_COMPILER_FLAGS = (
    "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno",
    # hidden symbols: no PLT calls into ATen's inline vector functions, which the compiler can then inline
    "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-semantic-interposition",
)


def _compiler() -> list:
    """The compiler command: $CXX, which may carry arguments ("ccache g++"), else c++ or g++ from PATH."""
    configured = os.environ.get("CXX", "").strip()
    if configured:
        return shlex.split(configured)
    return [shutil.which("c++") or shutil.which("g++") or "c++"]


def _compile_command(source_path: str, library_path: str) -> list:
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    return [
        *_compiler(), *_COMPILER_FLAGS, *_CAPABILITY_FLAGS.get(_cpu_capability(), []),
        "-I", os.path.join(os.path.dirname(torch.__file__), "include"),
        source_path, "-o", library_path,
        "-L", torch_lib, "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}",
    ]


def _cache_dir() -> str:
    root = os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "polyglu")
    return os.path.join(root, "kernels")


def _manifest_path() -> str:
    """The cache entry of this source, flags, CPU and torch: a JSON naming the library file and its digest.

    The compiler is not part of the key: a library built from the same source and flags serves whichever
    compiler (or none) is on PATH later.
    """
    key = "\0".join([_SOURCE, *_COMPILER_FLAGS, _cpu_capability(), torch.__version__, sys.platform])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(_cache_dir(), f"polyglu_mix_{digest}.json")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install(staged_library: str, manifest_path: str) -> str:
    """Move a built library into the cache under a name holding its digest, then record it in the manifest.

    Library files are never rewritten in place (a name is its content) and the manifest is replaced atomically
    after its library exists, so concurrent builders and readers only ever see complete, matching pairs.
    """
    digest = _file_sha256(staged_library)
    size = os.path.getsize(staged_library)
    library_path = manifest_path[: -len(".json")] + f"_{digest[:16]}.so"
    os.replace(staged_library, library_path)
    staged_manifest = f"{manifest_path}.{os.getpid()}.tmp"
    with open(staged_manifest, "w") as handle:
        json.dump({"library": os.path.basename(library_path), "sha256": digest, "size": size}, handle)
    os.replace(staged_manifest, manifest_path)
    return library_path


def _verified_library(manifest_path: str) -> Optional[str]:
    """The cached library if its manifest is readable and the file has the recorded size and digest, else None.

    A truncated shared object is not merely unusable: the loader maps it and the process dies of SIGBUS.
    """
    try:
        with open(manifest_path) as handle:
            entry = json.load(handle)
        library_path = os.path.join(os.path.dirname(manifest_path), os.path.basename(entry["library"]))
        if os.path.getsize(library_path) == entry["size"] and _file_sha256(library_path) == entry["sha256"]:
            return library_path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _build(manifest_path: str) -> str:
    os.makedirs(os.path.dirname(manifest_path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(manifest_path), prefix=".build-") as workdir:
        source_path = os.path.join(workdir, "polyglu_mix.cpp")
        staged = os.path.join(workdir, "polyglu_mix.so")
        with open(source_path, "w") as handle:
            handle.write(_SOURCE)
        result = subprocess.run(_compile_command(source_path, staged), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"compiler exited with {result.returncode}")
        return _install(staged, manifest_path)


def kernel_enabled() -> bool:
    """Use the C++ CPU kernel? Off with POLYGLU_DISABLE_CPU_KERNEL=1, or once building or loading it failed."""
    if os.environ.get(_DISABLE_ENV, "0") not in ("", "0"):
        return False
    return not _LIBRARY.get("failed", False)


def load_library() -> Optional[ctypes.CDLL]:
    """The compiled kernel library (verified, or built on first use), or None where it cannot be built or loaded.

    A missing, truncated or foreign cache entry is rebuilt once; only if that fails does the caller fall back.
    """
    if not kernel_enabled():
        return None
    if "library" in _LIBRARY:
        return _LIBRARY["library"]
    try:
        manifest = _manifest_path()
        path = _verified_library(manifest)
        if path is None:
            # the first forward otherwise looks hung for ~20 s
            print(f"polyglu: building the C++ CPU mixing kernel (once, ~20 s); it is cached in "
                  f"{os.path.dirname(manifest)} for later runs.", file=sys.stderr, flush=True)
            _build(manifest)
            path = _verified_library(manifest)
            if path is None:
                raise RuntimeError(f"the library built into {os.path.dirname(manifest)} does not match its manifest")
        library = ctypes.CDLL(path)
        for name in ("polyglu_rowwise_forward", "polyglu_rowwise_backward", "polyglu_neuron_token_forward",
                     "polyglu_neuron_token_backward"):
            getattr(library, name).restype = ctypes.c_int
    except Exception as error:  # no compiler, read-only home, unsupported platform: use the torch.compile path
        _LIBRARY["failed"] = True
        warnings.warn(f"Could not build polyglu's C++ CPU mixing kernel ({type(error).__name__}: {error}); using the "
                      f"torch.compile path. Set {_DISABLE_ENV}=1 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return None
    _LIBRARY["library"] = library
    return library


def uses_neuron_table(static_logits: Optional[torch.Tensor], normalization: str) -> bool:
    """PolyGLU's case: softmax over a per-neuron table (plus a per-token one); every other mixer is row-wise."""
    return static_logits is not None and static_logits.shape[-1] > 1 and normalization == "softmax"


def layout_supported(gate, activations, static_logits, token_logits, normalization) -> bool:
    """The mixings the kernels take (this one and triton_mixing_kernel.py): at most MAX_ACTIVATIONS known
    activations, and coefficients that are per row or PolyGLU's per-neuron softmax (logits K-major:
    [K, S, 1, Fs], [K, B, T, 1]), or none (one fixed activation)."""
    per_neuron_linear = static_logits is not None and static_logits.shape[-1] > 1 and normalization == "linear"
    return (
        _broadcasts(static_logits, token_logits, gate.shape)
        and 1 <= len(activations) <= MAX_ACTIVATIONS
        and all(name in ACTIVATION_CODES for name in activations)
        and gate.numel() > 0
        and not per_neuron_linear
    )


def supports(gate, up, activations, static_logits, token_logits, normalization) -> bool:
    """Can the kernel take these inputs? fp32 CPU activations, routed, in a layout of :func:`layout_supported`.

    A single fixed activation (SwiGLU, GeGLU, ...) is left to torch's own kernels, which keep those variants equal
    to transformers' models to the last bit.
    """
    tensors = [t for t in (gate, up) if t is not None]
    return (
        (static_logits is not None or token_logits is not None)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and layout_supported(gate, activations, static_logits, token_logits, normalization)
    )


def _broadcasts(static_logits, token_logits, gate_shape) -> bool:
    """Do the K-major logits broadcast to the kernel's tables? static [K, 1|B, 1, 1|F], token [K, 1|B, 1|T, 1]."""
    batch, length, width = gate_shape
    if static_logits is not None:
        _, sequences, middle, neurons = static_logits.shape
        if sequences not in (1, batch) or middle != 1 or neurons not in (1, width):
            return False
    if token_logits is not None:
        _, sequences, positions, last = token_logits.shape
        if sequences not in (1, batch) or positions not in (1, length) or last != 1:
            return False
    return True


def _pointer(tensor: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"{name} rejected its arguments (status {status})")


@functools.lru_cache(maxsize=None)
def _codes(activations: tuple) -> torch.Tensor:
    """The kernel's activation codes (int32, shared: never written to)."""
    return torch.tensor([ACTIVATION_CODES[name] for name in activations], dtype=torch.int32)


def row_coefficients(static_logits, token_logits, batch, length, tau, normalization, hard):
    """(applied [K, R], soft [K, R] or None if linear) when the coefficients are constant along each row."""
    parts = [t.float() for t in (static_logits, token_logits) if t is not None]
    num = parts[0].shape[0]
    logits = torch.zeros(num, batch, length, 1, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        logits = logits + part  # [K, S, 1, 1] or [K, B, T, 1]
    logits = logits.reshape(num, batch * length)
    if normalization == "linear":
        return logits.contiguous(), None
    soft = torch.softmax(logits / tau, dim=0).clamp_min(SMALLEST_WEIGHT).contiguous()  # no subnormal weights
    if not hard:
        return soft, soft
    applied = torch.zeros_like(soft).scatter_(0, soft.argmax(dim=0, keepdim=True), 1.0)
    return applied, soft


def neuron_token_logits(static_logits, token_logits, batch, length):
    """PolyGLU's logits in the kernel's layouts: static [K, S, F] and token [K, R] (or None), fp32, contiguous."""
    num = static_logits.shape[0]
    static = static_logits.float().reshape(num, -1).contiguous()
    token = None
    if token_logits is not None:  # [K, 1|B, 1|T, 1] -> [K, R]
        token = token_logits.float().expand(num, batch, length, 1).reshape(num, batch * length).contiguous()
    return static, token, static_logits.shape[1]


def _rows_per_block(batch: int, length: int, threads: int) -> int:
    # blocks never straddle sequences (static logits may be per sequence); enough blocks to keep every thread busy
    blocks_wanted = 4 * threads if threads > 1 else 1
    per_sequence = max(1, -(-blocks_wanted // batch))
    return max(1, -(-length // per_sequence))


def mix_forward(library, gate, up, static_logits, token_logits, activations, tau, normalization, hard):
    """``u ⊙ Σ_k c_k φ_k(g)`` ([B, T, F], fp32); the logits in activation_mixing's K-major layouts."""
    batch, length, width = gate.shape
    gate = gate.contiguous()
    up = None if up is None else up.contiguous()
    out = torch.empty_like(gate)
    codes, num, threads = _codes(activations), len(activations), torch.get_num_threads()
    if uses_neuron_table(static_logits, normalization):
        static, token, sequences = neuron_token_logits(static_logits, token_logits, batch, length)
        _check(library.polyglu_neuron_token_forward(
            _pointer(gate), _pointer(up), _pointer(out), _pointer(codes), ctypes.c_int64(num), _pointer(static),
            _pointer(token), ctypes.c_int64(sequences), ctypes.c_int64(batch * length), ctypes.c_int64(length),
            ctypes.c_int64(width), ctypes.c_float(1.0 / tau), ctypes.c_int32(int(hard)), ctypes.c_int32(threads),
        ), "polyglu_neuron_token_forward")
    else:
        applied, _ = row_coefficients(static_logits, token_logits, batch, length, tau, normalization, hard)
        _check(library.polyglu_rowwise_forward(
            _pointer(gate), _pointer(up), _pointer(out), _pointer(codes), ctypes.c_int64(num), _pointer(applied),
            ctypes.c_int64(batch * length), ctypes.c_int64(width), ctypes.c_int32(threads),
        ), "polyglu_rowwise_forward")
    return out


def mix_backward(library, grad_out, gate, up, static_logits, token_logits, activations, tau, normalization, hard,
                 needs):
    """(grad_gate, grad_up, grad_static [K, S, 1, Fs], grad_token [K, B, T, 1]); None where ``needs`` is False."""
    batch, length, width = gate.shape
    rows, num, threads = batch * length, len(activations), torch.get_num_threads()
    grad_out, gate = grad_out.contiguous(), gate.contiguous()
    up = None if up is None else up.contiguous()
    grad_gate = torch.empty_like(gate) if needs[0] else None
    grad_up = torch.empty_like(up) if up is not None and needs[1] else None
    needs_static = static_logits is not None and needs[2]
    needs_token = token_logits is not None and needs[3]
    codes = _codes(activations)
    if uses_neuron_table(static_logits, normalization):
        static, token, sequences = neuron_token_logits(static_logits, token_logits, batch, length)
        rows_per_block = _rows_per_block(batch, length, threads)
        num_blocks = batch * -(-length // rows_per_block)
        static_partial = gate.new_empty(num_blocks, num, width) if needs_static else None
        token_grad = gate.new_empty(num, rows) if needs_token else None
        _check(library.polyglu_neuron_token_backward(
            _pointer(grad_out), _pointer(gate), _pointer(up), _pointer(grad_gate), _pointer(grad_up),
            _pointer(static_partial), _pointer(token_grad), _pointer(codes), ctypes.c_int64(num), _pointer(static),
            _pointer(token), ctypes.c_int64(sequences), ctypes.c_int64(rows), ctypes.c_int64(length),
            ctypes.c_int64(width), ctypes.c_float(1.0 / tau), ctypes.c_int32(int(hard)),
            ctypes.c_int64(rows_per_block), ctypes.c_int32(threads),
        ), "polyglu_neuron_token_backward")
        grad_static = None if static_partial is None else static_gradient_from_blocks(static_partial, batch, sequences)
        grad_static, grad_token = assemble_logit_gradients(token_grad, grad_static, static_logits, token_logits,
                                                           needs_token, batch, length)
    else:
        applied, soft = row_coefficients(static_logits, token_logits, batch, length, tau, normalization, hard)
        products = gate.new_empty(num, rows) if needs_static or needs_token else None
        _check(library.polyglu_rowwise_backward(
            _pointer(grad_out), _pointer(gate), _pointer(up), _pointer(grad_gate), _pointer(grad_up),
            _pointer(products), _pointer(codes), ctypes.c_int64(num), _pointer(applied), _pointer(soft),
            ctypes.c_int64(rows), ctypes.c_int64(width), ctypes.c_int32(threads),
        ), "polyglu_rowwise_backward")
        grad_static, grad_token = assemble_logit_gradients(
            products, None, static_logits, token_logits, needs_token, batch, length,
            soft=soft if normalization == "softmax" else None, tau=tau, static_from_rows=needs_static)
    return grad_gate, grad_up, grad_static, grad_token


def static_gradient_from_blocks(block_sums, batch, sequences):
    """The per-neuron logit gradient [K, S, 1, F] from per-block column sums [B · blocks, K, F] (or
    [B, blocks, K, F]; blocks in sequence order, none straddling two sequences)."""
    num, width = block_sums.shape[-2:]
    per_sequence = block_sums.reshape(batch, -1, num, width).sum(dim=1)  # [B, K, F]
    if sequences == 1:
        per_sequence = per_sequence.sum(dim=0, keepdim=True)
    return per_sequence.permute(1, 0, 2).unsqueeze(2)


def assemble_logit_gradients(row_sums, grad_static, static_logits, token_logits, needs_token, batch, length,
                             soft=None, tau=1.0, static_from_rows=False):
    """(grad_static, grad_token) in the logits' shapes and dtypes from a kernel's reductions.

    row_sums [K, R] (or None): per-row sums of the logit gradient; for row-wise softmax coefficients ``soft``
    [K, R], sums of (dy ⊙ u)(φ_k - Σ_j w_j φ_j), scaled here by w_k / τ (linear ones: sums of (dy ⊙ u) φ_k, the
    gradient itself). With ``static_from_rows`` (coefficients constant along each row) they also give the static
    gradient; otherwise ``grad_static`` [K, S, 1, F] comes from the column sums, or is None.
    """
    row_grads = row_sums if row_sums is None or soft is None else soft * row_sums / tau
    if static_from_rows:
        num = row_grads.shape[0]
        per_sequence = row_grads.view(num, batch, length).sum(dim=2)  # [K, B]
        if static_logits.shape[1] == 1:
            per_sequence = per_sequence.sum(dim=1, keepdim=True)
        grad_static = per_sequence.view(num, -1, 1, 1)
    grad_token = None
    if needs_token:  # summed over the dimensions the token logits broadcast along
        num = row_grads.shape[0]
        grad_token = row_grads.view(num, batch, length, 1).sum_to_size(token_logits.shape).to(token_logits.dtype)
    if grad_static is not None:
        grad_static = grad_static.sum_to_size(static_logits.shape).to(static_logits.dtype)
    return grad_static, grad_token
