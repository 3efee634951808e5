"""``torchrun -m torch_mhc train`` on 2 gloo processes: the loss curve of the one-process run, one
set of logs, DCP checkpoints, exact resume, resume on another world size, and bad settings that
stop every rank with a message and overwrite nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import TINY
from distributed_helpers import torchrun
from torch_mhc.cli import main
from torch_mhc.train.config import UserError, build_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def sets(tmp_path, data, *extra):
    return [a for s in [*TINY, f"data={data}", f"out_dir={tmp_path / 'runs'}", *extra] for a in ("--set", s)]


def losses(run_dir, key="loss"):
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r
    return {s: r[key] for s, r in sorted(records.items()) if key in r}


def test_torchrun_train_matches_one_process_and_resumes(tmp_path, small_text):
    assert main(["train", *sets(tmp_path, small_text, "run_name=one")]) == 0
    one = tmp_path / "runs" / "one"
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=two", "parallel.dp_shard=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert p.stdout.count("done. run directory") == 1  # rank 0 prints, logs and writes metrics
    # same global batches, FSDP2 over 2 ranks: the curve agrees to float32 rounding (see test_distributed_dp)
    ref, got = losses(one), losses(two)
    assert ref.keys() == got.keys() == {2, 3, 4, 6}
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(ref.values())), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(list(losses(two, "val_loss").values())),
                               torch.tensor(list(losses(one, "val_loss").values())), rtol=1e-5, atol=0)
    ckpts = sorted(q.name for q in (two / "checkpoints").iterdir())
    assert ckpts == ["dcp_step_0000003", "dcp_step_0000006"]
    steps = [json.loads(line)["step"] for line in (two / "grad_norms.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # every step's norm, written by rank 0 alone

    # exact resume on the same world size: drop the last checkpoint, continue from step 3
    shutil.rmtree(two / "checkpoints" / "dcp_step_0000006")
    p = torchrun("train", "--resume", str(two))
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(two) == got

    # another model shape on resume: every rank stops with the message, nothing is written (the DCP
    # shape check behind this policy: test_distributed_checkpoint)
    before = {q: q.stat().st_mtime_ns for q in two.rglob("*") if q.is_file() and q.name != ".lock"}
    p = torchrun("train", "--resume", str(two), "--set", "model.dim=64", "--set", "steps=9")
    assert p.returncode != 0
    for rank in (0, 1):
        assert f"mhc train (rank {rank}): error: a resumed run cannot change model.dim" in p.stderr
    assert {q: q.stat().st_mtime_ns for q in two.rglob("*") if q.is_file() and q.name != ".lock"} == before

    # resume on one process (DCP reshards): the same curve to rounding
    shutil.rmtree(two / "checkpoints" / "dcp_step_0000006")
    assert main(["train", "--resume", str(two), "--set", "parallel.dp_shard=-1"]) == 0
    torch.testing.assert_close(torch.tensor(list(losses(two).values())), torch.tensor(list(got.values())),
                               rtol=1e-5, atol=0)

@pytest.mark.slow
def test_torchrun_ddp_train_matches_one_process(tmp_path, small_text):
    assert main(["train", *sets(tmp_path, small_text, "run_name=one", "diag_every=0")]) == 0
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=ddp", "diag_every=0", "parallel.dp_mode=ddp",
                                "parallel.dp_replicate=2", "parallel.dp_shard=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "ddp")
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(ref.values())), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_torchrun_tensor_parallel_train_and_resume(tmp_path, small_text):
    """TP + SP on 2 ranks through the trainer: the one-process curve, DCP checkpoints of the strided
    qkv shards, and an exact resume."""
    assert main(["train", *sets(tmp_path, small_text, "run_name=one", "model.n_heads=2", "diag_every=0")]) == 0
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=tp", "model.n_heads=2", "diag_every=0",
                                "parallel.tp=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "tp"
    ref, got = losses(tmp_path / "runs" / "one"), losses(run)
    torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(ref.values())), rtol=1e-5, atol=0)
    shutil.rmtree(run / "checkpoints" / "dcp_step_0000006")
    p = torchrun("train", "--resume", str(run))
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(run) == got


def test_torchrun_bad_settings_stop_every_rank(tmp_path, small_text):
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=bad", "parallel.dp_shard=2", "parallel.tp=2"))
    assert p.returncode != 0
    for rank in (0, 1):
        assert f"mhc train (rank {rank}): error: the parallel mesh" in p.stderr
    assert "= 4 processes, but 2 were started" in p.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created

    taken = tmp_path / "runs" / "taken"
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=taken"))
    assert p.returncode != 0
    for rank in (0, 1):
        assert f"mhc train (rank {rank}): error: run directory" in p.stderr
    assert {q.name for q in taken.iterdir()} - {".lock"} == {"keep.txt"} and (taken / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=3", r"parallel.tp \(3\) must divide model.n_heads \(4\)"),
    ("batch_size=6", r"batch_size \(6, the global batch\) must be divisible by the data-parallel degree"),
    ("parallel.dp_mode=zero", "parallel.dp_mode must be one of fsdp, ddp"),
])
def test_parallel_config_validation(override, message):
    extra = ["parallel.dp_shard=4"] if override.startswith("batch") else []
    with pytest.raises(UserError, match=message):
        build_config(overrides=[override, *extra])


def test_mesh_product_must_equal_world_size():
    from torch_mhc.distributed import ParallelDims

    cfg = build_config(overrides=["parallel.tp=2", "parallel.dp_replicate=2"])
    assert ParallelDims.from_config(cfg.parallel, 8).dp_shard == 2  # -1 fills the rest
    with pytest.raises(UserError, match="does not divide the world size 6"):
        ParallelDims.from_config(cfg.parallel, 6)
    cfg = build_config(overrides=["parallel.dp_shard=2"])
    with pytest.raises(UserError, match="= 2 processes, but 4 were started"):
        ParallelDims.from_config(cfg.parallel, 4)
    assert not ParallelDims.from_config(build_config().parallel, 1).enabled  # one process: the plain run
