"""Plots a reader understands: plain tick labels, H_res heatmaps on a 0..1 scale with labelled axes and titles
that do not overlap, every step's grad norm, compare legends that give the report table's worst spike, and a
warning (and bits per byte) when runs of different data or tokenizers share an axis.

Each plot function is run on synthetic records; its figure is captured at save time and read back (tick
labels, colour limits, line data, text boxes). Set MHC_PLOT_DIR to keep the PNGs for a look."""

import json
import os
import random

import pytest
import torch

pytest.importorskip("matplotlib")

from conftest import TINY  # noqa: E402
from torch_mhc.cli import main  # noqa: E402
from torch_mhc.reports import plots, protocol_plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """name -> the figure each plot saved (drawn, so tick labels exist); PNGs kept in MHC_PLOT_DIR if set."""
    captured = {}
    keep = os.environ.get("MHC_PLOT_DIR")

    def save(fig, path):
        if keep:
            fig.savefig(os.path.join(keep, path.name), dpi=110)
        fig.canvas.draw()  # after savefig, which draws at its own dpi: text boxes are read at the canvas's
        captured[path.stem] = fig
        return path

    monkeypatch.setattr(plots, "_save", save)
    monkeypatch.setattr(protocol_plots, "_save", save)
    return captured


def tick_labels(ax) -> list[str]:
    texts = [t.get_text() for t in [*ax.get_xticklabels(), *ax.get_yticklabels()]]
    return [t for t in texts if t]


def assert_plain(ax):
    """Every tick label a plain number (no 'x10^', no '1e-05', no mathtext), no offset text at the corner."""
    labels = tick_labels(ax)
    assert labels
    for text in labels:
        assert "$" not in text and "e" not in text.lower() and "\N{MULTIPLICATION SIGN}" not in text, text
        float(text.replace("\N{MINUS SIGN}", "-"))
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""


def gains_record(scale: float, depth: int = 6, step: int = 100) -> dict:
    """A diagnostics record whose gains rise to ``1 + scale`` (mHC-like for small ``scale``, HC-like for large)."""
    g = {k: [1 + scale * (i + 1) / depth * (1.1 if "bwd" in k else 1) for i in range(depth)]
         for k in ("single_fwd", "single_bwd", "composite_fwd", "composite_bwd")}
    return {"step": step, "gains": g}


def test_gain_ticks_are_plain_numbers(figures, tmp_path):
    """Gains within 0.15% of 1 (mHC) get a linear axis labelled 1.0005, 1.001, ...; gains up to 12 (HC) a log
    axis labelled 1, 2, 5, 10: never '1.0015x10^0' or an offset."""
    plots.plot_gains({"mhc": gains_record(0.0015)}, tmp_path)
    fig = figures["gains"]
    for ax in fig.axes[:2]:
        assert ax.get_yscale() == "linear"
        assert_plain(ax)
        assert max(float(t.get_text()) for t in ax.get_yticklabels() if t.get_text()) < 1.01
    plots.plot_gains({"mhc": gains_record(0.0015), "hc": gains_record(11.0)}, tmp_path)
    for ax in figures["gains"].axes[:2]:
        assert ax.get_yscale() == "log"
        assert_plain(ax)
        assert {"1", "10"} <= {t.get_text() for t in ax.get_yticklabels()}


