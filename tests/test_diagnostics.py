import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from torch_mhc.cli import main
from torch_mhc.diagnostics import amax_gains, backward_gain, coefficient_stats, composites, forward_gain
from torch_mhc.diagnostics.collect import collect_diagnostics
from torch_mhc.models import DecoderLM, ModelConfig


def test_gains_on_handmade_matrices():
    eye = torch.eye(4)
    perm = eye[[2, 0, 3, 1]]
    assert forward_gain(eye) == backward_gain(eye) == 1
    assert forward_gain(perm) == backward_gain(perm) == 1
    m = torch.tensor([[1.0, -2.0], [0.5, 0.25]])  # |rows| 3, 0.75; |columns| 1.5, 2.25
    assert forward_gain(m).item() == 3.0 and backward_gain(m).item() == 2.25
    uniform = torch.full((4, 4), 0.25)
    assert forward_gain(uniform) == pytest.approx(1.0) and backward_gain(uniform) == pytest.approx(1.0)


def test_composite_order_is_explicit_product():
    torch.manual_seed(0)
    h = torch.randn(5, 3, 3)
    comp = composites(h)
    for layer in range(5):
        expected = torch.eye(3, dtype=torch.float64)
        for i in range(layer, 5):  # x_{i+1} = H_i x_i: later layers multiply on the left
            expected = h[i].double() @ expected
        torch.testing.assert_close(comp[layer], expected)
    g = amax_gains(h)
    assert g["composite_fwd"][4] == pytest.approx(forward_gain(h[4].double()).item())
    assert g["composite_bwd"][0] == pytest.approx(backward_gain(comp[0]).item())


def test_stats():
    n = 3
    h_res = torch.eye(n).expand(10, n, n)
    s = coefficient_stats(torch.full((10, n), 0.5), torch.ones(10, n), h_res)
    assert s["res_dist_identity"] == 0 and s["res_row_err"] == 0 and s["pre_mean"] == 0.5
    assert s["res_dist_uniform"] == pytest.approx(torch.linalg.matrix_norm(torch.eye(n) - 1 / n).item())


@pytest.mark.parametrize("connection", ["residual", "hc", "mhc"])
def test_collect_from_model(connection):
    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connection=connection))
    d = collect_diagnostics(model, torch.randint(0, 256, (2, 8)), step=0)
    assert len(d["layers"]) == 4 and len(d["gains"]["composite_fwd"]) == 4
    if connection == "residual":
        assert d["summary"]["max_composite_fwd_gain"] == 1.0
    if connection == "mhc":  # uniform H_res at init: every gain is 1 (up to the Sinkhorn eps)
        assert d["summary"]["max_composite_bwd_gain"] == pytest.approx(1.0, abs=1e-4)
    assert all(not c.record for c in model.connections())


def test_compare_end_to_end(tmp_path, small_text, capsys):
    out = tmp_path / "report"
    sets = [*TINY, f"data={small_text}", "model.n_layers=2"]
    args = ["compare", "--modes", "residual,hc,mhc", "--variant", "iters5:model.sinkhorn_iters=5",
            "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    text = (out / "report.md").read_text()
    for name in ("residual", "hc", "mhc", "iters5"):
        assert f"| {name} |" in text
    for png in ("loss.png", "loss_gap.png", "grad_norm.png", "gains.png", "h_res_heatmaps.png"):
        assert (out / png).stat().st_size > 5000, png
        assert f"({png})" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["residual"]["max_composite_fwd_gain"] == 1.0
    assert summary["mhc"]["n"] == 4
    # mhc plot on any runs; mhc diagnose on a checkpoint
    assert main(["plot", str(out / "runs" / "hc"), str(out / "runs" / "mhc"), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "gains.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["diagnose", str(out / "runs" / "mhc")]) == 0
    assert "comp fwd" in capsys.readouterr().out
    assert (out / "runs" / "mhc" / "diagnose" / "gains.png").is_file()
    # an existing report directory is not overwritten
    assert main(args) == 2


def test_compare_with_seeds(tmp_path):
    from torch_mhc.reports.report import compare

    sets = [*TINY, "steps=3", "eval_every=3", "diag_every=3", f"data={Path(__file__)}"]
    report = compare(None, ["residual", "mhc"], sets, str(tmp_path / "r"), seeds=[1, 2], log=lambda *_: None)
    text = report.read_text()
    for run in ("residual-seed1", "residual-seed2", "mhc-seed1", "mhc-seed2"):
        assert f"| {run} |" in text
    assert "Over 2 seeds" in text and "| mhc | " in text
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["mhc-seed1"]["val_loss"] != summary["mhc-seed2"]["val_loss"]


def test_variant_parsing():
    from torch_mhc.reports.report import _parse_variants

    runs = _parse_variants(["mhc"], ["pre-res:model.learn=pre,res,model.sinkhorn_iters=5", "n2:model.n_streams=2"])
    assert runs == [("mhc", ["model.connection=mhc"]),
                    ("pre-res", ["model.learn=pre,res", "model.sinkhorn_iters=5"]),
                    ("n2", ["model.n_streams=2"])]


def test_compare_and_plot_bad_inputs(tmp_path, capsys):
    assert main(["compare", "--modes", "residual,dense", "--out", str(tmp_path / "r")]) == 2
    assert "unknown mode 'dense'" in capsys.readouterr().err
    assert main(["compare", "--modes", "mhc", "--variant", "nocolon", "--out", str(tmp_path / "r")]) == 2
    (tmp_path / "empty_run").mkdir()
    assert main(["plot", str(tmp_path / "empty_run")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
