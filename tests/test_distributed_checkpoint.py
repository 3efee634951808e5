"""DCP checkpoints: save on 2 ranks, load on 1 and on 4 (resharding), exact resume on the same world
size, a crash before the commit keeps the previous checkpoint, shape mismatches, export to safetensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import batches, spawn, tiny_model
from test_distributed_dp import full_state, train
from torch_mhc.distributed import ParallelDims, global_rows, parallelize
from torch_mhc.distributed import checkpoint as dck
from torch_mhc.train.config import ParallelConfig, UserError

BATCH, SEQ = 8, 16
DATA = batches(4, BATCH, SEQ, seed=7)
PROBE = batches(1, 2, SEQ, seed=99)[0][0]


def build(world: int, settings: dict):
    dims = ParallelDims.from_config(ParallelConfig(**settings), world)
    mesh = dims.build_mesh("cpu")
    model = parallelize(tiny_model(), dims, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, global_rows(BATCH, dims.dp, dims.dp_rank(mesh))


def steps(model, opt, rows, data):
    losses = []
    for x, y in data:
        _, loss = model(x[rows], y[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        losses.append((loss / dist.get_world_size()).item())
    return losses


def save_worker(rank, world, run_dir):
    model, opt, rows = build(world, {})
    first = steps(model, opt, rows, DATA[:2])
    dck.save_distributed(run_dir, 2, model, opt, {"note": "two steps"})
    with torch.no_grad():
        probe = model(PROBE)[0]
    state = full_state(model)
    rest = steps(model, opt, rows, DATA[2:])
    # exact resume on the same world size: a fresh model and optimizer from the checkpoint
    model2, opt2, rows = build(world, {})
    trainer = dck.load_distributed(dck.dcp_dir(run_dir, 2), model2, opt2)
    resumed = steps(model2, opt2, rows, DATA[2:])
    return {"first": first, "rest": rest, "resumed": resumed, "probe": probe, "state": state, "trainer": trainer}


def load_worker(rank, world, run_dir):
    model, opt, rows = build(world, {"dp_replicate": 2, "dp_shard": 2})
    trainer = dck.load_distributed(dck.dcp_dir(run_dir, 2), model, opt)
    with torch.no_grad():
        probe = model(PROBE)[0]
    return {"probe": probe, "rest": steps(model, opt, rows, DATA[2:]), "trainer": trainer}


def test_save_on_2_load_on_1_and_4_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    saved = spawn(save_worker, 2, tmp_path, str(run_dir))[0]
    assert saved["resumed"] == saved["rest"]  # same world size: the uninterrupted curve, bit for bit
    assert saved["trainer"]["step"] == 2 and saved["trainer"]["note"] == "two steps"
    assert saved["trainer"]["world_size"] == 2
    assert [p.name for p in dck.list_dcp_checkpoints(run_dir)] == ["dcp_step_0000002"]

    # one process, no process group: the model only
    model = tiny_model(seed=123)  # other initial weights, overwritten by the load
    dck.load_distributed(dck.dcp_dir(run_dir, 2), model)
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE)[0], saved["probe"], rtol=0, atol=0)
    for k, v in saved["state"].items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)

    # four processes, HSDP 2 x 2: outputs equal, and the optimizer state resharded (the next steps match)
    for r in spawn(load_worker, 4, tmp_path, str(run_dir)):
        torch.testing.assert_close(r["probe"], saved["probe"], rtol=0, atol=0)
        torch.testing.assert_close(torch.tensor(r["rest"]), torch.tensor(saved["rest"]), rtol=1e-5, atol=0)

    # one file of weights for use outside the trainer
    from safetensors.torch import load_file

    out = dck.export_weights(dck.dcp_dir(run_dir, 2), tmp_path / "weights.safetensors")
    exported = load_file(str(out))
    assert exported.keys() == saved["state"].keys()
    for k, v in saved["state"].items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)


def test_crash_before_commit_keeps_previous(tmp_path, monkeypatch):
    """One process (DCP without a process group): the commit protocol is the same on every world size."""
    run_dir = tmp_path / "run"
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, DATA[:1])
    dck.save_distributed(run_dir, 1, model, opt, {})
    before = full_state(model)
    train(model, DATA[1:2])

    def die_writing(state, checkpoint_id, **kwargs):  # killed while the shards are being written
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    def die_committing(tmp, final):  # killed after every file was written, before the rename
        raise KeyboardInterrupt

    ckpts = run_dir / "checkpoints"
    monkeypatch.setattr(dck.dcp, "save", die_writing)
    with pytest.raises(KeyboardInterrupt):
        dck.save_distributed(run_dir, 2, model, opt, {})
    assert [p.name for p in dck.list_dcp_checkpoints(run_dir)] == ["dcp_step_0000001"]
    monkeypatch.undo()
    monkeypatch.setattr(dck, "_commit", die_committing)
    with pytest.raises(KeyboardInterrupt):
        dck.save_distributed(run_dir, 2, model, opt, {})
    monkeypatch.undo()
    assert (ckpts / ".dcp_step_0000002.tmp" / ".metadata").is_file()  # shards were all written, not committed
    assert [p.name for p in dck.list_dcp_checkpoints(run_dir)] == ["dcp_step_0000001"]
    (ckpts / "dcp_step_0000003").mkdir()  # a half-copied directory without trainer.pt: not a checkpoint
    fresh = tiny_model(seed=5)
    assert dck.load_distributed(dck.list_dcp_checkpoints(run_dir)[-1], fresh)["step"] == 1
    for k, v in before.items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
    dck.save_distributed(run_dir, 2, model, opt, {}, keep=1)  # the next save cleans up and prunes
    assert [p.name for p in dck.list_dcp_checkpoints(run_dir)] == ["dcp_step_0000002"]
    assert not (ckpts / ".dcp_step_0000002.tmp").exists()


def test_load_into_other_shape_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    model = tiny_model()
    dck.save_distributed(run_dir, 1, model, torch.optim.AdamW(model.parameters()), {})
    other = tiny_model(dim=64)
    with pytest.raises(UserError, match=r"does not fit this model.*embed.weight: checkpoint \(64, 32\) vs model"):
        dck.load_distributed(dck.dcp_dir(run_dir, 1), other)
    with pytest.raises(UserError, match="not a committed distributed checkpoint"):
        dck.load_distributed(tmp_path, other)


def test_export_weights_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    from torch_mhc.cli import main

    run_dir = tmp_path / "run"
    model = tiny_model(merge="head", tie_embeddings=True)
    dck.save_distributed(run_dir, 4, model, torch.optim.AdamW(model.parameters()), {})
    assert main(["export-weights", str(run_dir), str(tmp_path / "w.safetensors")]) == 0
    got = load_file(str(tmp_path / "w.safetensors"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # safetensors alone writes 0600
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    # a single-process checkpoint file exports the same way
    from torch_mhc.train.checkpoint import save_checkpoint

    opt = torch.optim.AdamW(model.parameters())
    pt = save_checkpoint(tmp_path / "plain", 2, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         {}, {}, keep=1)
    assert main(["export-weights", str(pt), str(tmp_path / "p.safetensors")]) == 0
    assert all(torch.equal(load_file(str(tmp_path / "p.safetensors"))[k], v) for k, v in model.state_dict().items())
    assert main(["export-weights", str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def tp_fsdp_worker(rank, world, run_dir):
    """TP x FSDP (2 x 2): the fused qkv and the column-parallel FFN weights are strided on both mesh dims."""
    from torch.distributed.tensor import DTensor

    from torch_mhc.distributed.tensor_parallel import whole_tensor

    model, opt, rows = build(world, {"tp": 2, "dp_shard": 2})
    wholes = {n: whole_tensor(p).detach().clone() for n, p in model.named_parameters()}
    dck.save_distributed(run_dir, 1, model, opt, {})
    local = {k: v.to_local().clone() if isinstance(v, DTensor) else v.clone() for k, v in model.state_dict().items()}
    fresh, opt2, _ = build(world, {"tp": 2, "dp_shard": 2})
    with torch.no_grad():
        for p in fresh.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).mul_(0.5)  # other weights, overwritten by the load
    dck.load_distributed(dck.dcp_dir(run_dir, 1), fresh, opt2)
    reloaded = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in fresh.state_dict().items()}
    return {"wholes": wholes, "same_shards": all(torch.equal(reloaded[k], v) for k, v in local.items())}


def test_tensor_parallel_under_fsdp_saves_the_global_weights(tmp_path):
    """A DCP checkpoint of a TP x FSDP model holds the one-process weights (DTensor's own full_tensor() of the
    twice-strided qkv put its rows in another order, so eval/export/another layout read a scrambled model)."""
    run_dir = tmp_path / "run"
    ref = tiny_model()  # build() parallelizes tiny_model() with the same seed
    results = spawn(tp_fsdp_worker, 4, tmp_path, str(run_dir))
    for r in results:
        assert r["same_shards"]  # saved and loaded back on the same layout: every shard bit-identical
        for n, p in ref.named_parameters():
            assert torch.equal(r["wholes"][n], p.detach()), n
    one = tiny_model(seed=123)
    dck.load_distributed(dck.dcp_dir(run_dir, 1), one)  # one process, no process group
    for k, v in ref.state_dict().items():
        assert torch.equal(one.state_dict()[k], v), k
