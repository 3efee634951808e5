"""Activation checkpointing per block (``model.activation_checkpoint``): validated in the config; the same
outputs, gradients and MoE loads bit for bit on CPU, with and without mHC's stream recompute; unchanged
parameter names and state-dict keys; less saved memory (counted with saved-tensor hooks); applied by
``parallelize`` and by the one-process trainer, whose loss curve it does not change."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY
from torch_mhc.distributed.memory import SavedBytes
from torch_mhc.distributed.mesh import ParallelDims
from torch_mhc.distributed.parallelize import apply_activation_checkpoint, checkpointed_blocks, parallelize
from torch_mhc.errors import UserError
from torch_mhc.models.decoder import DecoderLM, ModelConfig
from torch_mhc.train.config import build_config, resume_changes


def paper_like(mode: str = "none", recompute: bool = False, **kw) -> ModelConfig:
    """Four blocks: one dense then three MoE, the V4 variant with the head merge (the 27B config's structure)."""
    values = dict(vocab_size=64, dim=32, n_layers=4, n_heads=2, max_seq_len=16, moe=True, n_routed_experts=4,
                  top_k=2, first_dense_layers=1, variant="deepseek-v4", merge="head", recompute=recompute,
                  recompute_every=2, activation_checkpoint=mode)
    return ModelConfig(**{**values, **kw})


def build(cfg: ModelConfig) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(cfg)
    apply_activation_checkpoint(model, cfg.activation_checkpoint)
    return model


def step(model: DecoderLM):
    """One forward and backward; (logits, loss, gradients by name, MoE loads, saved bytes)."""
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with SavedBytes(model) as saved:
        logits, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads, [m.load.clone() for m in model.moe_layers()], saved.bytes


@pytest.mark.parametrize("value", ["blocks", "every", "every:0", "every:-1", "every:x", "every:2:3", "Block", ""])
def test_bad_settings_are_refused_by_the_config(value):
    with pytest.raises(UserError, match="activation_checkpoint must be none, block or every:K"):
        build_config(overrides=[f"model.activation_checkpoint={value}"])


def test_which_blocks_are_checkpointed():
    assert build_config(overrides=["model.activation_checkpoint=every:3"]).model.checkpoint_every == 3
    assert checkpointed_blocks("none", 4) == []
    assert checkpointed_blocks("block", 4) == checkpointed_blocks("every:1", 4) == [0, 1, 2, 3]
    assert checkpointed_blocks("every:2", 5) == [1, 3]  # torchtitan's ac_freq: the K-th, 2K-th, ... block


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "stream-recompute"])
@pytest.mark.parametrize("mode", ["block", "every:2"])
def test_same_outputs_gradients_and_loads_bit_for_bit(mode, recompute):
    ref_model, model = build(paper_like("none", recompute)), build(paper_like(mode, recompute))
    assert [type(b).__name__ for b in model.blocks] != [type(b).__name__ for b in ref_model.blocks]
    logits, loss, grads, loads, saved = step(model)
    ref_logits, ref_loss, ref_grads, ref_loads, ref_saved = step(ref_model)
    assert saved < ref_saved  # checkpointing did happen
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    # each MoE layer counts its expert load once per forward, not again in the recompute
    assert len(loads) == 3 and all(torch.equal(a, b) for a, b in zip(loads, ref_loads))
    assert all(load.sum() == 2 * 15 * 2 for load in loads)  # tokens x top_k


