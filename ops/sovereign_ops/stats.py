"""The statistics of experiment reports (docs/adr/1421-experiment-statistics.md), standard library only.

Two-sided tests at level ``alpha``; every interval is a (1 - alpha) interval. Cross-checked against scipy in
tests/unit/ops/test_experiment_stats.py when scipy is installed, and against textbook values otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

_N = NormalDist()
POWER = 0.8  # for the minimum detectable effect


def norm_ppf(q: float) -> float:
    return _N.inv_cdf(q)


def norm_sf2(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return 2.0 * (1.0 - _N.cdf(abs(z)))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if math.isinf(df):
        return norm_sf2(t)
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (q > 0.5), by bisection on t_sf2."""
    if math.isinf(df) or df > 1e7:
        return norm_ppf(q)
    target = 2.0 * (1.0 - q)  # two-sided tail mass beyond the quantile
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def chi2_sf_df1(x: float) -> float:
    """Upper tail of the chi-square distribution with 1 degree of freedom (the SRM check of two arms)."""
    return norm_sf2(math.sqrt(max(x, 0.0)))


def wilson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (good at small n and near 0 or 1, unlike the Wald interval)."""
    if n == 0:
        return (0.0, 1.0)
    z = norm_ppf(1.0 - alpha / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding above 0 or below 1)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def mean_ci(mean: float, var: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """t interval of a mean (n - 1 degrees of freedom)."""
    if n < 2:
        return (-math.inf, math.inf)
    half = t_ppf(1.0 - alpha / 2.0, n - 1) * math.sqrt(var / n)
    return (mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """Arm B minus arm A."""

    method: str
    difference: float
    ci: tuple[float, float]
    statistic: float
    p_value: float
    df: float | None
    mde: float  # smallest |difference| this sample detects with POWER at alpha

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "difference": self.difference,
            "ci": list(self.ci),
            "statistic": self.statistic,
            "df": self.df,
            "p_value": self.p_value,
            "mde": self.mde,
        }


def two_proportions(x_a: int, n_a: int, x_b: int, n_b: int, alpha: float = 0.05) -> Comparison | None:
    """Two-proportion z-test (pooled standard error under H0), and the Wald interval of p_b - p_a (unpooled)."""
    if n_a == 0 or n_b == 0:
        return None
    p_a, p_b = x_a / n_a, x_b / n_b
    pooled = (x_a + x_b) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    diff = p_b - p_a
    z_crit = norm_ppf(1 - alpha / 2)
    if se0 == 0:  # both arms all 0 or all 1: identical
        return Comparison("two-proportion z-test", diff, (diff, diff), 0.0, 1.0, None, math.inf)
    z = diff / se0
    mde = (z_crit + norm_ppf(POWER)) * se0
    ci = (diff - z_crit * se, diff + z_crit * se)
    return Comparison("two-proportion z-test", diff, ci, z, norm_sf2(z), None, mde)


def welch(m_a: float, v_a: float, n_a: int, m_b: float, v_b: float, n_b: int, alpha: float = 0.05) -> Comparison | None:
    """Welch's t-test (unequal variances, Welch-Satterthwaite degrees of freedom) and its interval of m_b - m_a."""
    if n_a < 2 or n_b < 2:
        return None
    sa, sb = v_a / n_a, v_b / n_b
    se = math.sqrt(sa + sb)
    diff = m_b - m_a
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        return Comparison("Welch's t-test", diff, (diff, diff), 0.0 if diff == 0 else math.inf, p, None, 0.0)
    df = (sa + sb) ** 2 / (sa * sa / (n_a - 1) + sb * sb / (n_b - 1))
    t = diff / se
    half = t_ppf(1 - alpha / 2, df) * se
    mde = (t_ppf(1 - alpha / 2, df) + t_ppf(POWER, df)) * se
    return Comparison("Welch's t-test", diff, (diff - half, diff + half), t, t_sf2(t, df), df, mde)


def srm(n_a: int, n_b: int, share_b: float) -> tuple[float, float]:
    """Sample-ratio-mismatch check: Pearson's chi-square of the arm counts against the configured split (df 1).
    Returns (chi2, p)."""
    n = n_a + n_b
    if n == 0 or not 0.0 < share_b < 1.0:
        return 0.0, 1.0
    exp_a, exp_b = n * (1 - share_b), n * share_b
    chi2 = (n_a - exp_a) ** 2 / exp_a + (n_b - exp_b) ** 2 / exp_b
    return chi2, chi2_sf_df1(chi2)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased sample variance (Welford)."""
    mean, m2 = 0.0, 0.0
    for i, x in enumerate(values, 1):
        delta = x - mean
        mean += delta / i
        m2 += delta * (x - mean)
    n = len(values)
    return mean, (m2 / (n - 1) if n > 1 else 0.0)
