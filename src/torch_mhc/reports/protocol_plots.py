"""The plots of `mhc compare`: validation loss against lr per arm, loss and gap bands against tokens,
alpha, saturation and stream health against steps, grad norm per step, composite gains and H_res
heatmaps (each arm at its selected lr)."""

from __future__ import annotations

import statistics
from pathlib import Path

from torch_mhc.reports.plots import (
    arm_color,
    grad_norm_records,
    last_diagnostics,
    legend_if_labelled,
    plain_ticks,
    plot_gains,
    plot_heatmaps,
    plt,
    read_jsonl,
    ticker,
    value_scale,
)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_sweep(protocol: dict, out: Path) -> Path:
    """Mean validation loss against lr per arm, sd as error bars, the selected lr circled."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (arm, a) in enumerate(protocol["arms"].items()):
        pts = [(float(k), c["mean"], c["sd"] or 0.0) for k, c in a["val_loss_by_lr"].items()
               if c["mean"] is not None and not c["diverged"]]
        pts.sort()
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    color=arm_color(i), label=f"{arm} (selected {a['selected_lr']:g})" if a["selected_lr"] else arm)
        if a["selected_lr"] is not None:
            best = a["val_loss_by_lr"][f"{a['selected_lr']:g}"]["mean"]
            ax.plot([a["selected_lr"]], [best], marker="o", ms=14, mfc="none", mec=arm_color(i), mew=2)
    lrs = sorted({float(k) for a in protocol["arms"].values() for k in a["val_loss_by_lr"]})
    ax.set_xscale("log"), ax.set_xlabel("peak learning rate"), ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"validation loss by lr (mean +- sd over {len(protocol['seeds'])} seeds; circle: selected)")
    ax.grid(alpha=0.3)
    plain_ticks(ax)
    if lrs:  # a tick at each lr of the grid, written as in --lrs
        ax.xaxis.set_major_locator(ticker.FixedLocator(lrs)), ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.xaxis.set_major_formatter(ticker.FixedFormatter([f"{lr:g}" for lr in lrs]))
        if len(lrs) == 1:
            ax.set_xlim(lrs[0] / 2, lrs[0] * 2)
    legend_if_labelled(ax)
    return _save(fig, out / "lr_sweep.png")


def _selected_runs(protocol: dict, rows: list[dict]) -> dict[str, list[dict]]:
    """Arm -> its finished rows at its selected lr, in seed order."""
    runs = {arm: [r for r in rows if r["arm"] == arm and r["lr"] == a["selected_lr"] and r["status"] == "finished"]
            for arm, a in protocol["arms"].items() if a["selected_lr"] is not None}
    return {arm: rs for arm, rs in runs.items() if rs}


def _band(ax, xs, series: list[list[float]], color, label):
    mean = [statistics.fmean(v) for v in zip(*series)]
    sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*series)]
    ax.plot(xs, mean, color=color, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color, alpha=0.2)


def plot_loss_bands(protocol: dict, rows: list[dict], runs_dir: Path, out: Path) -> Path:
    """Validation loss, and its gap to the same seed's residual run, against tokens: mean +- sd bands."""
    selected = _selected_runs(protocol, rows)
    curves = {}  # name -> (tokens, val losses)
    for runs in selected.values():
        for r in runs:
            recs = [x for x in read_jsonl(runs_dir / r["name"] / "metrics.jsonl") if "val_loss" in x]
            curves[r["name"]] = ([x["tokens"] for x in recs], [x["val_loss"] for x in recs])
    base = {r["seed"]: curves[r["name"]] for r in selected.get(protocol["baseline"] or "", [])}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (arm, runs) in enumerate(selected.items()):
        series = [curves[r["name"]] for r in runs]
        n = min(len(s[0]) for s in series)
        _band(axes[0], series[0][0][:n], [s[1][:n] for s in series], arm_color(i),
              f"{arm} @ {runs[0]['lr']:g} ({len(runs)} seed{'s' * (len(runs) != 1)})")
        if arm == protocol["baseline"] or not base:
            continue
        gaps = [[v - b for v, b in zip(curves[r["name"]][1], base[r["seed"]][1])] for r in runs if r["seed"] in base]
        if gaps:
            m = min(len(g) for g in gaps)
            _band(axes[1], series[0][0][:m], [g[:m] for g in gaps], arm_color(i), f"{arm} - {protocol['baseline']}")
    axes[1].axhline(0, color="k", lw=0.8)
    for ax, title in zip(axes, ("validation loss (each arm at its selected lr)",
                                "validation loss gap to residual, paired by seed")):
        ax.set_xlabel("training tokens"), ax.set_title(title), ax.grid(alpha=0.3)
        legend_if_labelled(ax)
    axes[0].set_ylabel("loss (nats/token)"), axes[1].set_ylabel("gap (nats/token)")
    for ax in axes:
        plain_ticks(ax)
    return _save(fig, out / "loss_bands.png")


