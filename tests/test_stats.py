"""The Student-t statistics of `mhc compare` (reports/stats.py), against closed forms, printed tables and
simulation: the incomplete beta function, the t CDF and quantiles, paired intervals, p-values and power."""

import math
import random

import pytest

from torch_mhc.reports import stats


def test_betainc_closed_forms():
    rng = random.Random(0)
    for _ in range(50):
        x, a, b = rng.random(), rng.uniform(0.2, 8), rng.uniform(0.2, 8)
        assert stats.betainc(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert stats.betainc(a, 1, x) == pytest.approx(x ** a, rel=1e-10, abs=1e-300)
        assert stats.betainc(1, b, x) == pytest.approx(1 - (1 - x) ** b, rel=1e-10)
        assert stats.betainc(a, b, x) == pytest.approx(1 - stats.betainc(b, a, 1 - x), abs=1e-12)  # symmetry
    assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0
    # I_{1/2}(a, a) = 1/2 for every a
    assert stats.betainc(7.5, 7.5, 0.5) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError):
        stats.betainc(1, 1, 1.5)


def test_t_cdf_against_closed_forms():
    """df = 1 is the Cauchy distribution, 0.5 + atan(t)/pi; df = 2 has 0.5 + t / (2 sqrt(2 + t^2))."""
    rng = random.Random(1)
    for _ in range(50):
        t = rng.uniform(-30, 30)
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert stats.t_cdf(0.0, 5) == pytest.approx(0.5, abs=1e-15)
    assert stats.t_cdf(math.inf, 3) == 1.0 and stats.t_cdf(-math.inf, 3) == 0.0


# two-sided 5% critical values t_{0.975, df} as printed in statistical tables (6 decimals)
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 10: 2.228139, 30: 2.042272,
         120: 1.979930}


def test_t_quantile_against_tables():
    for df, t in T_975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-6)
        assert stats.t_quantile(0.025, df) == pytest.approx(-t, abs=1e-6)
    assert stats.t_quantile(0.80, 2) == pytest.approx(0.6 / math.sqrt(0.32), abs=1e-10)  # df 2: closed form
    assert stats.t_quantile(0.95, 5) == pytest.approx(2.015048, abs=1e-6)
    assert stats.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-10)
    for p in (0.6, 0.9, 0.999):  # the quantile inverts the CDF
        assert stats.t_cdf(stats.t_quantile(p, 4), 4) == pytest.approx(p, abs=1e-11)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_paired_t_known_cases():
    # mean 2, sd 1 on 3 seeds: t = 2 sqrt(3), p from the closed-form df-2 CDF; the interval 2 +- 4.302653 / sqrt(3)
    r = stats.paired_t([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert r["mean"] == 2.0 and r["sd"] == 1.0
    assert r["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12)  # 0.0742
    half = T_975[2] / math.sqrt(3)
    assert r["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-6)
    assert not r["resolved"]  # [-0.484, 4.484] holds 0, though t = 3.46 > 2 (the old rule called it resolved)
    # t = 2 exactly on 3 seeds (the old rule's edge): p = 1 - 2/sqrt(6) = 0.1835
    d = math.sqrt(3) / 2
    edge = stats.paired_t([1 - d, 1.0, 1 + d])
    assert edge["p_value"] == pytest.approx(1 - 2 / math.sqrt(6), rel=1e-9)
    # 6 seeds at the printed df-5 critical values: t = 2.570582 gives p = 0.05, t = 4.032143 gives p = 0.01
    base = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    mean, sd = sum(base) / 6, math.sqrt(sum((x - 3.5) ** 2 for x in base) / 5)
    z = [(x - mean) / sd for x in base]  # mean 0, sd 1
    for t, p in ((2.570582, 0.05), (4.032143, 0.01)):
        six = stats.paired_t([t / math.sqrt(6) + v for v in z])
        assert six["p_value"] == pytest.approx(p, abs=1e-6)


def test_paired_t_matches_the_issue_figures():
    """HC's gaps to residual in stress-full (issue 22 recomputed them: p = 0.010)."""
    r = stats.paired_t([-0.0450, -0.0577, -0.0644])
    assert r["p_value"] == pytest.approx(0.010271, abs=2e-6)
    assert r["ci95"] == pytest.approx([-0.080177, -0.031223], abs=2e-6)
    assert r["resolved"]
    # mHC's (-0.0012, -0.0305, -0.0225): p about 0.18, not resolved at 95% although |mean| > 2 sd / sqrt(3)
    m = stats.paired_t([-0.0012, -0.0305, -0.0225])
    assert abs(m["mean"]) > 2 * m["sd"] / math.sqrt(3)
    assert not m["resolved"] and 0.15 < m["p_value"] < 0.2


def test_paired_t_resolved_is_p_below_5_percent():
    rng = random.Random(2)
    for _ in range(300):
        k = rng.randint(2, 8)
        diffs = [rng.gauss(0.5, 1) for _ in range(k)]
        r = stats.paired_t(diffs)
        assert r["resolved"] == (r["p_value"] < 0.05) or abs(r["p_value"] - 0.05) < 1e-9
        assert r["resolved"] == (r["ci95"][0] > 0 or r["ci95"][1] < 0)


def test_paired_t_degenerate_cases():
    assert stats.paired_t([0.3]) == {"mean": 0.3, "sd": None, "ci95": None, "p_value": None, "resolved": False,
                                     "min_resolvable": None}
    same = stats.paired_t([0.01, 0.01, 0.01])
    assert same["sd"] == pytest.approx(0.0, abs=1e-15) and same["resolved"]
    assert stats.paired_t([])["mean"] is None


def test_min_resolvable_has_about_80_percent_power():
    """Normal gaps whose true mean is min_resolvable: the interval excludes 0 in about 80% of draws (the normal-shift
    approximation gives 77% at 3 seeds, 80% from 6 on)."""
    rng = random.Random(3)
    for k, lo, hi in ((3, 0.73, 0.82), (6, 0.76, 0.84)):
        sample = stats.paired_t([rng.gauss(0, 1) for _ in range(k)])
        per_sd = sample["min_resolvable"] / sample["sd"]  # the smallest resolvable gap in units of the sd
        hits = sum(stats.paired_t([rng.gauss(per_sd, 1.0) for _ in range(k)])["resolved"] for _ in range(4000))
        assert lo < hits / 4000 < hi, (k, hits / 4000)


def test_mean_sd_leaves_out_non_finite():
    """A NaN loss is no loss: statistics.stdev raised AttributeError on NaN (the summary crash of issue 22)."""
    assert stats.mean_sd([1.0, float("nan"), 3.0]) == {"mean": 2.0, "sd": pytest.approx(math.sqrt(2))}
    assert stats.mean_sd([float("inf"), None]) == {"mean": None, "sd": None}
    g = stats.paired_gap({1: 2.0, 2: float("nan"), 3: 2.5}, {1: 2.1, 2: 2.0, 3: 2.4})
    assert g["seeds"] == 2 and set(g["per_seed"]) == {"1", "3"}
