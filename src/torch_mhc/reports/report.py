"""`mhc diagnose`: gains, coefficient statistics and stream health of one run's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from torch_mhc.diagnostics.collect import collect_diagnostics, diagnostic_batch
from torch_mhc.reports.plots import plot_gains, plot_heatmaps


def diagnose_run(run_dir: str, out: str | None = None) -> str:
    from torch_mhc.train.data import run_tokenizer
    from torch_mhc.train.evaluate import load_run
    from torch_mhc.train.trainer import load_data

    model, cfg, state = load_run(run_dir)
    tokenizer = run_tokenizer(run_dir, cfg, state)  # the run's own, never a rebuilt one
    data, _ = load_data(cfg, Path(run_dir).parent / "cache", log=lambda *_: None, tokenizer=tokenizer)
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
             f"{'H_post mean':>11} {'row err':>9} {'col err':>9} {'|H-I|':>7} {'comp-J/n':>8}"]
    for i, s in enumerate(diag["layers"]):
        lines.append(f"{i:>5} {g['single_fwd'][i]:>10.4f} {g['single_bwd'][i]:>10.4f} {g['composite_fwd'][i]:>10.4f} "
                     f"{g['composite_bwd'][i]:>10.4f} {s['pre_mean']:>10.4f} {s['post_mean']:>11.4f} "
                     f"{s['res_row_err']:>9.2e} {s['res_col_err']:>9.2e} {s['res_dist_identity']:>7.3f} "
                     f"{g['composite_from_uniform'][i]:>8.4f}")
    lines.append(f"plots and diagnostics.json in {out_dir}")
    return "\n".join(lines)