def test_gains_plot_draws_the_composite_distance_from_uniform(figures, tmp_path):
    """The third panel: ||prod H_res - J/n||_2 from sublayer l to the last, computed from the record's token-mean
    H_res when the record predates the metric. With every H = (1 - a) I + a J/n the composite from l is
    (1 - a)^(L - l) I + (1 - (1 - a)^(L - l)) J/n, whose distance from J/n is (1 - a)^(L - l)."""
    n, depth, a = 4, 7, 0.3
    h = (1 - a) * torch.eye(n, dtype=torch.float64) + a / n
    record = {"step": 5, "h_res_mean": h.expand(depth, n, n).tolist(),
              "gains": {k: [1.0] * depth for k in ("single_fwd", "single_bwd", "composite_fwd", "composite_bwd")}}
    plots.plot_gains({"mhc": record}, tmp_path)
    ax = figures["gains"].axes[2]
    (line,) = ax.lines
    want = [(1 - a) ** (depth - layer) for layer in range(depth)]
    assert list(line.get_xdata()) == list(range(depth))
    assert torch.allclose(torch.tensor(line.get_ydata(), dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          atol=1e-12)
    one_stream = {"step": 5, "h_res_mean": [[[1.0]]] * depth, "gains": record["gains"]}
    plots.plot_gains({"residual": one_stream}, tmp_path)
    assert not figures["gains"].axes[2].lines  # J/n is 1 for one stream: nothing to draw


def test_grad_norm_ticks_plain_and_every_step(figures, tmp_path):
    """Grad norms between 0.3 and 0.9 (no decade inside): a linear, plain axis; one point per record."""
    rng = random.Random(0)
    records = [{"step": s, "grad_norm": 0.3 + 0.6 * rng.random()} for s in range(1, 201)]
    plots.plot_grad_norm({"a": records}, tmp_path)
    (ax,) = figures["grad_norm"].axes
    assert ax.get_yscale() == "linear" and len(ax.lines[0].get_xdata()) == 200
    assert_plain(ax)
    records[50]["grad_norm"] = 40.0  # a spike: two decades, log scale, still plain labels
    plots.plot_grad_norm({"a": records}, tmp_path)
    (ax,) = figures["grad_norm"].axes
    assert ax.get_yscale() == "log"
    assert_plain(ax)


def _doubly_stochastic(n: int, rng: random.Random) -> list[list[float]]:
    m = [[rng.random() + (3 if i == j else 0) for j in range(n)] for i in range(n)]
    for _ in range(50):
        m = [[v / sum(row) for v in row] for row in m]
        cols = [sum(m[i][j] for i in range(n)) for j in range(n)]
        m = [[m[i][j] / cols[j] for j in range(n)] for i in range(n)]
    return m


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_heatmaps_scale_labels_and_titles(figures, tmp_path):
    """mHC's H_res (entries in [0, 1]) on a 0..1 scale, HC's (negative entries) symmetric about 0; every panel
    names its sublayer (block, attention or FFN), both axes are labelled, and no two titles or labels overlap."""
    rng = random.Random(1)
    depth, n = 8, 4
    mhc = {"step": 300, "h_res_mean": [_doubly_stochastic(n, rng) for _ in range(depth)]}
    hc = {"step": 300, "h_res_mean": [[[rng.uniform(-0.4, 1.3) for _ in range(n)] for _ in range(n)]
                                      for _ in range(depth)]}
    plots.plot_heatmaps({"runs/mhc": mhc, "runs/hc": hc}, tmp_path)
    fig = figures["h_res_heatmaps"]
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 8
    for ax in panels[:4]:
        assert ax.images[0].get_clim() == (0.0, 1.0)
    largest = max(abs(v) for layer in (0, 2, 5, 7) for row in hc["h_res_mean"][layer] for v in row)
    assert largest > 1
    for ax in panels[4:]:
        assert ax.images[0].get_clim() == (-largest, largest)
    titles = [ax.get_title() for ax in panels[:4]]
    assert titles == ["sublayer 0: block 0 attention", "sublayer 2: block 1 attention",
                      "sublayer 5: block 2 FFN", "sublayer 7: block 3 FFN"]
    for ax in panels:
        assert ax.get_xlabel() == "stream read (j)" and [t.get_text() for t in ax.get_xticklabels()] == list("0123")
    assert panels[0].get_ylabel().startswith("runs/mhc (step 300)") and "stream written (i)" in panels[4].get_ylabel()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for ax in panels for t in (ax.title, ax.xaxis.label, ax.yaxis.label)
             if t.get_text()] + [fig._suptitle.get_window_extent(renderer)]
    for i, a in enumerate(boxes):
        assert not any(_overlaps(a, b) for b in boxes[i + 1:])
    for ax in panels:  # the tick labels stay inside their own panel's neighbourhood: no label over a title
        for label in ax.get_xticklabels():
            assert not any(_overlaps(label.get_window_extent(renderer), b) for b in boxes)


