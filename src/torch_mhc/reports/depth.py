"""The depth plot: each arm's test-loss gap to the residual network (mean and paired Student-t 95% interval)
and its largest composite forward gain, against the number of sublayers, from several `mhc compare`
directories that differ in ``model.n_layers``.

    python -m torch_mhc.reports.depth OUT.png COMPARE_DIR [COMPARE_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch_mhc.reports import stats
from torch_mhc.reports.plots import arm_color, legend_if_labelled, plain_ticks, plt, value_scale
from torch_mhc.train.config import UserError


def depth_points(compare_dirs: list[str | Path]) -> dict[str, list[dict]]:
    """Arm -> one point per depth, by sublayers (2 x ``model.n_layers`` of the comparison's base config):
    ``sublayers``, ``gap`` (the gap to residual at the arm's selected lr, its statistics recomputed from
    ``per_seed`` with :func:`stats.paired_gap`; None for the residual arm), ``max_composite_fwd_gain`` (the
    largest over the arm's finished runs at its selected lr), ``stack_from_uniform`` (those runs' whole-stack
    ``prod H_res`` distances from J/n at the end; None where the summary has none) and ``source`` (the
    directory). Where two directories hold the same arm at the same depth, the first listed is kept."""
    points: dict[str, dict[int, dict]] = {}
    for d in map(Path, compare_dirs):
        try:
            base = json.loads((d / "plan.json").read_text())["base"]
            summary = json.loads((d / "summary.json").read_text())
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{d} is not a finished `mhc compare` directory (plan.json, summary.json): {e}") from None
        sublayers = 2 * base["model"]["n_layers"]
        for arm, a in summary["protocol"]["arms"].items():
            if sublayers in points.get(arm, {}) or a["selected_lr"] is None:
                continue
            gap = a.get("gap_to_residual")
            if gap is not None:  # summaries written before the t statistics hold mean, sd and per_seed only
                gap = {**stats.paired_t(list(gap["per_seed"].values())), "per_seed": gap["per_seed"],
                       "seeds": len(gap["per_seed"])}
            runs = [r for r in summary["runs"]
                    if r["arm"] == arm and r["lr"] == a["selected_lr"] and r["status"] == "finished"]
            gains = [r["max_composite_fwd_gain"] for r in runs if r.get("max_composite_fwd_gain") is not None]
            stack = [r["stack_from_uniform"] for r in runs if r.get("stack_from_uniform") is not None]
            points.setdefault(arm, {})[sublayers] = {"sublayers": sublayers, "gap": gap, "source": str(d),
                                                      "max_composite_fwd_gain": max(gains) if gains else None,
                                                      "stack_from_uniform": stack or None}
    return {arm: [p[k] for k in sorted(p)] for arm, p in points.items()}


def plot_depth(points: dict[str, list[dict]], out: str | Path, title: str = "") -> Path:
    """Two panels against sublayers (log scale): each arm's gap to residual (mean, 95% interval as error bars;
    seeds per point in the legend), its largest composite forward gain (log scale over a decade or more) and,
    where the summaries have it, the whole stack's composite distance from J/n (mean and range over seeds):
    does ``prod H_res`` collapse towards averaging the streams as depth grows?"""
    fig, (ax_gap, ax_gain, ax_stack) = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, (arm, pts) in enumerate(points.items()):
        color = arm_color(i)
        with_gap = [p for p in pts if p["gap"] and p["gap"]["mean"] is not None]
        if with_gap:
            xs = [p["sublayers"] for p in with_gap]
            ys = [p["gap"]["mean"] for p in with_gap]
            err = [[y - (p["gap"]["ci95"] or [y, y])[0] for y, p in zip(ys, with_gap)],
                   [(p["gap"]["ci95"] or [y, y])[1] - y for y, p in zip(ys, with_gap)]]
            seeds = sorted({p["gap"]["seeds"] for p in with_gap})
            ax_gap.errorbar(xs, ys, yerr=err, marker="o", capsize=4, color=color,
                            label=f"{arm} ({'/'.join(map(str, seeds))} seeds)")
        with_gain = [p for p in pts if p["max_composite_fwd_gain"] is not None]
        if with_gain:
            ax_gain.plot([p["sublayers"] for p in with_gain], [p["max_composite_fwd_gain"] for p in with_gain],
                         marker="o", color=color, label=arm)
        with_stack = [p for p in pts if p.get("stack_from_uniform")]
        if with_stack:
            xs = [p["sublayers"] for p in with_stack]
            means = [sum(p["stack_from_uniform"]) / len(p["stack_from_uniform"]) for p in with_stack]
            err = [[m - min(p["stack_from_uniform"]) for m, p in zip(means, with_stack)],
                   [max(p["stack_from_uniform"]) - m for m, p in zip(means, with_stack)]]
            ax_stack.errorbar(xs, means, yerr=err, marker="o", capsize=4, color=color, label=arm)
    ax_gap.axhline(0.0, color="black", lw=0.8)
    ax_gap.set_title("test-loss gap to residual (mean, paired t 95% interval)")
    ax_gap.set_ylabel("gap (nats/token; < 0: better than residual)")
    gains = [p["max_composite_fwd_gain"] for pts in points.values() for p in pts]
    depths = sorted({p["sublayers"] for pts in points.values() for p in pts})
    value_scale(ax_gain, gains)  # log only over a decade or more: a narrow log axis labels ticks "1 x 10^0"
    ax_gain.set_title("largest composite forward gain (worst seed)")
    ax_stack.set_title("||prod H_res - J/n||_2 over the whole stack (mean, range)", fontsize=10)
    ax_stack.set_ylabel("1: no mixing; 0: streams averaged into one")
    value_scale(ax_stack, [v for pts in points.values() for p in pts for v in p.get("stack_from_uniform") or []])
    for ax in (ax_gap, ax_gain, ax_stack):
        ax.set_xscale("log", base=2)
        plain_ticks(ax)
        ax.set_xticks(depths, [str(d) for d in depths])  # the depths run, not powers of two
        ax.minorticks_off()
        ax.set_xlabel("sublayers")
        ax.grid(alpha=0.3, which="both")
        legend_if_labelled(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        out = plot_depth(depth_points(argv[1:]), argv[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
