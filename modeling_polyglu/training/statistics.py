"""Statistics of seeded comparisons (`polyglu compare`): the paired t-interval, without scipy.

With n seeds, variant − baseline differences d_1..d_n of the final eval loss (same seed = same data order and shared
initial weights, so the runs are paired), the 95 % interval of the mean difference is

    mean(d) ± t_{0.975, n−1} · s_d / √n,        s_d the sample standard deviation (n − 1 in the denominator).

The Student t distribution with an integer number ν of degrees of freedom has a closed-form CDF (a finite series in
θ = atan(t / √ν), Abramowitz & Stegun 26.7.3–4); its quantile is found by bisection, exact to ~1e-12.
"""

import math
from typing import Optional, Sequence


def student_t_cdf(t: float, degrees_of_freedom: int) -> float:
    """P(T ≤ t) for Student's t with an integer ν ≥ 1 degrees of freedom."""
    nu = int(degrees_of_freedom)
    if nu < 1 or nu != degrees_of_freedom:
        raise ValueError(f"degrees_of_freedom must be a positive integer, got {degrees_of_freedom}.")
    theta = math.atan(t / math.sqrt(nu))
    sine, cosine_squared = math.sin(theta), math.cos(theta) ** 2
    if nu % 2 == 1:
        # A(t|ν) = (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + … up to cos^(ν−3)θ))
        series, term = 0.0, 1.0
        for k in range(1, (nu - 1) // 2 + 1):
            series += term
            term *= cosine_squared * (2 * k) / (2 * k + 1)
        two_sided = (2 / math.pi) * (theta + sine * math.cos(theta) * series)
    else:
        # A(t|ν) = sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + … up to cos^(ν−2)θ)
        series, term = 0.0, 1.0
        for k in range(1, nu // 2 + 1):
            series += term
            term *= cosine_squared * (2 * k - 1) / (2 * k)
        two_sided = sine * series
    return 0.5 + 0.5 * two_sided


def student_t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The t with P(T ≤ t) = probability (0 < probability < 1), by bisection on the CDF."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}.")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, degrees_of_freedom)
    low, high = 0.0, 1.0
    while student_t_cdf(high, degrees_of_freedom) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, degrees_of_freedom) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: Sequence[float]) -> Optional[float]:
    """Standard deviation with n − 1 in the denominator; None for fewer than two values."""
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(sum((value - centre) ** 2 for value in values) / (len(values) - 1))


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """Two-sided `confidence` interval of the mean paired difference (n − 1 dof); None for fewer than two pairs."""
    spread = sample_std(differences)
    if spread is None:
        return None
    n = len(differences)
    half_width = student_t_quantile(0.5 + confidence / 2, n - 1) * spread / math.sqrt(n)
    centre = mean(differences)
    return centre - half_width, centre + half_width


def interval_excludes_zero(interval: Optional[Sequence[float]]) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)
