"""``mhc train`` with ``parallel.pp`` through real torchrun on gloo ranks: a 4-layer MoE model (a dense layer,
then MoE; the V4 variant with the head merge), each run held against the one-process run of the same config.
1F1B and ZBVZeroBubble on 2 ranks; PP x FSDP on 4 ranks through diagnostics steps, evaluations and DCP
checkpoints, resumed on other layouts (PP on 2 ranks, one process, FSDP on 2 ranks); PP x FSDP x EP on 4 ranks,
resumed on one process; bad settings refused."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import CountLaunches, write_small_text
from distributed_helpers import assert_same_numbers, records, torchrun
from torch_mhc.cli import main
from torch_mhc.distributed.checkpoint import tensor_shapes
from torch_mhc.distributed.mesh import ParallelConfig
from torch_mhc.distributed.pipeline import (
    SCHEDULES,
    StreamStage,
    pipeline_errors,
    stage_bounds,
    stage_ids,
    stage_owner,
)
from torch_mhc.distributed.runtime import layout_problems
from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.train.config import build_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# grad_accum = 4 micro-batches of 2 rows per step: enough for every schedule on pp = 2 (ZBV and DualPipeV need
# 2 pp); PP x FSDP reads 1 row of each micro-batch per data-parallel rank
SETTINGS = [
    "model.dim=32", "model.n_layers=4", "model.n_heads=2", "model.max_seq_len=32", "seq_len=32", "batch_size=2",
    "grad_accum=4", "steps=6", "warmup=2", "log_every=1", "eval_every=3", "eval_batches=2", "ckpt_every=2",
    "keep_ckpts=3", "diag_every=3",
    "model.moe=true", "model.n_routed_experts=4", "model.top_k=2", "model.first_dense_layers=1",
    "model.variant=deepseek-v4", "model.merge=head",
]
# Two runs' weights differ by float32 rounding after a few AdamW steps, which its normalised update makes
# relative differences of up to ~3e-4 in small trained parameters (see test_distributed_run)
ACROSS_RUNS = 1e-3


def sets(root, data, *extra):
    return [a for s in [*SETTINGS, f"data={data}", f"out_dir={root / 'runs'}", *extra] for a in ("--set", s)]


def column(run_dir, key, steps=None):
    return torch.tensor([r[key] for s, r in records(run_dir).items() if key in r and (steps is None or s in steps)],
                        dtype=torch.float64)


def assert_same_curve(run, ref, steps=None):
    """Loss, gradient norms (global and per role) and validation loss of ``run`` equal ``ref``'s to float32 rounding."""
    assert column(run, "loss", steps).numel() > 0
    for key in ("loss", "grad_norm", "val_loss", "grad_norm_connection", "grad_norm_ffn", "grad_norm_embed"):
        torch.testing.assert_close(column(run, key, steps), column(ref, key, steps), rtol=1e-5, atol=0,
                                   msg=lambda m, key=key: f"{key}: {m}")


