"""The statistics of the comparison protocol, on plain numbers: mean and sd over seeds, the lr that
a grid selects, the grid's extension at an edge, gaps paired by seed with a Student-t 95% interval and
p-value (a gap is resolved when its interval excludes 0), and the smallest gap a number of seeds resolves.

The t distribution is computed here (regularized incomplete beta function by its continued fraction)
rather than taken from scipy, which is not a dependency."""

from __future__ import annotations

import functools
import math
import statistics


def lr_key(lr: float) -> str:
    """The one spelling of a learning rate in run names and JSON keys: ``3e-03`` -> ``"0.003"``."""
    return f"{lr:g}"


def mean_sd(values: list[float]) -> dict:
    """``{"mean", "sd"}`` of the finite values (sample sd; None for fewer than two; both None for none).
    None, NaN and infinities are left out: a run that ended with a NaN loss has no loss to average."""
    values = [v for v in values if _finite(v)]
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1, by its continued
    fraction (modified Lentz), on the side of x where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):  # I_x(a, b) = 1 - I_{1-x}(b, a)
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step, then odd step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on :func:`t_cdf` to about 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


CONFIDENCE = 0.95  # the interval of a paired gap
POWER = 0.80  # the power at which min_resolvable is stated


def paired_t(diffs: list[float]) -> dict:
    """Student-t statistics of paired differences (k of them): ``ci95`` = mean +- t_{0.975, k-1} sd / sqrt(k),
    ``p_value`` (two-sided, H0: mean 0), ``resolved`` (the interval excludes 0) and ``min_resolvable`` =
    (t_{0.975, k-1} + t_{0.80, k-1}) sd / sqrt(k): about the smallest true gap that k seeds with this sd resolve
    with 80% power (the usual normal-shift approximation to the noncentral t). None where k < 2."""
    k = len(diffs)
    out = {**mean_sd(diffs), "ci95": None, "p_value": None, "resolved": False, "min_resolvable": None}
    if k < 2:
        return out
    mean, sd = out["mean"], out["sd"]
    crit = t_quantile(0.5 + CONFIDENCE / 2, k - 1)
    half = crit * sd / math.sqrt(k)
    out["ci95"] = [mean - half, mean + half]
    if sd > 0:
        out["p_value"] = 2.0 * (1.0 - t_cdf(abs(mean) / (sd / math.sqrt(k)), k - 1))
    else:  # every seed gave the same gap
        out["p_value"] = 1.0 if mean == 0 else 0.0
    out["resolved"] = out["ci95"][0] > 0 or out["ci95"][1] < 0
    out["min_resolvable"] = (crit + t_quantile(POWER, k - 1)) * sd / math.sqrt(k)
    return out


RESOLVED_RULE = "the paired Student-t 95% interval excludes 0"


def paired_gap(arm: dict[int, float | None], base: dict[int, float | None]) -> dict:
    """Gap ``arm - base`` over the seeds both have a finite loss for: ``mean``, ``sd``, ``per_seed``
    (seed as a string -> gap), ``seeds`` (how many), ``ci95`` ([low, high]), ``p_value``, ``resolved``
    and ``min_resolvable`` (:func:`paired_t`)."""
    per_seed = {str(s): arm[s] - base[s] for s in sorted(arm)
                if s in base and _finite(arm[s]) and _finite(base[s])}
    return {**paired_t(list(per_seed.values())), "per_seed": per_seed, "seeds": len(per_seed)}


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def select_lr(losses_by_lr: dict[float, list[float | None]]) -> float | None:
    """The lr with the lowest mean loss among those where every seed finished (a diverged seed, None
    or non-finite, rules its lr out); None when every lr is ruled out."""
    eligible = {lr: statistics.fmean(v) for lr, v in losses_by_lr.items() if v and all(_finite(x) for x in v)}
    return min(eligible, key=lambda lr: (eligible[lr], lr)) if eligible else None


def at_edge(lr: float | None, grid: list[float]) -> bool:
    """Whether ``lr`` is the smallest or the largest of a grid of at least two lrs."""
    return lr is not None and len(grid) > 1 and lr in (min(grid), max(grid))


def extension(lr: float, grid: list[float]) -> float | None:
    """The next lr beyond the edge of ``grid`` that ``lr`` sits on, one grid step further (the ratio of
    the two lrs at that edge), rounded to 3 significant digits; None when ``lr`` is not at an edge."""
    if not at_edge(lr, grid):
        return None
    ordered = sorted(grid)
    if lr == ordered[0]:
        return float(f"{ordered[0] ** 2 / ordered[1]:.3g}")
    return float(f"{ordered[-1] ** 2 / ordered[-2]:.3g}")


def grad_spike(norms: list[float]) -> float | None:
    """max / median of the gradient norms (None for none or a zero median)."""
    if not norms:
        return None
    median = statistics.median(norms)
    return max(norms) / median if median > 0 else None