def _fake_run(root, name, tokenizer="byte", data="corpus.txt", steps=60, log_every=10, bpb_per_loss=1.4427):
    run = root / name
    run.mkdir(parents=True)
    rng = random.Random(name)
    metrics = []
    for s in range(log_every, steps + 1, log_every):
        loss = 4 - s / 40 + 0.05 * rng.random()
        metrics.append({"step": s, "loss": loss, "bpb": loss * bpb_per_loss, "val_loss": loss + 0.1,
                        "val_bpb": (loss + 0.1) * bpb_per_loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    norms = [{"step": s, "grad_norm": 0.5 + rng.random()} for s in range(1, steps + 1)]
    (run / "grad_norms.jsonl").write_text("".join(json.dumps(m) + "\n" for m in norms))
    (run / "config.json").write_text(json.dumps({"data": data, "tokenizer": tokenizer}))
    return run, metrics, norms


def test_plot_runs_every_step_grad_norm_and_mixed_run_warning(figures, tmp_path):
    """`mhc plot`: the grad-norm plot has every step of grad_norms.jsonl (metrics.jsonl logs every 10th); runs
    of different tokenizers get a warning naming them and `--bpb`, which plots bits per byte without the
    warning; runs of different data are warned about either way; runs that agree get no warning."""
    a, metrics_a, norms_a = _fake_run(tmp_path, "a")
    b, _, _ = _fake_run(tmp_path, "b", tokenizer="bpe:4096", bpb_per_loss=0.4)
    c, _, _ = _fake_run(tmp_path, "c", data="other.txt")
    d, _, _ = _fake_run(tmp_path, "d")
    warnings = []
    plots.plot_runs([str(a), str(d)], tmp_path / "out", warn=warnings.append)
    assert warnings == []
    grad = figures["grad_norm"].axes[0]
    assert [list(line.get_ydata()) for line in grad.lines][0] == [r["grad_norm"] for r in norms_a]
    plots.plot_runs([str(a), str(b)], tmp_path / "out", warn=warnings.append)
    assert len(warnings) == 1 and "different tokenizers (byte: a; bpe:4096: b)" in warnings[0]
    assert "--bpb" in warnings[0] and "--bpb" in figures["loss"]._suptitle.get_text()
    plots.plot_runs([str(a), str(b)], tmp_path / "out", bpb=True, warn=warnings.append)
    assert len(warnings) == 1  # bits per byte are comparable across tokenizers
    train_ax = figures["loss"].axes[0]
    assert train_ax.get_ylabel() == "bits per byte"
    assert list(train_ax.lines[0].get_ydata()) == [m["bpb"] for m in metrics_a]
    plots.plot_runs([str(a), str(c)], tmp_path / "out", bpb=True, warn=warnings.append)
    assert len(warnings) == 2 and "different data (corpus.txt: a; other.txt: c)" in warnings[1]
    for fig in figures.values():
        for ax in fig.axes:
            if ax.lines and not ax.images:
                assert_plain(ax)


def test_compare_grad_norm_legend_gives_the_table_worst_spike(figures, tmp_path):
    """The compare grad-norm plot draws the first seed's curve; its legend gives that seed's spike and the worst
    over the seeds, the figure (and the rule: max) of the report's stability table."""
    from torch_mhc.reports.compare import STABILITY_COLUMNS

    assert {key: pick for key, _, pick in STABILITY_COLUMNS}["grad_spike"] is max
    rows = []
    for arm, spikes in (("mhc", [2.0, 7.5, 3.0]), ("residual", [1.5, 1.2, 1.9])):
        for seed, spike in enumerate(spikes):
            name = f"{arm}-s{seed}"
            _fake_run(tmp_path, name)
            rows.append({"arm": arm, "lr": 0.003, "seed": seed, "status": "finished", "name": name, "n": 4,
                         "grad_spike": spike})
    protocol = {"arms": {arm: {"selected_lr": 0.003} for arm in ("mhc", "residual")}, "seeds": [0, 1, 2],
                "baseline": "residual"}
    protocol_plots.plot_grad_norm_steps(protocol, rows, tmp_path, tmp_path)
    legend = [t.get_text() for t in figures["grad_norm"].axes[0].get_legend().get_texts()]
    assert legend == ["mhc seed 0: spike 2.0x (worst of 3 seeds: 7.5x)",
                      "residual seed 0: spike 1.5x (worst of 3 seeds: 1.9x)"]


def test_lr_sweep_ticks_are_the_grid(figures, tmp_path):
    """The lr axis is labelled with the grid's lrs as written (0.001, 0.003), not 10^-3 or 3x10^-3."""
    by_lr = {f"{lr:g}": {"mean": 3.0 + lr, "sd": 0.01, "diverged": False} for lr in (1e-3, 3e-3)}
    protocol = {"arms": {"mhc": {"selected_lr": 1e-3, "val_loss_by_lr": by_lr}}, "seeds": [0, 1]}
    protocol_plots.plot_lr_sweep(protocol, tmp_path)
    ax = figures["lr_sweep"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.003"]
    assert len(ax.xaxis.get_minorticklocs()) == 0
    assert_plain(ax)


def test_mhc_plot_on_real_runs(tmp_path, small_text, capsys):
    """`mhc plot` on two trained runs: every step's grad norm is plotted; `--bpb` works on them; a run without
    bits per byte in its log is refused with --bpb (exit 2)."""
    sets = [*TINY, "steps=8", "log_every=4", f"data={small_text}", f"out_dir={tmp_path / 'runs'}"]
    for name, conn in (("hc", "hc"), ("mhc", "mhc")):
        args = [a for s in [*sets, f"run_name={name}", f"model.connection={conn}"] for a in ("--set", s)]
        assert main(["train", *args]) == 0
    runs = tmp_path / "runs"
    assert main(["plot", str(runs / "hc"), str(runs / "mhc"), "--out", str(tmp_path / "p"), "--bpb"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err and (tmp_path / "p" / "h_res_heatmaps.png").stat().st_size > 5000
    assert len(plots.grad_norm_records(runs / "mhc")) == 8
    metrics = runs / "mhc" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if "bpb" not in k}) + "\n"
                               for line in metrics.read_text().splitlines()))
    assert main(["plot", str(runs / "mhc"), "--out", str(tmp_path / "q"), "--bpb"]) == 2
    assert "logged no bits per byte" in capsys.readouterr().err


def test_arm_colors_are_distinct_for_twenty_arms_and_keep_tab10_for_ten():
    colors = [plots.arm_color(i) for i in range(20)]
    assert len(set(colors)) == 20
    assert colors[:10] == [plots.plt.get_cmap("tab10")(i) for i in range(10)]