def assert_same_diagnostics(run, ref):
    """The diagnostics JSONL: one record per diagnostics step, every layer of the model, the one-process numbers."""
    got, want = records(run, "diagnostics.jsonl"), records(ref, "diagnostics.jsonl")
    assert got.keys() == want.keys() == {3, 6}
    for step in got:
        assert len(got[step]["layers"]) == 2 * 4  # attention and FFN connection of each of the 4 layers
        assert_same_numbers(got[step], want[step], ACROSS_RUNS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run of the config (checkpoints step_*.pt at 2, 4, 6)."""
    root = tmp_path_factory.mktemp("one")
    data = write_small_text(root / "small.txt")
    assert main(["train", *sets(root, data, "run_name=one")]) == 0
    return root / "runs" / "one", data


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_pipeline_on_two_ranks_matches_one_process(tmp_path, reference, schedule):
    one, data = reference
    p = torchrun("train", *sets(tmp_path, data, "run_name=pp", "parallel.pp=2", f"parallel.pp_schedule={schedule}"))
    assert p.returncode == 0, p.stderr[-3000:]
    pp = tmp_path / "runs" / "pp"
    assert p.stdout.count("done. run directory") == 1
    assert_same_curve(pp, one)
    assert_same_diagnostics(pp, one)


def test_pipeline_under_fsdp_resumes_on_other_layouts(tmp_path, reference, capsys):
    one, data = reference
    # PP x FSDP: 2 stages, each FSDP2-sharded over 2 ranks
    p = torchrun("train", *sets(tmp_path, data, "run_name=pf", "parallel.pp=2", "parallel.dp_shard=2"), nproc=4)
    assert p.returncode == 0, p.stderr[-3000:]
    pf = tmp_path / "runs" / "pf"
    assert_same_curve(pf, one)
    assert_same_diagnostics(pf, one)
    ckpts = pf / "checkpoints"
    assert sorted(q.name for q in ckpts.iterdir()) == ["dcp_step_0000002", "dcp_step_0000004", "dcp_step_0000006"]
    # the checkpoint holds the unpipelined model's tensors under its own names and shapes
    model = DecoderLM(ModelConfig(**json.loads((pf / "config.json").read_text())["model"]))
    saved = {k.removeprefix("model."): shape for k, (shape, _) in tensor_shapes(ckpts / "dcp_step_0000006").items()
             if k.startswith("model.")}
    assert saved == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # usable by one process afterwards: mhc eval of the last checkpoint gives the run's own validation loss
    capsys.readouterr()
    assert main(["eval", str(pf), "--max-batches", "2"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["val_loss"] - records(pf)[6]["val_loss"]) < 1e-5 * 6

    # resumed from step 4 on another pipelined layout: 2 ranks, 2 stages each (V), no data parallel
    shutil.rmtree(ckpts / "dcp_step_0000006")
    p = torchrun("train", "--resume", str(pf), "--set", "parallel.dp_shard=-1",
                 "--set", "parallel.pp_schedule=ZBVZeroBubble")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_curve(pf, one, steps={5, 6})

    # from step 2 on one process (writes step_*.pt), then from its step 4 on 2 FSDP ranks
    shutil.rmtree(ckpts / "dcp_step_0000004")
    shutil.rmtree(ckpts / "dcp_step_0000006")
    assert main(["train", "--resume", str(pf), "--set", "parallel.pp=1", "--set", "parallel.dp_shard=-1"]) == 0
    assert sorted(q.name for q in ckpts.iterdir() if q.suffix != ".sha256") == [
        "dcp_step_0000002", "step_0000004.pt", "step_0000006.pt"]
    assert_same_curve(pf, one, steps={3, 4, 5, 6})
    for q in ckpts.glob("step_0000006.pt*"):  # the checkpoint and its checksum
        q.unlink()
    p = torchrun("train", "--resume", str(pf), "--set", "parallel.dp_shard=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (ckpts / "dcp_step_0000006").is_dir()
    assert_same_curve(pf, one, steps={5, 6})
    assert_same_diagnostics(pf, one)


def test_pipeline_with_expert_parallel_matches_one_process_and_resumes_there(tmp_path, reference):
    """PP x FSDP x EP: 2 stages, each FSDP2-sharded over its 2 data-parallel ranks, which also split each of the
    stage's MoE layers' 4 experts (2 a rank); the checkpoint holds the global expert weights and resumes in one
    process."""
    one, data = reference
    p = torchrun("train", *sets(tmp_path, data, "run_name=pe", "parallel.pp=2", "parallel.dp_shard=2",
                                "parallel.ep=2"), nproc=4)
    assert p.returncode == 0, p.stderr[-3000:]
    pe = tmp_path / "runs" / "pe"
    assert_same_curve(pe, one)
    assert_same_diagnostics(pe, one)
    ckpts = pe / "checkpoints"
    model = DecoderLM(ModelConfig(**json.loads((pe / "config.json").read_text())["model"]))
    saved = {k.removeprefix("model."): shape for k, (shape, _) in tensor_shapes(ckpts / "dcp_step_0000004").items()
             if k.startswith("model.")}
    assert saved == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert saved["blocks.2.ffn.sublayer.mlp.w1"][0] == 4  # all 4 experts, not a rank's 2
    # from step 4 on one process: its steps 5 and 6 are the one-process run's
    shutil.rmtree(ckpts / "dcp_step_0000006")
    assert main(["train", "--resume", str(pe), "--set", "parallel.pp=1", "--set", "parallel.dp_shard=-1",
                 "--set", "parallel.ep=1"]) == 0
    assert (ckpts / "step_0000006.pt").is_file()
    assert_same_curve(pe, one, steps={5, 6})


def train_config(*overrides):
    return build_config(overrides=[*SETTINGS, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp_schedule=GPipe"], "parallel.pp_schedule must be one of: 1F1B (1 stage per rank, grad_accum >= pp); "
                                     "Interleaved1F1B (2 stages per rank, grad_accum a multiple of pp); ZBVZeroBubble"),
    (["parallel.pp=2", "grad_accum=1"], "parallel.pp_schedule=1F1B needs grad_accum >= pp (the micro-batches of a "
                                        "step are its grad_accum micro-batches; got grad_accum=1, parallel.pp=2)"),
    (["parallel.pp=4", "grad_accum=6", "parallel.pp_schedule=Interleaved1F1B"],
     "parallel.pp_schedule=Interleaved1F1B runs 2 stage(s) per rank: parallel.pp x 2 = 8 stages need "
     "model.n_layers >= 8 (got 4)"),
    (["parallel.pp=4", "grad_accum=6", "parallel.pp_schedule=Interleaved1F1B"], "grad_accum a multiple of pp"),
    (["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "grad_accum=3"], "DualPipeV needs grad_accum >= 2 pp"),
    (["parallel.pp=2", "parallel.tp=2"], "parallel.pp > 1 with parallel.tp > 1 is not supported yet"),
    (["parallel.pp=2", "parallel.dp_mode=ddp"], "parallel.pp > 1 composes with FSDP2 (parallel.dp_shard) only"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "set model.tie_embeddings=false"),
    (["parallel.pp=2", "compile=true"], "parallel.pp > 1 with compile=true is not supported yet"),
])
def test_bad_pipeline_settings_are_named(overrides, message):
    cfg = train_config(*overrides)
    assert any(message in e for e in pipeline_errors(cfg, cfg.parallel)), pipeline_errors(cfg, cfg.parallel)


def test_good_pipeline_settings_pass_and_stages_cover_the_model():
    for name, (_, per, _) in SCHEDULES.items():
        cfg = train_config("parallel.pp=2", f"parallel.pp_schedule={name}")
        assert pipeline_errors(cfg, cfg.parallel) == []
        owned = sorted(s for r in range(2) for s in stage_ids(r, 2, name))
        assert owned == list(range(2 * per))  # every stage on exactly one rank
        assert all(stage_owner(s, 2, name) == r for r in range(2) for s in stage_ids(r, 2, name))
    assert stage_ids(0, 2, "ZBVZeroBubble") == [0, 3] and stage_ids(0, 2, "Interleaved1F1B") == [0, 2]
    assert pipeline_errors(SimpleNamespace(grad_accum=1, model=None, compile=False), ParallelConfig()) == []
    cfg = train_config("parallel.pp=2", "parallel.dp_shard=2", "parallel.ep=2")  # PP x FSDP x EP
    assert layout_problems(cfg) == []


def test_bad_pipeline_settings_stop_every_rank_before_the_run_starts(tmp_path, small_text):
    p = torchrun("train", *sets(tmp_path, small_text, "run_name=bad", "parallel.pp=2", "grad_accum=1"))
    assert p.returncode != 0
    for rank in (0, 1):
        assert f"mhc train (rank {rank}): error: invalid parallel settings: parallel.pp_schedule=1F1B needs " \
               "grad_accum >= pp" in p.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_read_ahead_chain_ends_at_stage_boundaries(monkeypatch):
    """The fused post computes its reader's GEMM ahead and hands it on (``run_blocks``); a stage's last post has no
    reader on its stage (the next one gets the state through a send), so the chain ends there: per stage one
    coefficient GEMM (its first read) and one read-ahead post per connection but the last (kernels through
    Triton's interpreter); unpipelined, one GEMM for the whole stack."""
    pytest.importorskip("triton")
    from torch_mhc import ops
    from torch_mhc.ops import coefficients, streams

    gemm, post = CountLaunches(coefficients._gemm_fwd), CountLaunches(streams._post_fwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", gemm)
    monkeypatch.setattr(streams, "_post_fwd", post)
    model = DecoderLM(ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=2, max_seq_len=16, n_streams=4))
    idx = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with ops.use_backend("triton"), torch.no_grad():
        model(idx)
        assert gemm.launches == 1 and [k["PROJ"] for k in post.kwargs] == [True] * 7 + [False]
        h = idx
        for start, stop in stage_bounds(4, 2):
            gemm.grids.clear(), post.grids.clear(), post.kwargs.clear()
            stage = StreamStage(model, start, stop)
            assert len(stage.connections()) == 4
            h = stage(h)
            assert gemm.launches == 1 and [k["PROJ"] for k in post.kwargs] == [True] * 3 + [False]