def _per_layer(diags: list[dict], key: str, reduce=max) -> tuple[list[int], list[float]]:
    pts = [(d["step"], reduce(s[key] for s in d["layers"])) for d in diags if key in d["layers"][0]]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_connection_health(protocol: dict, rows: list[dict], runs_dir: Path, out: Path) -> Path:
    """Against steps (first seed at the selected lr): max |alpha| per mapping, saturated fractions,
    the streams' distance from copies of each other, and H_res's mean distance from I."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for i, (arm, runs) in enumerate(_selected_runs(protocol, rows).items()):
        path = runs_dir / runs[0]["name"] / "diagnostics.jsonl"
        if not path.is_file():
            continue
        diags = read_jsonl(path)
        if diags and diags[0]["layers"][0].get("alpha") is not None:
            for j, (mapping, style) in enumerate((("pre", "-"), ("post", "--"), ("res", ":"))):
                steps = [d["step"] for d in diags]
                axes[0][0].plot(steps, [max(abs(s["alpha"][j]) for s in d["layers"]) for d in diags], style,
                                color=arm_color(i), label=f"{arm} {mapping}")
        for key, style in (("pre_saturated", "-"), ("post_saturated", "--")):
            steps, vals = _per_layer(diags, key)
            if steps:
                axes[0][1].plot(steps, vals, style, color=arm_color(i), label=f"{arm} {key.replace('_', ' ')}")
        if runs[0]["n"] > 1:
            after_first = [{**d, "layers": d["layers"][1:] or d["layers"]} for d in diags]  # layer 0 reads copies
            axes[1][0].plot(*_per_layer(after_first, "stream_copy_dist", statistics.fmean), color=arm_color(i),
                            label=f"{arm} mean")
            axes[1][0].plot(*_per_layer(after_first, "stream_copy_dist", min), "--", color=arm_color(i),
                            label=f"{arm} min")
            axes[1][1].plot(*_per_layer(diags, "res_dist_identity", statistics.fmean), color=arm_color(i),
                            label=f"{arm} mean")
            axes[1][1].plot(*_per_layer(diags, "res_dist_identity"), "--", color=arm_color(i), label=f"{arm} max")
    titles = (("max |alpha| over layers", "|alpha|"), ("saturated fraction (max over layers)", "fraction"),
              ("distance of the streams from copies of each other (layers after the first)", "relative spread"),
              ("||mean H_res - I||_F over layers", "distance"))
    for ax, (title, ylabel) in zip(axes.flat, titles):
        ax.set_xlabel("step"), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
        plain_ticks(ax)
        legend_if_labelled(ax, 7)
    return _save(fig, out / "connection_health.png")


def spike_label(arm: str, protocol: dict, rows: list[dict], shown: dict) -> str:
    """The legend of ``arm``'s grad-norm curve (``shown``: the row it plots): its seed's spike and, with several
    seeds, the worst seed's, the figure the report's stability table gives (max over the seeds at the lr)."""
    at_lr = [r for r in rows if r["arm"] == arm and r["lr"] == protocol["arms"][arm]["selected_lr"]]
    spikes = [r["grad_spike"] for r in at_lr if r.get("grad_spike") is not None]
    label = f"{arm} seed {shown['seed']}"
    if shown.get("grad_spike") is not None:
        label += f": spike {shown['grad_spike']:.1f}x"
    if len(spikes) > 1:
        label += f" (worst of {len(spikes)} seeds: {max(spikes):.1f}x)"
    return label


def plot_grad_norm_steps(protocol: dict, rows: list[dict], runs_dir: Path, out: Path) -> Path:
    """Gradient norm before clipping at every step (first seed at the selected lr): log scale where it spans a
    decade, else linear. The legend gives that seed's spike and the worst seed's (as the report's table does)."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    values = []
    for i, (arm, runs) in enumerate(_selected_runs(protocol, rows).items()):
        recs = grad_norm_records(runs_dir / runs[0]["name"])
        ax.plot([r["step"] for r in recs], [r["grad_norm"] for r in recs], lw=0.8, color=arm_color(i),
                label=spike_label(arm, protocol, rows, runs[0]))
        values += [r["grad_norm"] for r in recs]
    ax.set_xlabel("step"), ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title("gradient norm per step (spike: max / median after warmup)"), ax.grid(alpha=0.3)
    value_scale(ax, values)
    legend_if_labelled(ax)
    return _save(fig, out / "grad_norm.png")


def plot_protocol(protocol: dict, rows: list[dict], runs_dir: Path, out: Path) -> list[Path]:
    """Every plot of a comparison into ``out``."""
    paths = [plot_lr_sweep(protocol, out)]
    selected = _selected_runs(protocol, rows)
    if not selected:
        return paths
    paths += [plot_loss_bands(protocol, rows, runs_dir, out), plot_connection_health(protocol, rows, runs_dir, out),
              plot_grad_norm_steps(protocol, rows, runs_dir, out)]
    diags = {arm: d for arm, runs in selected.items() if (d := last_diagnostics(runs_dir / runs[0]["name"]))}
    if diags:
        paths += [plot_gains(diags, out), plot_heatmaps(diags, out)]
    return paths
