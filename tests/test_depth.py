"""The depth plot (reports/depth.py) on the committed comparisons: points per arm and depth, gaps recomputed
with the paired t statistics from each summary's per-seed gaps."""

import json
from pathlib import Path

import pytest

from torch_mhc.reports import stats
from torch_mhc.reports.depth import depth_points, main, plot_depth
from torch_mhc.train.config import UserError

RESULTS = Path(__file__).parents[1] / "docs" / "results"


def test_depth_points_from_committed_comparisons(tmp_path):
    dirs = [RESULTS / "stress-full", RESULTS / "shakespeare-full"]  # 48 and 8 sublayers
    points = depth_points(dirs)
    assert [p["sublayers"] for p in points["mhc"]] == [8, 48] and [p["sublayers"] for p in points["hc"]] == [8, 48]
    assert points["mhc-gate"][0]["sublayers"] == 48  # only the stress comparison ran it
    hc48 = points["hc"][1]
    summary = json.loads((RESULTS / "stress-full" / "summary.json").read_text())
    published = summary["protocol"]["arms"]["hc"]["gap_to_residual"]
    assert hc48["gap"]["per_seed"] == published["per_seed"] and hc48["gap"]["seeds"] == 3
    assert hc48["gap"]["mean"] == pytest.approx(published["mean"]) and hc48["gap"]["resolved"]
    assert hc48["gap"]["p_value"] == pytest.approx(stats.paired_t(list(published["per_seed"].values()))["p_value"])
    gains = [r["max_composite_fwd_gain"] for r in summary["runs"] if r["arm"] == "hc" and r["lr"] == 0.003]
    assert hc48["max_composite_fwd_gain"] == max(gains) > 1000
    assert points["residual"][0]["gap"] is None
    out = plot_depth(points, tmp_path / "depth.png", title="test")
    assert out.stat().st_size > 10_000
    assert main([str(tmp_path / "d2.png"), *map(str, dirs)]) == 0 and (tmp_path / "d2.png").is_file()


def test_depth_points_carry_the_whole_stack_distance_from_uniform(tmp_path):
    """The committed depth comparisons (4, 12, 24 sublayers) give each mHC arm's whole-stack prod H_res distance
    from J/n per seed, as their summaries' rows hold it; the residual arm has none."""
    dirs = [RESULTS / f"stress-depth{d}" for d in (4, 12, 24)]
    points = depth_points(dirs)
    assert [p["sublayers"] for p in points["mhc-v4-a1"]] == [4, 12, 24]
    for d, point in zip(dirs, points["mhc-v4-a1"]):
        rows = json.loads((d / "summary.json").read_text())["runs"]
        assert point["stack_from_uniform"] == [r["stack_from_uniform"] for r in rows if r["arm"] == "mhc-v4-a1"]
    assert all(p["stack_from_uniform"] is None for p in points["residual"])
    assert all(0 < v <= 1.0 + 1e-6 for p in points["mhc"] for v in p["stack_from_uniform"])  # doubly stochastic
    fig = plot_depth(points, tmp_path / "depth.png")
    assert fig.stat().st_size > 10_000


def test_depth_refuses_a_directory_that_is_not_a_comparison(tmp_path):
    with pytest.raises(UserError, match="not a finished `mhc compare` directory"):
        depth_points([tmp_path])
    assert main([str(tmp_path / "x.png"), str(tmp_path)]) == 2
    assert main([]) == 2
