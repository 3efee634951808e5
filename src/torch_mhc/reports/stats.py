"""The statistics of the comparison protocol, on plain numbers: mean and sd over seeds, the lr that
a grid selects, the grid's extension at an edge, gaps paired by seed and when a gap is resolved."""

from __future__ import annotations

import math
import statistics


def lr_key(lr: float) -> str:
    """The one spelling of a learning rate in run names and JSON keys: ``3e-03`` -> ``"0.003"``."""
    return f"{lr:g}"


def mean_sd(values: list[float]) -> dict:
    """``{"mean", "sd"}`` of the values (sample sd; None for fewer than two values; both None for none)."""
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}


def is_resolved(mean: float | None, sd: float | None, count: int) -> bool:
    """A mean difference over ``count`` paired seeds is resolved when ``|mean| > 2 sd / sqrt(count)``
    (about two standard errors); never with fewer than two seeds."""
    if mean is None or sd is None or count < 2:
        return False
    return abs(mean) > 2 * sd / math.sqrt(count)


def paired_gap(arm: dict[int, float | None], base: dict[int, float | None]) -> dict:
    """Gap ``arm - base`` over the seeds both have a finite loss for: ``mean``, ``sd``, ``per_seed``
    (seed as a string -> gap), ``seeds`` (how many) and ``resolved``."""
    per_seed = {str(s): arm[s] - base[s] for s in sorted(arm)
                if s in base and _finite(arm[s]) and _finite(base[s])}
    stats = mean_sd(list(per_seed.values()))
    return {**stats, "per_seed": per_seed, "seeds": len(per_seed),
            "resolved": is_resolved(stats["mean"], stats["sd"], len(per_seed))}


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
