"""`mhc compare`: the protocol's statistics on hand-made numbers, then the whole protocol on tiny
settings (lr grid with an edge extension, seeds, test split, diverged arm, resume, summary.json)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_mhc.cli import main
from torch_mhc.reports import stats
from torch_mhc.reports.compare import (
    BASELINE,
    DIAGNOSTICS_SUMMARY,
    MATCHED_MODES,
    MODES,
    Plan,
    build_protocol,
    compare,
    connection_flops_per_token,
    forward_flops_per_token,
    initial_diagnostics,
    matched_width,
    parse_arms,
    resolve_matched,
    summarize,
)
from torch_mhc.train.checkpoint import list_checkpoints
from torch_mhc.train.config import DivergedError, UserError, build_config
from torch_mhc.train.data import TokenData, split_off_test

# a tiny model on tiny shakespeare: about a second per run
TINY_PROTOCOL = [
    "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "seq_len=16", "batch_size=4",
    "steps=6", "warmup=2", "log_every=2", "eval_every=3", "eval_batches=2", "ckpt_every=3", "diag_every=3",
    "val_fraction=0.05", "test_fraction=0.05",
]


# ---- statistics on hand-made numbers -------------------------------------------------------------

def test_mean_sd():
    assert stats.mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0}
    assert stats.mean_sd([4.0]) == {"mean": 4.0, "sd": None}
    assert stats.mean_sd([]) == {"mean": None, "sd": None}


def test_paired_gap_pairs_by_seed():
    arm = {1: 3.0, 2: 3.5, 3: 2.9, 4: float("nan")}
    base = {1: 3.1, 2: 3.4, 3: 3.2, 4: 3.0, 5: 3.3}
    g = stats.paired_gap(arm, base)
    expected = [3.0 - 3.1, 3.5 - 3.4, 2.9 - 3.2]  # seed 4 diverged, seed 5 has no arm run
    assert g["seeds"] == 3 and list(g["per_seed"]) == ["1", "2", "3"]
    assert g["per_seed"]["2"] == pytest.approx(0.1)
    mean = sum(expected) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in expected) / 2)
    assert g["mean"] == pytest.approx(mean) and g["sd"] == pytest.approx(sd)
    half = 4.302653 * sd / math.sqrt(3)  # t_{0.975, 2} from the tables
    assert g["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-6)
    assert not g["resolved"] and g["p_value"] > 0.05  # -0.1 +- 0.2: not resolved
    tight = stats.paired_gap({1: 3.0, 2: 3.01, 3: 3.02}, {1: 3.1, 2: 3.1, 3: 3.11})
    assert tight["mean"] == pytest.approx(-0.0933333) and tight["resolved"] and tight["ci95"][1] < 0
    assert tight["p_value"] < 0.05 and tight["min_resolvable"] > 0


def test_select_lr_and_grid_edges():
    assert stats.select_lr({1e-3: [3.0, 3.2], 3e-3: [2.9, 3.0], 1e-2: [2.8, None]}) == 3e-3  # 1e-2: one diverged
    assert stats.select_lr({1e-3: [3.0, float("inf")]}) is None
    assert stats.select_lr({1e-3: [3.0], 3e-3: [3.0]}) == 1e-3  # a tie goes to the smaller lr
    grid = [1e-3, 3e-3, 1e-2]
    assert stats.at_edge(1e-3, grid) and stats.at_edge(1e-2, grid) and not stats.at_edge(3e-3, grid)
    assert not stats.at_edge(1e-3, [1e-3]) and not stats.at_edge(None, grid)
    assert stats.extension(1e-2, grid) == pytest.approx(0.0333)
    assert stats.extension(1e-3, grid) == pytest.approx(3.33e-4)
    assert stats.extension(3e-3, grid) is None
    assert stats.extension(2e-3, [1e-3, 2e-3]) == 4e-3
    assert stats.lr_key(3e-3) == "0.003" and stats.lr_key(3.33e-4) == "0.000333"


def test_grad_spike():
    assert stats.grad_spike([1.0, 2.0, 3.0, 30.0]) == pytest.approx(12.0)
    assert stats.grad_spike([]) is None


def _row(arm, lr, seed, val, test, status="finished"):
    return {"name": f"{arm}-lr{stats.lr_key(lr)}-seed{seed}", "arm": arm, "lr": lr, "seed": seed,
            "status": status, "val_loss": val, "test_loss": test}


def test_protocol_on_handmade_rows():
    plan = Plan({"test_fraction": 0.1, "val_fraction": 0.1, "batch_size": 4, "seq_len": 16, "eval_batches": 2},
                [("residual", []), ("mhc", [])], [1e-3, 3e-3], [1, 2, 3], "mhc compare ...")
    val = {("residual", 1e-3): [3.0, 3.1, 3.05], ("residual", 3e-3): [3.2, 3.3, 3.25],
           ("mhc", 1e-3): [3.1, 3.2, 3.15], ("mhc", 3e-3): [2.9, 3.0, 2.95], ("mhc", 9e-3): [2.8, None, 2.7]}
    test = {("residual", 1e-3): [3.0, 3.1, 3.2], ("residual", 3e-3): [3.3, 3.3, 3.3],
            ("mhc", 1e-3): [3.05, 3.2, 3.2], ("mhc", 3e-3): [2.9, 3.05, 3.1], ("mhc", 9e-3): [2.8, None, 2.7]}
    rows = [_row(arm, lr, s + 1, v[s], test[arm, lr][s], "finished" if v[s] is not None else "diverged")
            for (arm, lr), v in val.items() for s in range(3)]
    p = build_protocol(plan, rows, {"residual": 100, "mhc": 123})
    assert p["lrs"] == [1e-3, 3e-3] and p["seeds"] == [1, 2, 3] and p["common_lr"] == 1e-3
    res, mhc = p["arms"]["residual"], p["arms"]["mhc"]
    assert res["selected_lr"] == 1e-3 and res["at_grid_edge"] and res["gap_to_residual"] is None
    # mhc's extension at 9e-3 has a diverged seed, so 3e-3 (now inside the grid it ran) is selected
    assert mhc["selected_lr"] == 3e-3 and not mhc["at_grid_edge"] and mhc["extended_to"] == [9e-3]
    assert mhc["val_loss_by_lr"]["0.009"]["diverged"] == ["mhc-lr0.009-seed2"]
    assert mhc["val_loss_by_lr"]["0.003"]["runs"] == ["mhc-lr0.003-seed1", "mhc-lr0.003-seed2", "mhc-lr0.003-seed3"]
    assert mhc["val_loss_by_lr"]["0.003"]["mean"] == pytest.approx(2.95)
    assert mhc["test_loss"]["mean"] == pytest.approx((2.9 + 3.05 + 3.1) / 3) and mhc["params"] == 123
    gap = mhc["gap_to_residual"]  # mhc at 3e-3 against residual at 1e-3, seed by seed
    assert gap["per_seed"] == pytest.approx({"1": -0.1, "2": -0.05, "3": -0.1})
    assert gap["mean"] == pytest.approx(-0.0833333) and gap["resolved"]  # t = -5, df 2: p = 0.038
    assert gap["p_value"] == pytest.approx(0.0377, abs=1e-4) and gap["ci95"][1] < 0
    common = mhc["gap_to_residual_at_common_lr"]
    assert common["lr"] == 1e-3 and common["per_seed"] == pytest.approx({"1": 0.05, "2": 0.1, "3": 0.0})
    assert not common["resolved"]
    pair = p["pairwise"]["mhc - residual"]  # every pair of arms, each at its selected lr
    assert pair["per_seed"] == pytest.approx(gap["per_seed"]) and pair["p_value"] == pytest.approx(gap["p_value"])
    assert p["resolved_rule"] == stats.RESOLVED_RULE


def test_parse_arms():
    arms = parse_arms(["mhc", "mhc-gate", "mhc-identity", "hc-identity"],
                      ["pre-res:model.learn=pre,res,model.sinkhorn_iters=5"])
    assert arms == [("mhc", ["model.connection=mhc"]),
                    ("mhc-gate", ["model.connection=mhc", "model.n_streams=1"]),
                    ("mhc-identity", ["model.connection=mhc", "model.learn=pre,post"]),
                    ("hc-identity", ["model.connection=hc", "model.learn=pre,post"]),
                    ("pre-res", ["model.learn=pre,res", "model.sinkhorn_iters=5"])]
    for bad in (["dense"], ["mhc", "mhc"]):
        with pytest.raises(UserError):
            parse_arms(bad, [])
    cfg = build_config(overrides=parse_arms(["hc-identity"], [])[0][1])
    assert cfg.model.learn == ["pre", "post"] and cfg.model.connection == "hc"
    # the matched residual controls get their width from the base config (resolve_matched)
    assert parse_arms(["residual-params", "residual-flops"], []) == [
        ("residual-params", ["model.connection=residual"]), ("residual-flops", ["model.connection=residual"])]


def test_matched_residual_controls_on_the_stress_config():
    """residual-params: the FFN width whose parameter count is nearest mHC's (no other integer width is nearer);
    residual-flops: the same for forward FLOPs per token; both recorded as explicit overrides in the plan."""
    from torch_mhc.models.decoder import DecoderLM

    base = build_config(config_file=str(Path(__file__).parents[1] / "configs" / "stress-deep.toml"))
    width, info = matched_width(base, "params")
    goal = DecoderLM(build_config(base=base.to_dict(), overrides=["model.connection=mhc"]).model).num_params()

    def params(h):
        return DecoderLM(build_config(base=base.to_dict(), overrides=[
            "model.connection=residual", f"model.mlp_hidden={h}"]).model).num_params()

    assert info["mhc"] == goal and info["residual"] == params(width)
    assert abs(params(width) - goal) <= min(abs(params(width - 1) - goal), abs(params(width + 1) - goal))
    assert abs(info["relative_difference"]) < 0.002
    fwidth, finfo = matched_width(base, "flops")
    assert fwidth > width and abs(finfo["relative_difference"]) < 0.002  # mHC's stream arithmetic costs more
    arms = resolve_matched(parse_arms(["residual", "residual-params", "residual-flops"], []), base)
    assert arms == [("residual", ["model.connection=residual"]),
                    ("residual-params", ["model.connection=residual", f"model.mlp_hidden={width}"]),
                    ("residual-flops", ["model.connection=residual", f"model.mlp_hidden={fwidth}"])]


def test_matched_controls_follow_the_comparisons_mhc_arm():
    """residual-params is sized for the mHC arm the comparison runs (here the circulant map, far fewer res
    parameters than Sinkhorn's n^2 columns), not for the base config's Sinkhorn mHC; the gate control is not it."""
    from torch_mhc.models.decoder import DecoderLM

    base = build_config(overrides=["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
                                   "seq_len=16"])
    arms = resolve_matched(parse_arms(["residual-params", "mhc-gate", "mhc-circulant"], []), base)
    width = int(arms[0][1][1].split("=")[1])

    def params(*sets):
        return DecoderLM(build_config(base=base.to_dict(), overrides=list(sets)).model).num_params()

    goal = params("model.connection=mhc", "model.h_res=circulant")
    assert goal < params("model.connection=mhc")
    got = [abs(params("model.connection=residual", f"model.mlp_hidden={h}") - goal)
           for h in (width - 1, width, width + 1)]
    assert got[1] == min(got)
    assert connection_flops_per_token(build_config(base=base.to_dict(), overrides=["model.h_res=circulant"]).model) < \
        connection_flops_per_token(base.model)  # no Sinkhorn rounds counted for a map without them


def test_forward_flops_count_the_projection_once_and_the_streams_by_formula():
    """mHC minus residual (same FFN width): the x phi matmul, 2 nC (2n + n^2) per sublayer, counted by torch's FLOP
    counter, plus the stream arithmetic of the formula; nothing counted twice (the mixing is not a matmul here)."""
    cfgs = {c: build_config(overrides=[f"model.connection={c}", "model.dim=32", "model.n_layers=3", "model.n_heads=2",
                                      "model.max_seq_len=16", "seq_len=16"]).model for c in ("mhc", "residual")}
    n, c, sublayers = 4, 32, 6
    diff = forward_flops_per_token(cfgs["mhc"], 16) - forward_flops_per_token(cfgs["residual"], 16)
    projection = sublayers * 2 * n * c * (2 * n + n * n)
    streams = connection_flops_per_token(cfgs["mhc"]) - connection_flops_per_token(cfgs["residual"])
    assert diff == projection + streams
    assert connection_flops_per_token(cfgs["mhc"]) == sublayers * (7 * n * c + 2 * n * n * c + 4 * 20 * n * n)


def test_test_split_is_held_out():
    tokens = np.arange(1000)
    rest, test = split_off_test(tokens, 0.1)
    data = TokenData.from_tokens(rest, 8, 0.1)
    assert test.tolist() == list(range(900, 1000))
    assert data.train.size + data.val.size == 900 and data.val[-1] == 899 and data.train[-1] < data.val[0]
    assert split_off_test(tokens, 0.0)[1].size == 0
    with pytest.raises(UserError, match="test_fraction"):
        build_config(overrides=["val_fraction=0.5", "test_fraction=0.5"])


def test_training_reads_no_test_token(tmp_path, shakespeare):
    from torch_mhc.train.trainer import load_data

    cfg = build_config(overrides=[f"data={shakespeare}", "val_fraction=0.1", "test_fraction=0.1"])
    data, _ = load_data(cfg, tmp_path / "cache", log=lambda *_: None)
    whole, _ = load_data(build_config(overrides=[f"data={shakespeare}"]), tmp_path / "cache", log=lambda *_: None)
    total = whole.train.size + whole.val.size
    n_test = int(total * 0.1)
    assert data.train.size + data.val.size == total - n_test
    tokens = np.concatenate([whole.train, whole.val])
    assert np.array_equal(data.val[-50:], tokens[total - n_test - 50: total - n_test])  # test follows validation


# ---- the protocol end to end, tiny ---------------------------------------------------------------

def _sets(data, *extra):
    return [*TINY_PROTOCOL, f"data={data}", *extra]


def test_protocol_end_to_end_with_edge_extension_and_resume(tmp_path, shakespeare):
    out = tmp_path / "cmp"
    quiet = lambda *_: None  # noqa: E731
    # after 6 steps the larger lr is better: the best lr is the grid's upper edge, so each arm runs 1e-2 too
    compare(None, ["residual", "mhc"], _sets(shakespeare), str(out), seeds=[1, 2], lrs=[1e-4, 1e-3], log=quiet)
    summary = json.loads((out / "summary.json").read_text())
    p = summary["protocol"]
    assert p["lrs"] == [1e-4, 1e-3] and p["seeds"] == [1, 2] and p["baseline"] == BASELINE
    names = {r["name"] for r in summary["runs"]}
    for arm in ("residual", "mhc"):
        a = p["arms"][arm]
        assert a["extended_to"] == [0.01] and a["lrs_run"] == [1e-4, 1e-3, 0.01]
        assert {f"{arm}-lr{lr}-seed{s}" for lr in ("0.0001", "0.001", "0.01") for s in (1, 2)} <= names
        assert a["selected_lr"] in a["lrs_run"] and isinstance(a["at_grid_edge"], bool)
        assert set(a["val_loss_by_lr"]) == {"0.0001", "0.001", "0.01"}
        for cell in a["val_loss_by_lr"].values():
            assert set(cell) >= {"mean", "sd", "runs"} and len(cell["runs"]) == 2
        assert set(a["test_loss"]) == {"mean", "sd"}
    gap = p["arms"]["mhc"]["gap_to_residual"]
    assert set(gap) >= {"mean", "sd", "per_seed", "resolved"} and set(gap["per_seed"]) == {"1", "2"}
    by_name = {r["name"]: r for r in summary["runs"]}
    assert len(by_name) == 12
    for r in summary["runs"]:
        assert r["status"] == "finished" and r["test_loss"] > 0 and r["val_loss"] > 0
        assert r["lr"] in (1e-4, 1e-3, 0.01) and r["seed"] in (1, 2)
        assert r["grad_spike_over"] == "every step" and r["grad_spike"] >= 1
    assert p["arms"]["mhc"]["params"] > p["arms"]["residual"]["params"]
    mhc_gap = by_name["mhc-lr0.001-seed1"]["test_loss"] - by_name["residual-lr0.001-seed1"]["test_loss"]
    assert p["arms"]["mhc"]["gap_to_residual_at_common_lr"]["per_seed"]["1"] == pytest.approx(mhc_gap) or \
        p["common_lr"] != 1e-3
    diag = [json.loads(x) for x in (out / "runs" / "mhc-lr0.001-seed1" / "diagnostics.jsonl").read_text().splitlines()]
    assert len(diag[-1]["layers"][0]["alpha"]) == 3
    text = (out / "report.md").read_text()
    assert "## Validation loss by learning rate" in text and "+" in text and "%)" in text  # params vs residual
    for png in ("lr_sweep.png", "loss_bands.png", "connection_health.png", "grad_norm.png", "gains.png",
                "h_res_heatmaps.png"):
        assert (out / png).stat().st_size > 5000 and f"({png})" in text

    # an interrupted comparison: one run never checkpointed, one stopped after its first checkpoint,
    # one finished training but lost its test evaluation
    runs = out / "runs"
    kept = runs / "residual-lr0.0001-seed1"
    kept_metrics = (kept / "metrics.jsonl").read_text()
    gone, partial, untested = runs / "mhc-lr0.01-seed2", runs / "mhc-lr0.001-seed2", runs / "residual-lr0.01-seed1"
    for ckpt in list_checkpoints(gone):
        ckpt.unlink()
    (gone / "result.json").unlink()
    list_checkpoints(partial)[-1].unlink()
    (partial / "result.json").unlink()
    (untested / "result.json").unlink()
    (out / "summary.json").unlink()
    assert main(["compare", "--resume", str(out)]) == 0
    resumed = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert (kept / "metrics.jsonl").read_text() == kept_metrics
    for name in (gone.name, partial.name, untested.name, kept.name):
        assert resumed[name]["status"] == "finished"
        assert resumed[name]["test_loss"] == pytest.approx(by_name[name]["test_loss"], abs=1e-4), name
    # resume with anything else is refused; a new compare never overwrites
    assert main(["compare", "--resume", str(out), "--lrs", "1e-3"]) == 2
    assert main(["compare", "--out", str(out), "--set", f"data={shakespeare}"]) == 2


def test_diverged_arm_is_recorded_and_the_others_go_on(tmp_path, shakespeare, monkeypatch):
    from torch_mhc.train import trainer

    real_train = trainer.train

    def train(cfg, run_dir, **kw):
        if cfg.model.connection == "mhc" and cfg.lr > 5e-4:
            raise DivergedError(3, "the loss is nan", cfg)
        return real_train(cfg, run_dir, **kw)

    monkeypatch.setattr(trainer, "train", train)
    out = tmp_path / "cmp"
    compare(None, ["residual", "mhc"], _sets(shakespeare), str(out), seeds=[1], lrs=[1e-3], log=lambda *_: None)
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["runs"]}
    diverged = rows["mhc-lr0.001-seed1"]
    assert diverged["status"] == "diverged" and "the loss is nan" in diverged["message"]
    assert rows["mhc-lr0.001-seed1"]["test_loss"] is None and rows["residual-lr0.001-seed1"]["test_loss"] > 0
    mhc = summary["protocol"]["arms"]["mhc"]
    assert mhc["selected_lr"] is None and mhc["gap_to_residual"] is None
    assert mhc["val_loss_by_lr"]["0.001"]["diverged"] == ["mhc-lr0.001-seed1"]
    text = (out / "report.md").read_text()
    assert "## Diverged runs" in text and "mhc-lr0.001-seed1: training diverged" in text


def test_a_nan_evaluation_is_summarised_as_diverged(tmp_path, shakespeare):
    """A run that trains to the end but whose final validation and test losses are NaN (issue 22: the summary crashed
    in statistics.stdev): recorded as diverged, its lr ruled out, summary.json strict JSON, the report written."""
    out = tmp_path / "cmp"
    compare(None, ["residual", "mhc"], _sets(shakespeare), str(out), seeds=[1, 2], lrs=[1e-3], log=lambda *_: None)
    run = out / "runs" / "mhc-lr0.001-seed2"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records[-1]["val_loss"] = float("nan")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "test_loss": float("nan"), "test_bpb": float("nan")}))
    (out / "summary.json").unlink()
    assert main(["compare", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    rows = {r["name"]: r for r in summary["runs"]}
    bad = rows["mhc-lr0.001-seed2"]
    assert bad["status"] == "diverged" and "non-finite val_loss nan, test_loss nan" in bad["message"]
    assert bad["test_loss"] is None and bad["val_loss"] is None
    mhc = summary["protocol"]["arms"]["mhc"]
    assert mhc["selected_lr"] is None and mhc["val_loss_by_lr"]["0.001"]["diverged"] == ["mhc-lr0.001-seed2"]
    assert mhc["val_loss_by_lr"]["0.001"]["mean"] == pytest.approx(rows["mhc-lr0.001-seed1"]["val_loss"])
    assert "mhc-lr0.001-seed2: finished training with a non-finite" in (out / "report.md").read_text()


def test_h_res_travel_starts_from_the_model_training_built(tmp_path, shakespeare):
    """The step-0 H_res that travel is measured from is that of the model the trainer built (trainer.setup), and the
    summary's H_res columns follow from diagnostics_summary.json."""
    from torch_mhc.diagnostics.collect import collect_diagnostics, diagnostic_batch
    from torch_mhc.train.trainer import setup

    out = tmp_path / "cmp"
    compare(None, ["residual"], _sets(shakespeare), str(out), seeds=[3], lrs=[1e-3], log=lambda *_: None,
            variants=["v4:model.connection=mhc,model.bias_init=v4,model.alpha_init=1"])
    plan = Plan.load(out / "plan.json")
    cfg = plan.config("v4", 1e-3, 3, out / "runs")
    start = initial_diagnostics(cfg, out / "runs" / cfg.run_name)
    t = setup(cfg, tmp_path / "fresh" / "run", log=lambda *_: None)
    trained_start = collect_diagnostics(t.model, diagnostic_batch(t.data, cfg.batch_size), step=0)
    assert start["h_res_mean"] == trained_start["h_res_mean"]  # bit for bit
    travel = json.loads((out / DIAGNOSTICS_SUMMARY).read_text())
    assert list(travel) == [cfg.run_name]  # the residual run has no H_res
    t = travel[cfg.run_name]
    assert t["steps"][0] == 0 and t["steps"][-1] == 6 and t["from_start"][0] == 0.0
    assert t["from_start"][-1] > 0 and len(t["h_res_end"]) == 2  # one block: two sublayers, each [n, n]
    rows = {r["arm"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert rows["v4"]["h_res_end_from_start"] == t["from_start"][-1]
    assert rows["v4"]["h_res_max_from_start"] == max(t["from_start"])
    assert rows["v4"]["h_res_start_from_uniform"] == t["from_uniform"][0] < 0.1  # v4: H_res starts near J/n
    assert rows["residual"]["h_res_end_from_identity"] is None
    assert "## Where H_res went" in (out / "report.md").read_text()
    # the stack's composite distance from J/n: the second singular value of H_res[1] @ H_res[0] at the end
    end = torch.tensor(t["h_res_end"], dtype=torch.float64)
    second = torch.linalg.svdvals(end[1] @ end[0])[1].item()
    assert rows["v4"]["stack_from_uniform"] == pytest.approx(second, rel=1e-4, abs=1e-6)
    assert 0 < rows["v4"]["stack_from_uniform"] < 1 and rows["residual"]["stack_from_uniform"] is None


def test_summarize_a_comparison_cut_short(tmp_path, shakespeare):
    """summarize: the finished runs of a comparison whose other runs never finished, nothing run; each arm's figures
    over the seeds it has, the others listed as not run. The same numbers as the full summary for what is there."""
    out = tmp_path / "cmp"
    compare(None, ["residual", "mhc"], _sets(shakespeare), str(out), seeds=[1, 2, 3], lrs=[1e-3], log=lambda *_: None)
    full = json.loads((out / "summary.json").read_text())
    cut = out / "runs" / "mhc-lr0.001-seed3"
    (cut / "result.json").unlink()
    for ckpt in list_checkpoints(cut):
        ckpt.unlink()
    summarize(out, log=lambda *_: None)
    assert not (cut / "result.json").exists()  # nothing was run
    part = json.loads((out / "summary.json").read_text())
    assert part["protocol"]["not_run"] == ["mhc-lr0.001-seed3"]
    assert {r["name"] for r in part["runs"]} == {r["name"] for r in full["runs"]} - {"mhc-lr0.001-seed3"}
    gap = part["protocol"]["arms"]["mhc"]["gap_to_residual"]
    full_gap = full["protocol"]["arms"]["mhc"]["gap_to_residual"]
    assert gap["seeds"] == 2 and gap["per_seed"] == {k: v for k, v in full_gap["per_seed"].items() if k != "3"}
    assert part["protocol"]["arms"]["residual"]["test_loss"] == full["protocol"]["arms"]["residual"]["test_loss"]
    assert "## Not run" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="nothing to summarise"):
        empty = tmp_path / "empty"
        (empty / "runs").mkdir(parents=True)
        Plan.load(out / "plan.json").save(empty / "plan.json")
        summarize(empty, log=lambda *_: None)


def test_jobs_run_the_cells_in_worker_processes(tmp_path, shakespeare):
    """--jobs 2: the same runs, in two spawned processes, with the same results as one after another (up to CPU
    thread count: the workers run with cores // 2 threads)."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    compare(None, ["residual", "mhc"], _sets(shakespeare), str(seq), seeds=[1], lrs=[1e-3], log=lambda *_: None)
    args = ["compare", "--modes", "residual,mhc", "--seeds", "1", "--lrs", "1e-3", "--out", str(par), "--jobs", "2"]
    assert main(args + [x for kv in _sets(shakespeare) for x in ("--set", kv)]) == 0
    rows = [{r["name"]: r for r in json.loads((d / "summary.json").read_text())["runs"]} for d in (seq, par)]
    assert set(rows[0]) == set(rows[1]) == {"residual-lr0.001-seed1", "mhc-lr0.001-seed1"}
    for name, r in rows[0].items():
        assert rows[1][name]["status"] == "finished"
        assert rows[1][name]["test_loss"] == pytest.approx(r["test_loss"], rel=1e-5), name
    assert main(["compare", "--resume", str(par), "--jobs", "2"]) == 0  # all kept: nothing to run


def test_compare_bad_inputs(tmp_path, capsys):
    assert main(["compare", "--modes", "residual,dense", "--out", str(tmp_path / "r")]) == 2
    assert "unknown mode 'dense'" in capsys.readouterr().err
    assert main(["compare", "--lrs", "1e-3,fast", "--out", str(tmp_path / "r")]) == 2
    assert "--lrs expects" in capsys.readouterr().err
    assert main(["compare", "--lrs=-1e-3", "--out", str(tmp_path / "r")]) == 2
    assert main(["compare", "--modes", "mhc", "--variant", "nocolon", "--out", str(tmp_path / "r")]) == 2
    assert main(["compare", "--resume", str(tmp_path / "nothing")]) == 2
    assert "plan.json not found" in capsys.readouterr().err
    assert main(["compare", "--jobs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--jobs must be an integer >= 1" in capsys.readouterr().err
    assert main(["compare", "--set", f"data={tmp_path / 'missing.txt'}", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "plan.json").exists()


def test_a_really_diverging_arm(tmp_path, shakespeare):
    """An arm whose loss is not finite at step 1 (absurd init) is recorded from the trainer's DivergedError."""
    out = tmp_path / "cmp"
    compare(None, ["residual"], _sets(shakespeare), str(out), variants=["boom:model.init_std=1e25"], lrs=[1e-3],
            log=lambda *_: None)
    rows = {r["arm"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert rows["boom"]["status"] == "diverged" and "training diverged at step 1" in rows["boom"]["message"]
    assert rows["residual"]["status"] == "finished"
    assert json.loads((out / "runs" / rows["boom"]["name"] / "result.json").read_text())["step"] == 1


# ---- real signals to a real `mhc compare --jobs 2` -------------------------------------------------

# 1000 steps: both runs still train when both have written a checkpoint. With 200, a clean-clone CI run on an
# idle machine saw the residual run finish all its steps (about 2 s) before the slower-starting mhc worker wrote
# its first checkpoint, and the test then found one run done where it expected two training.
SIGNAL_PROTOCOL = [
    *[kv for kv in TINY_PROTOCOL if not kv.startswith(("steps=", "log_every=", "eval_every=", "ckpt_every=",
                                                      "diag_every="))],
    "steps=1000", "log_every=250", "eval_every=500", "ckpt_every=5", "diag_every=0",
]
RUNS = ("residual-lr0.001-seed1", "mhc-lr0.001-seed1")


def _children_by_parent() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _compare_args(out: Path, data: Path) -> list[str]:
    return ["--modes", "residual,mhc", "--seeds", "1", "--lrs", "1e-3", "--out", str(out), "--jobs", "2",
            *[x for kv in [*SIGNAL_PROTOCOL, f"data={data}"] for x in ("--set", kv)]]


def _start_compare(out: Path, log: Path, args: list[str]) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "torch_mhc", "compare", *args], stdout=f,
                                stderr=subprocess.STDOUT, cwd=out.parent)


def _workers_training(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 180) -> dict[str, int]:
    """Wait until both runs train in workers of ``proc`` and have written a checkpoint since -> {run: pid of
    the worker that holds its directory}."""
    dirs = [out / "runs" / name for name in RUNS]
    before = {d: list_checkpoints(d)[-1].name if d.is_dir() and list_checkpoints(d) else "" for d in dirs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            pids = {d.name: int((d / ".lock").read_text().split()[1]) for d in dirs}
        except (OSError, IndexError, ValueError):
            pids = {}
        if pids and set(pids.values()) <= set(_descendants(proc.pid)) and all(
                list_checkpoints(d) and list_checkpoints(d)[-1].name > before[d] for d in dirs):
            return pids
        time.sleep(0.05)
    raise AssertionError(f"the runs did not start training in {timeout} s:\n{log.read_text()}")


def _assert_none_survive(pids, within: float = 10.0) -> None:
    """Every process in ``pids`` ends within ``within`` seconds (survivors are killed, then reported)."""
    deadline = time.monotonic() + within
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if _running(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"still running after the parent ended: {survivors}"


def _signal_compare(out, log, args, stop) -> tuple[int, list[int], dict[str, int]]:
    """Start `mhc compare ARGS`; once both runs train, ``stop(proc, workers)``; -> (exit code, every process
    the command had started, {run: worker pid})."""
    proc = _start_compare(out, log, args)
    try:
        workers = _workers_training(proc, out, log)
        family = _descendants(proc.pid)
        stop(proc, workers)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, family, workers


def _checkpoints(out):
    return {name: list_checkpoints(out / "runs" / name)[-1].name for name in RUNS}


def test_sigkill_to_the_parent_of_compare_jobs_stops_its_workers(tmp_path, shakespeare):
    """The parent killed outright: the kernel stops its workers (parent-death signal); none trains on."""
    out, log = tmp_path / "cmp", tmp_path / "compare.log"
    rc, family, _ = _signal_compare(out, log, _compare_args(out, shakespeare),
                                    lambda proc, _: proc.send_signal(signal.SIGKILL))
    assert rc == -signal.SIGKILL
    _assert_none_survive(family)
    steps = _checkpoints(out)
    time.sleep(1.0)
    assert _checkpoints(out) == steps


def test_compare_jobs_under_signals_and_resume(tmp_path, shakespeare, capsys):
    """kill -9 of one worker: exit 2 naming its run and --resume (not BrokenProcessPool), the other worker
    stopped. SIGTERM to a --resume of it: both workers stopped, exit 130 naming --resume. A last --resume
    finishes both runs; a result.json cut short, or not a result, is a run to finish again."""
    out, log = tmp_path / "cmp", tmp_path / "compare.log"
    victim = RUNS[1]
    rc, family, _ = _signal_compare(out, log, _compare_args(out, shakespeare),
                                    lambda proc, workers: os.kill(workers[victim], signal.SIGKILL))
    text = log.read_text()
    assert rc == 2, text
    assert f"run {victim}" in text and "killed by signal SIGKILL" in text and f"--resume {out}" in text, text
    assert "Traceback" not in text and "BrokenProcessPool" not in text
    _assert_none_survive(family)

    rc, family, _ = _signal_compare(out, log, ["--resume", str(out), "--jobs", "2"],
                                    lambda proc, _: proc.send_signal(signal.SIGTERM))
    text = log.read_text()
    assert rc == 130, text
    assert "interrupted" in text and f"--resume {out}" in text and "Traceback" not in text, text
    _assert_none_survive(family)
    steps = _checkpoints(out)
    time.sleep(1.0)
    assert _checkpoints(out) == steps  # nobody trains on
    assert not any((out / "runs" / name / "result.json").exists() for name in RUNS)

    assert main(["compare", "--resume", str(out), "--jobs", "2"]) == 0
    rows = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(RUNS, "finished")
    for name in RUNS:  # each run went on from its checkpoints: resumed, never restarted
        assert len((out / "runs" / name / "resumes.jsonl").read_text().splitlines()) >= 1
    result = out / "runs" / victim / "result.json"
    whole = result.read_text()
    result.write_text(whole[: len(whole) // 2])  # as a kill during an in-place write leaves it
    (out / "runs" / RUNS[0] / "result.json").write_text("[]")
    capsys.readouterr()
    assert main(["compare", "--resume", str(out)]) == 0
    assert capsys.readouterr().out.count("cannot be read") == 2
    again = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    for name in RUNS:
        assert again[name]["test_loss"] == pytest.approx(rows[name]["test_loss"], rel=1e-6)
        assert json.loads((out / "runs" / name / "result.json").read_text())["status"] == "finished"
    (out / "plan.json").write_text('{"base": {')
    assert main(["compare", "--resume", str(out)]) == 2
    assert "plan.json is not a readable comparison plan" in capsys.readouterr().err


def test_compare_help_names_every_mode(capsys):
    from torch_mhc.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse may wrap a name at its hyphens
    assert [m for m in [*MODES, *MATCHED_MODES] if m not in text] == []
