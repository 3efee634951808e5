"""`mhc compare` (train several modes on the same data and budget, write report.md and plots) and
`mhc diagnose` (gains and statistics of one run's checkpoint)."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from torch_mhc.diagnostics.collect import collect_diagnostics, diagnostic_batch
from torch_mhc.models.decoder import CONNECTIONS
from torch_mhc.reports.plots import plot_gains, plot_heatmaps, plot_runs, read_jsonl
from torch_mhc.train.config import UserError, build_config


def _parse_variants(modes: list[str], variants: list[str]) -> list[tuple[str, list[str]]]:
    """(name, overrides) for every run: each mode, then each NAME:KEY=VALUE[,KEY=VALUE] variant."""
    runs = []
    for mode in (m.strip() for m in modes if m.strip()):
        if mode not in CONNECTIONS:
            raise UserError(f"unknown mode {mode!r}; modes are {', '.join(CONNECTIONS)}.")
        runs.append((mode, [f"model.connection={mode}"]))
    for spec in variants:
        name, sep, sets = spec.partition(":")
        if not sep or not name or not sets:
            raise UserError(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}.")
        overrides: list[str] = []
        for piece in sets.split(","):  # a piece without "=" continues a list value: model.learn=pre,res
            if "=" in piece or not overrides:
                overrides.append(piece)
            else:
                overrides[-1] += "," + piece
        runs.append((name, [o for o in overrides if o]))
    if not runs:
        raise UserError("nothing to compare: give --modes and/or --variant.")
    if len({n for n, _ in runs}) != len(runs):
        raise UserError("run names in a comparison must be unique.")
    return runs


def summarise(run_dir: Path) -> dict:
    recs = read_jsonl(run_dir / "metrics.jsonl")
    last = recs[-1]
    vals = [r for r in recs if "val_loss" in r]
    norms = [r["grad_norm"] for r in recs]
    comp_f = [r["max_composite_fwd_gain"] for r in recs if "max_composite_fwd_gain" in r]
    comp_b = [r["max_composite_bwd_gain"] for r in recs if "max_composite_bwd_gain" in r]
    cfg = json.loads((run_dir / "config.json").read_text())
    return {
        "train_loss": last["loss"], "val_loss": vals[-1]["val_loss"] if vals else None,
        "val_bpb": vals[-1].get("val_bpb") if vals else None,
        "max_composite_fwd_gain": max(comp_f) if comp_f else None,
        "max_composite_bwd_gain": max(comp_b) if comp_b else None,
        "grad_spike": max(norms) / statistics.median(norms) if norms else None,
        "max_grad_norm": max(norms) if norms else None,
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in recs[1:] or recs),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in recs),
        "params": last.get("params"), "n": cfg["model"]["n_streams"] if cfg["model"]["connection"] != "residual" else 1,
    }


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _mean_std(values: list[float], spec: str = ".4f") -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), spec)} +- {sd:.4f}"


def write_report(report_dir: Path, names: list[str], command: str, wall: dict[str, float],
                 groups: dict[str, list[str]] | None = None) -> Path:
    """report.md, summary.json and the plots. ``groups`` maps a name to its runs over several seeds
    (``NAME-seedS``): they also get a mean +- standard deviation table. Gaps to the residual are
    taken against the residual run of the same seed."""
    groups = groups or {}
    runs_dir = report_dir / "runs"
    rows = {name: summarise(runs_dir / name) for name in names}

    def gap(name: str) -> float | None:
        seed = name[name.rfind("-seed"):] if "-seed" in name else ""
        base = rows.get("residual" + seed)
        if base is None or base["val_loss"] is None or rows[name]["val_loss"] is None:
            return None
        return rows[name]["val_loss"] - base["val_loss"]

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        "# mhc compare", "",
        f"- command: `{command}`",
        f"- date: {datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}",
        f"- wall time: {sum(wall.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()) + ")",
        "",
        "| run | n | params | train loss | val loss | val bpb | val gap to residual | max composite fwd gain "
        "| max composite bwd gain | grad-norm spike (max/median) | tokens/s | peak mem (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['n']} | {_fmt(r['params'], ',')} | {_fmt(r['train_loss'])} | {_fmt(r['val_loss'])} | "
            f"{_fmt(r['val_bpb'])} | {_fmt(gap(name), '+.4f')} | {_fmt(r['max_composite_fwd_gain'], '.3g')} | "
            f"{_fmt(r['max_composite_bwd_gain'], '.3g')} | {_fmt(r['grad_spike'], '.2f')} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_mem_mb'], ',.0f')} |"
        )
    if groups:
        lines += ["", f"Over {len(next(iter(groups.values())))} seeds (mean +- standard deviation):", "",
                  "| run | val loss | val bpb | val gap to residual | max composite fwd gain |",
                  "|---|---|---|---|---|"]
        for name, members in groups.items():
            gains = [g for m in members if (g := rows[m]["max_composite_fwd_gain"]) is not None]
            lines.append(
                f"| {name} | {_mean_std([rows[m]['val_loss'] for m in members])} | "
                f"{_mean_std([rows[m]['val_bpb'] for m in members if rows[m]['val_bpb'] is not None])} | "
                f"{_mean_std([g for m in members if (g := gap(m)) is not None], '+.4f')} | "
                f"{_fmt(max(gains, default=None), '.3g')} |"
            )
    plot_names = [members[0] for members in groups.values()] if groups else names
    plots = plot_runs([str(runs_dir / n) for n in plot_names], report_dir,
                      baseline=next((n for n in plot_names if n.startswith("residual")), plot_names[0]))
    lines += ["", "Gains are the maxima over the run's diagnostic steps of the composite `prod H_res` from any layer "
              "to the last (H_res averaged over the tokens of a fixed validation batch). Peak memory on the CPU is "
              "the process's maximum resident set, shared by the runs of one process, so it only grows."
              + (" Plots show the first seed." if groups else ""), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    (report_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return report_dir / "report.md"


def compare(config: str | None, modes: list[str], overrides: list[str], out: str = "", variants: list[str] = (),
            seeds: list[int] = (), log=print) -> Path:
    from torch_mhc.train.trainer import train

    runs = _parse_variants(modes, list(variants))
    base_cfg = build_config(config_file=config, overrides=overrides)  # validates before anything is written
    report_dir = Path(out) if out else Path(base_cfg.out_dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    if report_dir.exists() and any(report_dir.iterdir()):
        raise UserError(f"report directory {report_dir} exists and is not empty; nothing was overwritten. "
                        "Choose another --out.")
    cfgs = {}
    seeds = list(seeds)
    for seed in seeds or [None]:
        for name, sets in runs:
            run_name = name if seed is None or len(seeds) == 1 else f"{name}-seed{seed}"
            seed_set = [] if seed is None else [f"seed={seed}"]
            cfgs[run_name] = build_config(config_file=config, overrides=[
                *overrides, *sets, *seed_set, f"out_dir={report_dir / 'runs'}", f"run_name={run_name}"])
    wall = {}
    for name, cfg in cfgs.items():
        run_dir = report_dir / "runs" / name
        run_dir.mkdir(parents=True)
        log(f"== {name}: {cfg.model.connection}, n={cfg.model.streams}")
        t0 = time.perf_counter()
        train(cfg, run_dir, log=log)
        wall[name] = time.perf_counter() - t0
    command = "mhc " + " ".join(sys.argv[1:]) if sys.argv and "mhc" in Path(sys.argv[0]).name else "compare(...)"
    groups = {name: [f"{name}-seed{sd}" for sd in seeds] for name, _ in runs} if len(seeds) > 1 else {}
    return write_report(report_dir, list(cfgs), command, wall, groups)


def diagnose_run(run_dir: str, out: str | None = None) -> str:
    from torch_mhc.train.evaluate import load_run
    from torch_mhc.train.trainer import load_data

    model, cfg, state = load_run(run_dir)
    data, _ = load_data(cfg, Path(run_dir).parent / "cache", log=lambda *_: None)
    idx = diagnostic_batch(data, cfg.batch_size).to(next(model.parameters()).device)
    diag = collect_diagnostics(model, idx, step=state["step"])
    out_dir = Path(out) if out else Path(run_dir) / "diagnose"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diagnostics.json").write_text(json.dumps(diag))
    label = Path(run_dir).name
    plot_gains({label: diag}, out_dir)
    plot_heatmaps({label: diag}, out_dir)
    g = diag["gains"]
    lines = [f"{label} at step {state['step']}: {cfg.model.connection}, n={cfg.model.streams}",
             f"{'layer':>5} {'single fwd':>10} {'single bwd':>10} {'comp fwd':>10} {'comp bwd':>10} {'H_pre mean':>10} "
             f"{'H_post mean':>11} {'row err':>9} {'col err':>9} {'|H-I|':>7}"]
    for i, s in enumerate(diag["layers"]):
        lines.append(f"{i:>5} {g['single_fwd'][i]:>10.4f} {g['single_bwd'][i]:>10.4f} {g['composite_fwd'][i]:>10.4f} "
                     f"{g['composite_bwd'][i]:>10.4f} {s['pre_mean']:>10.4f} {s['post_mean']:>11.4f} "
                     f"{s['res_row_err']:>9.2e} {s['res_col_err']:>9.2e} {s['res_dist_identity']:>7.3f}")
    lines.append(f"plots and diagnostics.json in {out_dir}")
    return "\n".join(lines)
