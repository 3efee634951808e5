"""The benchmark scripts run (tiny CPU shapes); they measure, the tests only check they work."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), *args])
    runpy.run_path(str(BENCH / name), run_name="__main__")


@pytest.mark.parametrize("name, args", [
    ("bench_model.py", ["--configs", "32:1", "--tokens", "64", "--seq", "32", "--vocab", "256", "--steps", "1"]),
    ("bench_sublayer.py", ["--tokens", "32", "--dims", "24", "--reps", "1", "--no-compile"]),
])
def test_bench_scripts_run(name, args, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    run_script(name, [*args, "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert result["rows"] and result["command"] and result["device"]


def test_curve_equal_reports_the_first_difference(tmp_path, capsys):
    curve = runpy.run_path(str(BENCH / "curve_equal.py"))
    a, b = tmp_path / "a", tmp_path / "b"
    for d, last_loss in ((a, 2.5), (b, 2.5000001)):
        d.mkdir()
        rows = [{"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": last_loss, "lr": 1e-3}]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 3, \"lo")
    assert curve["differences"](curve["records"](a), curve["records"](a)) == (2, [])
    assert curve["differences"](curve["records"](a), curve["records"](b)) == (2, [(2, "loss", 2.5, 2.5000001)])
    assert curve["main"]([str(a), str(b)]) == 1 and "step 2 loss" in capsys.readouterr().out
    assert curve["main"]([str(a), str(a)]) == 0
    assert curve["main"]([str(a), str(b), "--rtol", "1e-6"]) == 0  # 4e-8 relative: within
    assert curve["main"]([str(a), str(b), "--rtol", "1e-9"]) == 1
    assert curve["main"]([str(a), str(b), "--keys", "lr"]) == 0  # only the lr compared: equal


def test_bench_sublayer_fused_cases_through_the_interpreter(tmp_path, monkeypatch):
    """The fused cases (one sublayer, and per sublayer of a read-ahead stack, with and without chained backward)
    run (interpreter, tiny shape)."""
    from torch_mhc import ops

    out = tmp_path / "r.json"
    with ops.use_backend("triton"):
        run_script("bench_sublayer.py", ["--tokens", "16", "--dims", "24", "--reps", "1", "--no-compile",
                                         "--out", str(out)], monkeypatch)
    impls = {r["impl"] for r in json.loads(out.read_text())["rows"]}
    assert {"fused", "fused, 4-stack", "fused, 4-stack, chained backward", "reference"} <= impls


def test_bench_moe_counts_the_loops_host_syncs(tmp_path, monkeypatch):
    """bench_moe.py times the loop and every grouped implementation and reports their host syncs: the loop's
    nonzero per expert and bincount, none for the grouped ones."""
    out = tmp_path / "r.json"
    run_script("bench_moe.py", ["--shapes", "64:16:4:2:8", "--reps", "1", "--out", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    assert result["command"] and result["device"] and result["torch"]
    (row,) = result["rows"]
    assert row["host_syncs"] == {"reference": 4 + 1, "padded": 0, "buckets": 0, "grouped_mm": 0}
    assert set(row["ms"]) == {"reference", "padded", "buckets", "grouped_mm"}
