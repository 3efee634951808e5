"""Matplotlib PNGs of runs: loss and gap to a baseline, grad norm, gains over depth (the paper's
figures 3 and 7 at small scale), H_res heatmaps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from torch_mhc.train.config import UserError  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log, the last one kept per step (resumed runs may re-log steps). A line that
    is not a complete record (what a kill or a full disk leaves at the end) is skipped with a warning."""
    if not path.is_file():
        raise UserError(f"{path} not found: is {path.parent} a run directory of `mhc train`?")
    by_step = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            by_step[r["step"]] = r
        except (json.JSONDecodeError, TypeError, KeyError):
            print(f"warning: {path}:{number} is not a complete record (an interrupted write?); skipped.",
                  file=sys.stderr)
    return [by_step[k] for k in sorted(by_step)]


def run_labels(run_dirs: list[Path]) -> list[str]:
    """A label per run: its directory name, or as many trailing path parts as make it unique (runs of
    several comparisons share names). The same directory twice is a UserError."""
    resolved = [d.resolve() for d in run_dirs]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise UserError(f"run directory {run_dirs[i]} is given twice.")
    depth = 1
    while True:
        labels = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(runs: dict[str, list[dict]], out: Path, baseline: str | None) -> list[Path]:
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, recs in runs.items():
        axes[0].plot(*_series(recs, "loss"), label=f"{label} train", alpha=0.6)
        axes[1].plot(*_series(recs, "val_loss"), marker="o", label=f"{label} val")
    for ax, title in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.set_title(title), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if baseline in runs and len(runs) > 1:  # a gap needs a run besides the baseline
        fig, ax = plt.subplots(figsize=(7, 4.5))
        base = dict(zip(*_series(runs[baseline], "loss")))
        for label, recs in runs.items():
            if label == baseline:
                continue
            steps, losses = _series(recs, "loss")
            gap = [(s, v - base[s]) for s, v in zip(steps, losses) if s in base]
            ax.plot([g[0] for g in gap], [g[1] for g in gap], label=f"{label} - {baseline}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("step"), ax.set_ylabel("training loss gap"), ax.set_title(f"loss gap to {baseline}")
        ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "loss_gap.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_grad_norm(runs: dict[str, list[dict]], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, recs in runs.items():
        ax.plot(*_series(recs, "grad_norm"), label=label)
    ax.set_xlabel("step"), ax.set_ylabel("gradient norm (before clipping)"), ax.set_yscale("log")
    ax.set_title("gradient norm"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "grad_norm.png", dpi=110)
    plt.close(fig)
    return out / "grad_norm.png"


def plot_gains(diags: dict[str, dict], out: Path) -> Path:
    """Single-layer and composite forward/backward gains over depth, log scale (paper Fig. 3/7)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, d in diags.items():
        g = d["gains"]
        layers = range(len(g["single_fwd"]))
        axes[0].plot(layers, g["single_fwd"], label=f"{label} forward")
        axes[0].plot(layers, g["single_bwd"], "--", label=f"{label} backward")
        axes[1].plot(layers, g["composite_fwd"], label=f"{label} forward")
        axes[1].plot(layers, g["composite_bwd"], "--", label=f"{label} backward")
    for ax, title in zip(axes, ("single-layer gain of H_res", "composite gain of prod H_res, layer l to the end")):
        ax.set_xlabel("sublayer l"), ax.set_ylabel("Amax gain magnitude"), ax.set_yscale("log")
        ax.set_title(title), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gains.png", dpi=110)
    plt.close(fig)
    return out / "gains.png"


def plot_heatmaps(diags: dict[str, dict], out: Path, n_layers: int = 4) -> Path:
    labels = [k for k, d in diags.items() if len(d["h_res_mean"][0]) > 1] or list(diags)
    depth = len(diags[labels[0]]["h_res_mean"])
    picks = sorted({0, depth // 3, 2 * depth // 3, depth - 1})[:n_layers]
    fig, axes = plt.subplots(len(labels), len(picks), figsize=(2.6 * len(picks), 2.6 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        mats = diags[label]["h_res_mean"]
        for c, layer in enumerate(picks):
            if layer >= len(mats):
                axes[r][c].axis("off")
                continue
            m = mats[layer]
            im = axes[r][c].imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    axes[r][c].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
            axes[r][c].set_title(f"{label}: layer {layer}", fontsize=9)
            axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6)
    fig.savefig(out / "h_res_heatmaps.png", dpi=110)
    plt.close(fig)
    return out / "h_res_heatmaps.png"


def last_diagnostics(run_dir: Path) -> dict | None:
    path = run_dir / "diagnostics.jsonl"
    if not path.is_file():
        return None
    recs = read_jsonl(path)
    return recs[-1] if recs else None


def plot_runs(run_dirs: list[str], out: Path, baseline: str | None = None) -> list[Path]:
    """All plots for the given runs into ``out``; the baseline for the gap plot defaults to a run
    named like 'residual', else the first run."""
    from torch_mhc.train.rundir import check_dir_path, ensure_dir

    check_dir_path(out, "--out")
    dirs = [Path(d) for d in run_dirs]
    labels = run_labels(dirs)
    runs = {label: read_jsonl(d / "metrics.jsonl") for label, d in zip(labels, dirs)}
    if baseline is None:
        baseline = next((k for k in runs if "residual" in k), next(iter(runs)))
    ensure_dir(out, "--out")
    paths = plot_losses(runs, out, baseline) + [plot_grad_norm(runs, out)]
    diags = {label: diag for label, d in zip(labels, dirs) if (diag := last_diagnostics(d)) is not None}
    if diags:
        paths += [plot_gains(diags, out), plot_heatmaps(diags, out)]
    return paths
