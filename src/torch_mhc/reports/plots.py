"""Matplotlib PNGs of runs: loss (or bits per byte) and gap to a baseline, every step's grad norm, gains over
depth (the paper's figures 3 and 7 at small scale), H_res heatmaps. Tick labels are plain numbers
(:func:`plain_ticks`); runs of different data or tokenizers on one axis come with a warning."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib import ticker  # noqa: E402

from torch_mhc.diagnostics.gains import amax_gains  # noqa: E402
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


class PlainLogFormatter(ticker.LogFormatter):
    """matplotlib's choice of which log ticks to label, each written as a plain number (0.6, not 6e-01)."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:g}"


def plain_ticks(ax) -> None:
    """Tick labels as plain numbers on both axes: no offset ("+1.001" at the corner), no scientific notation
    ("1.0015x10^0"); log axes label decades as 1, 10, 100 and, over few decades, some ticks between."""
    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":  # decades, and 2 and 5 between them where few decades are shown
            axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
            axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
        else:
            formatter = ticker.ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            axis.set_major_formatter(formatter)


def legend_if_labelled(ax, fontsize: int = 8) -> None:
    """A legend when something on ``ax`` has a label (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def arm_color(i: int):
    """The i-th line's colour: tab10's ten colours, then their light variants (tab20's odd entries), so that up
    to 20 arms in one plot have distinct colours."""
    return plt.get_cmap("tab20")((2 * i + (i // 10) % 2) % 20)


def value_scale(ax, values, axis: str = "y", decades: float = 1.0) -> None:
    """Log scale for positive ``values`` that span at least ``decades`` decades, else linear (a log axis over a
    narrow range has no decade inside and labels its ticks like "1.0015x10^0"); then :func:`plain_ticks`."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) >= 10**decades:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    plain_ticks(ax)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LOSS_KEYS = {False: ("loss", "val_loss", "loss (nats/token)"), True: ("bpb", "val_bpb", "bits per byte")}


def plot_losses(runs: dict[str, list[dict]], out: Path, baseline: str | None, bpb: bool = False,
                note: str = "") -> list[Path]:
    """Training and validation loss per run (``bpb``: bits per byte), and the training-loss gap to ``baseline``;
    ``note`` (e.g. that the runs' data differ) is printed under the titles."""
    train_key, val_key, unit = LOSS_KEYS[bpb]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8 if note else 4.5), layout="constrained")
    for label, recs in runs.items():
        axes[0].plot(*_series(recs, train_key), label=f"{label} train", alpha=0.6)
        axes[1].plot(*_series(recs, val_key), marker="o", label=f"{label} val")
    for ax, title in zip(axes, ("training", "validation")):
        ax.set_xlabel("step"), ax.set_ylabel(unit), ax.set_title(f"{title} {'bits per byte' if bpb else 'loss'}")
        ax.grid(alpha=0.3), plain_ticks(ax)
        legend_if_labelled(ax)
    if note:
        fig.suptitle(note, fontsize=9, color="darkred")
    paths.append(_save(fig, out / "loss.png"))
    if baseline in runs and len(runs) > 1:  # a gap needs a run besides the baseline
        fig, ax = plt.subplots(figsize=(7, 4.8 if note else 4.5), layout="constrained")
        base = dict(zip(*_series(runs[baseline], train_key)))
        for label, recs in runs.items():
            if label == baseline:
                continue
            steps, losses = _series(recs, train_key)
            gap = [(s, v - base[s]) for s, v in zip(steps, losses) if s in base]
            ax.plot([g[0] for g in gap], [g[1] for g in gap], label=f"{label} - {baseline}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("step"), ax.set_ylabel(f"training {unit} gap"), ax.set_title(f"training gap to {baseline}")
        ax.grid(alpha=0.3), plain_ticks(ax)
        legend_if_labelled(ax)
        if note:
            fig.suptitle(note, fontsize=8, color="darkred")
        paths.append(_save(fig, out / "loss_gap.png"))
    return paths


def grad_norm_records(run_dir: Path) -> list[dict]:
    """Every step's gradient norm (``grad_norms.jsonl``); runs from before it existed: ``metrics.jsonl``'s
    (every ``log_every`` steps)."""
    path = run_dir / "grad_norms.jsonl"
    return [r for r in read_jsonl(path if path.is_file() else run_dir / "metrics.jsonl") if "grad_norm" in r]


def plot_grad_norm(runs: dict[str, list[dict]], out: Path) -> Path:
    """``runs``: label -> records with ``grad_norm`` (:func:`grad_norm_records`: every step)."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    values = []
    for label, recs in runs.items():
        steps, norms = _series(recs, "grad_norm")
        ax.plot(steps, norms, lw=0.8, label=label)
        values += norms
    ax.set_xlabel("step"), ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title("gradient norm at every step"), ax.grid(alpha=0.3)
    value_scale(ax, values)
    legend_if_labelled(ax)
    return _save(fig, out / "grad_norm.png")


def sublayer_name(layer: int) -> str:
    """Connection ``layer`` of the depth order: block ``layer // 2``'s attention (even) or FFN (odd)."""
    return f"block {layer // 2} {'attention' if layer % 2 == 0 else 'FFN'}"


def plot_gains(diags: dict[str, dict], out: Path) -> Path:
    """Single-layer and composite forward/backward gains over depth (paper Fig. 3/7); log scale where the
    gains span a decade or more, else linear (mHC's stay within a fraction of a percent of 1). A third panel
    for runs with several streams: the composite's distance from the uniform J/n (spectral norm of
    ``prod H_res - J/n``), which falls towards 0 if the product collapses into averaging the streams."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    values = {0: [], 1: [], 2: []}
    for r, (label, d) in enumerate(diags.items()):
        g, color = d["gains"], arm_color(r)
        if "composite_from_uniform" not in g and "h_res_mean" in d:  # written before the metric: recomputed
            g = amax_gains(torch.as_tensor(d["h_res_mean"], dtype=torch.float64))
        layers = range(len(g["single_fwd"]))
        step = f" (step {d['step']})" if d.get("step") is not None else ""
        for i, kind in enumerate(("single", "composite")):
            axes[i].plot(layers, g[f"{kind}_fwd"], marker=".", color=color, label=f"{label}{step} forward")
            axes[i].plot(layers, g[f"{kind}_bwd"], "--", marker=".", color=color, label=f"{label}{step} backward")
            values[i] += [*g[f"{kind}_fwd"], *g[f"{kind}_bwd"]]
        if "composite_from_uniform" in g and len(g["composite_from_uniform"]) and len(d["h_res_mean"][0]) > 1:
            axes[2].plot(layers, g["composite_from_uniform"], ":", marker=".", color=color)
            values[2] += g["composite_from_uniform"]
    titles = ("single layer: gain of H_res", "composite: gain of prod H_res, sublayer l to the last",
              "composite: ||prod H_res - J/n||_2, sublayer l to the last")
    ylabels = ("Amax gain magnitude", "Amax gain magnitude", "spectral norm (0: streams averaged into one)")
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_xlabel("sublayer l (even: attention, odd: FFN)"), ax.set_ylabel(ylabels[i])
        ax.set_title(title, fontsize=10), ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if values[i]:
            value_scale(ax, values[i])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(4, len(names)), fontsize=8)
    return _save(fig, out / "gains.png")


def _heat_scale(matrices) -> tuple[float, float, str]:
    """(vmin, vmax, colormap): 0..1 in one colour for values in [0, 1] (mHC's doubly stochastic H_res),
    else symmetric about 0 in two colours (HC's unconstrained H_res)."""
    values = [v for m in matrices for row in m for v in row]
    if min(values) >= -1e-9 and max(values) <= 1 + 1e-9:
        return 0.0, 1.0, "Blues"
    lim = max(1.0, max(abs(v) for v in values))
    return -lim, lim, "RdBu_r"


def plot_heatmaps(diags: dict[str, dict], out: Path, n_layers: int = 4) -> Path:
    """The token-mean H_res of up to ``n_layers`` sublayers (first, a third, two thirds, last) per run: one row
    per run with its own colour bar; row i is the stream written, column j the stream read."""
    labels = [k for k, d in diags.items() if len(d["h_res_mean"][0]) > 1] or list(diags)
    picks = {}
    for label in labels:
        depth = len(diags[label]["h_res_mean"])
        picks[label] = sorted({0, depth // 3, 2 * depth // 3, depth - 1})[:n_layers]
    cols = max(len(p) for p in picks.values())
    n = max(len(diags[label]["h_res_mean"][0]) for label in labels)
    size = 2.2 if n <= 4 else 2.8
    fig, axes = plt.subplots(len(labels), cols, figsize=(size * cols + 1.4, size * len(labels) + 0.9), squeeze=False,
                             layout="constrained")
    font = 8 if n <= 4 else 6 if n <= 8 else 0
    for r, label in enumerate(labels):
        mats = [diags[label]["h_res_mean"][layer] for layer in picks[label]]
        vmin, vmax, cmap = _heat_scale(mats)
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(mats):
                ax.axis("off")
                continue
            m, layer = mats[c], picks[label][c]
            im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax)
            for i, row in enumerate(m):
                for j, v in enumerate(row):
                    if font:
                        shade = (v - vmin) / (vmax - vmin)
                        dark = shade > 0.6 if cmap == "Blues" else abs(shade - 0.5) > 0.3
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=font,
                                color="white" if dark else "black")
            ax.set_title(f"sublayer {layer}: {sublayer_name(layer)}", fontsize=8)
            ax.set_xticks(range(len(m))), ax.set_yticks(range(len(m)))
            ax.tick_params(labelsize=7, length=2)
            ax.set_xlabel("stream read (j)", fontsize=8)
            if c == 0:
                step = diags[label].get("step")
                ax.set_ylabel(f"{label}{f' (step {step})' if step is not None else ''}\nstream written (i)",
                              fontsize=8)
        fig.colorbar(im, ax=list(axes[r]), shrink=0.85, label="H_res[i, j]")
    fig.suptitle("H_res averaged over the tokens of a validation batch (one row per run)", fontsize=10)
    return _save(fig, out / "h_res_heatmaps.png")


def last_diagnostics(run_dir: Path) -> dict | None:
    path = run_dir / "diagnostics.jsonl"
    if not path.is_file():
        return None
    recs = read_jsonl(path)
    return recs[-1] if recs else None


def run_settings(run_dir: Path) -> dict:
    """The run's ``config.json`` (empty when missing or unreadable)."""
    try:
        values = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return values if isinstance(values, dict) else {}


def mixed_runs_note(configs: dict[str, dict], bpb: bool) -> str:
    """A warning when runs that share an axis trained on different data or tokenizers ("" when they agree).
    Per-token losses of different tokenizers are not comparable, bits per byte are (``bpb``); different
    data differ in difficulty either way."""
    notes = []
    for key, what in (("data", "data"), ("tokenizer", "tokenizers")):
        groups: dict[str, list[str]] = {}
        for label, cfg in configs.items():
            groups.setdefault(str(cfg.get(key, "?")) or "the default corpus", []).append(label)
        if len(groups) > 1:
            detail = "; ".join(f"{value}: {', '.join(labels)}" for value, labels in groups.items())
            notes.append((key, f"different {what} ({detail})"))
    if not notes or (bpb and [k for k, _ in notes] == ["tokenizer"]):
        return ""
    text = "these runs trained on " + " and ".join(n for _, n in notes) + ": "
    if any(k == "tokenizer" for k, _ in notes) and not bpb:
        text += "losses per token of different tokenizers are not comparable; `mhc plot --bpb` plots bits per byte"
        if any(k == "data" for k, _ in notes):
            text += " (different data still differ in difficulty)"
    else:
        text += "their losses measure different text"
    return text


def plot_runs(run_dirs: list[str], out: Path, baseline: str | None = None, bpb: bool = False, warn=None) -> list[Path]:
    """All plots for the given runs into ``out``: losses (``bpb``: bits per byte), every step's gradient norm,
    gains and H_res heatmaps. The baseline for the gap plot defaults to a run named like 'residual', else the
    first run. Runs of different data or tokenizers are plotted with a warning (to ``warn``, default stderr,
    and on the loss plots)."""
    from torch_mhc.train.rundir import check_dir_path, ensure_dir

    check_dir_path(out, "--out")
    dirs = [Path(d) for d in run_dirs]
    labels = run_labels(dirs)
    runs = {label: read_jsonl(d / "metrics.jsonl") for label, d in zip(labels, dirs)}
    if bpb:
        missing = [label for label, recs in runs.items() if not any("bpb" in r for r in recs)]
        if missing:
            raise UserError(f"--bpb: {', '.join(missing)} logged no bits per byte (metrics.jsonl has no 'bpb'); "
                            "plot without --bpb.")
    if baseline is None:
        baseline = next((k for k in runs if "residual" in k), next(iter(runs)))
    note = mixed_runs_note({label: run_settings(d) for label, d in zip(labels, dirs)}, bpb)
    if note:
        (warn or (lambda text: print(text, file=sys.stderr)))(f"warning: {note}.")
    ensure_dir(out, "--out")
    grad_norms = {label: grad_norm_records(d) for label, d in zip(labels, dirs)}
    paths = plot_losses(runs, out, baseline, bpb, note) + [plot_grad_norm(grad_norms, out)]
    diags = {label: diag for label, d in zip(labels, dirs) if (diag := last_diagnostics(d)) is not None}
    if diags:
        paths += [plot_gains(diags, out), plot_heatmaps(diags, out)]
    return paths