def test_parameter_names_and_state_dict_keys_unchanged_checkpoints_load_either_way():
    plain, ac = build(paper_like("none")), build(paper_like("block"))
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(ac.state_dict()) == list(plain.state_dict())
    assert ac.parameter_roles() == plain.parameter_roles()
    torch.manual_seed(5)
    other = DecoderLM(paper_like("none"))  # other weights: a checkpoint of a run without AC
    ac.load_state_dict(other.state_dict())
    plain.load_state_dict(ac.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    apply_activation_checkpoint(ac, "block")  # idempotent: no class of a class
    assert type(ac.blocks[0]).__mro__.count(type(ac.blocks[0]).__mro__[1]) == 1
    assert type(ac.blocks[0]).__name__ == "CheckpointedBlock"


@pytest.mark.parametrize("connection", ["mhc", "hc", "residual"])
def test_saved_memory_block_less_than_every2_less_than_none(connection):
    """Bytes autograd saves (distinct storages, parameters excluded), with and without stream recompute."""
    measured = {}
    for recompute in (False, True):
        for mode in ("none", "every:2", "block"):
            cfg = paper_like(mode, recompute, connection=connection, merge="sum")
            measured[recompute, mode] = step(build(cfg))[-1]
        assert measured[recompute, "block"] < measured[recompute, "every:2"] < measured[recompute, "none"]
    if connection != "residual":  # stream recompute drops states (residual has none to drop)
        assert measured[True, "none"] < measured[False, "none"]
    print(connection, measured)


def test_eval_without_gradients_runs_the_plain_forward(monkeypatch):
    model = build(paper_like("block"))
    idx = torch.randint(0, 64, (2, 8))
    ref = model(idx)[0].detach()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        logits, _ = model(idx)
    assert calls == [] and torch.equal(logits, ref)
    model(idx)
    assert len(calls) == 4  # with gradients: each block checkpointed


def test_parallelize_applies_it_before_data_parallel():
    model = DecoderLM(paper_like("every:2"))
    dims = ParallelDims(dp_shard=1)
    parallelize(model, dims, SimpleNamespace(mesh_dim_names=()))  # one rank: no TP, no data parallel
    assert [type(b).__name__ for b in model.blocks] == ["Block", "CheckpointedBlock"] * 2


def _run(tmp_path, data, name, *extra):
    from torch_mhc.train.trainer import start_run

    sets = [*TINY, "model.n_layers=3", "model.moe=true", "model.n_routed_experts=4", "model.variant=deepseek-v4",
            "model.merge=head", f"data={data}", f"out_dir={tmp_path / 'runs'}", f"run_name={name}", *extra]
    run_dir, _ = start_run(None, sets, log=lambda *_: None)
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mhc_train_gives_the_same_loss_curve(tmp_path, small_text):
    """Losses, gradient norms, validation losses and diagnostics: equal, with and without stream recompute."""

    def curve(records):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb")} for r in records]

    _, plain = _run(tmp_path, small_text, "plain")
    run_dir, block = _run(tmp_path, small_text, "block", "model.activation_checkpoint=block")
    _, rec = _run(tmp_path, small_text, "rec", "model.recompute=true")
    _, rec_every = _run(tmp_path, small_text, "rec_every", "model.recompute=true",
                        "model.activation_checkpoint=every:2")
    assert sum("loss" in r for r in plain) >= 3 and sum("val_loss" in r for r in plain) >= 2
    assert any("max_composite_fwd_gain" in r for r in plain)
    assert curve(block) == curve(plain)
    assert curve(rec_every) == curve(rec)
    assert json.loads((run_dir / "config.json").read_text())["model"]["activation_checkpoint"] == "block"


def test_a_resumed_run_may_switch_it():
    old = build_config(overrides=["model.activation_checkpoint=none"])
    new = build_config(overrides=["model.activation_checkpoint=every:2"])
    assert resume_changes(old, new) == {"model.activation_checkpoint": ["none", "every:2"]}


def _steps(model, data, rows, dp_avg: bool) -> tuple[list[float], dict]:
    """Three AdamW steps with clipping and the MoE bias update; (losses of the global batch, full state)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from torch_mhc.distributed.parallelize import clip_grad_norm_, sync_moe_load

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for x, y in data:
        _, loss = model(x[rows], y[rows])
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dp_avg:
            sync_moe_load(model)
        for moe in model.moe_layers():
            moe.update_bias()
        loss = loss.detach()
        if dp_avg:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in model.state_dict().items()}
    return losses, state


DIST_CASES = [({"dp_mode": "fsdp"}, "none", False), ({"dp_mode": "fsdp"}, "block", False),
              ({"dp_mode": "fsdp"}, "every:2", True), ({"dp_mode": "fsdp"}, "none", True),
              ({"dp_mode": "ddp", "dp_replicate": 2, "dp_shard": 1}, "block", False)]


def _dist_worker(rank, world, cases):
    from distributed_helpers import batches
    from torch_mhc.distributed import global_rows
    from torch_mhc.distributed.mesh import ParallelConfig

    out = []
    for settings, mode, recompute in cases:
        dims = ParallelDims.from_config(ParallelConfig(**settings), world)
        mesh = dims.build_mesh("cpu")
        torch.manual_seed(0)
        model = parallelize(DecoderLM(paper_like(mode, recompute, n_layers=3)), dims, mesh)
        rows = global_rows(4, dims.dp, dims.dp_rank(mesh))
        out.append((*_steps(model, batches(3, 4, 15), rows, dp_avg=True), [type(b).__name__ for b in model.blocks]))
    return out


def test_composes_with_fsdp2_and_ddp_on_two_ranks(tmp_path):
    """On 2 gloo ranks: FSDP2 with block, and with every:2 + stream recompute, bit-identical to FSDP2 without
    (same ops, same reductions); all, and DDP with block, equal to one process within float32 rounding."""
    from distributed_helpers import batches, spawn

    results = spawn(_dist_worker, 2, tmp_path, DIST_CASES)
    torch.manual_seed(0)
    one = _steps(DecoderLM(paper_like("none", n_layers=3)), batches(3, 4, 15), slice(None), dp_avg=False)
    for rank in results:
        plain, block, every2_rec, plain_rec, ddp_block = rank
        assert block[2] == ["FSDPCheckpointedBlock"] * 3 and plain[2] == ["FSDPBlock"] * 3
        assert every2_rec[2] == ["FSDPBlock", "FSDPCheckpointedBlock", "FSDPBlock"]
        assert ddp_block[2] == ["CheckpointedBlock"] * 3
        assert block[0] == plain[0] and every2_rec[0] == plain_rec[0]
        for k in plain[1]:
            assert torch.equal(block[1][k], plain[1][k]) and torch.equal(every2_rec[1][k], plain_rec[1][k]), k
        for losses, state, _ in rank:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(one[0]), rtol=1e-5, atol=0)
            for k, v in one[1].items():  # atol 1% of one AdamW step (lr 1e-2): Adam normalises a near-zero
                # gradient, so its float32 rounding in another reduction order moves the parameter by a visible
                # fraction of lr (head_merge.scale: 4.5e-5 with OMP_NUM_THREADS=1, under 2e-5 with 2 threads)
                torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_under_torch_compile_moe_loads_are_counted_once():
    """torch.compile (as the one-process trainer applies it): a checkpointed MoE block runs its checkpoint
    eagerly (dynamo falls back on a checkpoint whose forward mutates a buffer, and then would count the expert
    load again in the recompute); the losses and gradients agree to float32 rounding."""
    def run(mode: str, compiled: bool):
        model = build(paper_like(mode, n_layers=2, merge="sum", variant="paper"))
        call = torch.compile(model) if compiled else model
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        _, loss = call(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, [m.load for m in model.moe_layers()]

    ref_loss, ref_grads, ref_loads = run("none", False)
    loss, grads, loads = run("block", True)
    assert len(loads) == 1 and torch.equal(loads[0], ref_loads[0])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["block", "every:2"])
def test_fused_kernels_with_chained_backward(mode):
    """The GPU path (the mHC kernels, here through Triton's interpreter) inside ``chained_backward`` as the trainer
    runs it: a post's read-ahead and deferred gradient terms are not chained across a checkpointed block's
    boundary (the recompute runs outside the scope and reads anew), so gradients equal those without checkpointing
    to float32 rounding (the kernels sum in another order when not chained)."""
    pytest.importorskip("triton")
    from torch_mhc.nn import chained_backward
    from torch_mhc.ops import use_backend

    def run(mode):
        model = build(paper_like(mode))
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        with chained_backward():
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    with use_backend("triton"):
        ref_loss, ref = run("none")
        loss, grads = run(mode)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
