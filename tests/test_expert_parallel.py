"""Expert parallel (``parallel.ep``) and TP with MoE on 4 gloo ranks: the one-process loss curve, weights and
balancing bias of a 3-block MoE model (deepseek-v4 variant, head merge, n = 4); one host read per MoE layer
and forward (the all-to-all split sizes), none in backward; experts stored split over ``ep``; an FSDP2 x EP
DCP checkpoint loads under FSDP2 and in one process, and a one-process checkpoint under FSDP2 x EP (the global
weights and AdamW moments, exactly).

Tolerances as tests/test_distributed_dp.py explains: the gradients are the one-process sums taken in another
order (the expert rows of several ranks meet on the rank that holds the expert), float32 rounding, which
AdamW's division by sqrt(v) grows a little each step; rtol 1e-5 on the losses of 3 steps. Weights: atol 5e-5,
0.5% of one lr step: the V4 head merge's scale has a first gradient of exactly 0 and then ~1e-9, where AdamW's
g / sqrt(v) magnifies rounding (measured 2.8e-5 under TP x FSDP; its step-1 gradients agree to 4e-4 of their
largest element, as every parameter's does).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed_helpers import batches, spawn, tiny_model
from test_moe import CountSyncs
from torch_mhc.distributed import ParallelDims, global_rows, parallelize
from torch_mhc.distributed import checkpoint as dck
from torch_mhc.distributed.expert_parallel import host_reads
from torch_mhc.distributed.parallelize import clip_grad_norm_, sync_moe_load
from torch_mhc.distributed.runtime import load_full_state
from torch_mhc.distributed.tensor_parallel import reduce_tp_partial_grads, whole_tensor
from torch_mhc.train.config import ParallelConfig, UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS, BATCH, SEQ = 3, 8, 16
MOE = dict(n_layers=3, moe=True, n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16,
           first_dense_layers=1, moe_bias_rate=0.02, variant="deepseek-v4", merge="head")
LAYOUTS = [  # 4 ranks each
    {"dp_shard": 4, "ep": 2},  # FSDP2 x EP: experts over ep=2, FSDP over the other 2
    {"dp_shard": 4, "ep": 4},  # every rank holds 2 experts, experts not FSDP-sharded (dp_shard_mod_ep = 1)
    {"dp_replicate": 2, "dp_shard": 2, "ep": 2},  # HSDP x EP
    {"tp": 2, "dp_shard": 2},  # TP x FSDP with MoE: the MoE sublayer on each TP rank's share of the tokens
    {"tp": 2, "dp_shard": 2, "ep": 2},  # TP x FSDP x EP
]


def step(model, opt, x, y, mesh, dims):
    _, loss = model(x, y)
    loss.backward()
    if dims is not None and dims.tp > 1:
        reduce_tp_partial_grads(model, mesh["tp"])
    norm = (clip_grad_norm_ if dims is not None else torch.nn.utils.clip_grad_norm_)(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dims is not None:
        sync_moe_load(model, mesh)
    for moe in model.moe_layers():
        moe.update_bias()
    loss = loss.detach()
    if dims is not None:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss.item(), float(norm)


def whole_state(model) -> dict[str, torch.Tensor]:
    return {k: whole_tensor(v).detach().clone() for k, v in model.state_dict().items()}


def whole_optim(model, opt) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = get_state_dict(model, opt)[1]["state"]
    return {f"{n}.{k}": whole_tensor(v).clone() for n, st in state.items() for k, v in st.items() if v.dim() > 0}


def reload_in_fsdp(run_dir, world):
    """A plain FSDP2 model and AdamW (no EP) loading the EP checkpoint: its whole weights and moments."""
    dims = ParallelDims.from_config(ParallelConfig(dp_shard=world), world)
    model = parallelize(tiny_model(seed=1, **MOE), dims, dims.build_mesh("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dck.load_distributed(dck.dcp_dir(run_dir, STEPS), model, opt)
    return {"state": whole_state(model), "optim": whole_optim(model, opt)}


def ep_worker(rank, world, layouts, run_dir, one_process):
    out = []
    for i, settings in enumerate(layouts):
        dims = ParallelDims.from_config(ParallelConfig(**settings), world)
        mesh = dims.build_mesh("cpu")
        model = parallelize(tiny_model(**MOE), dims, mesh)
        rows = global_rows(BATCH, dims.dp, dims.dp_rank(mesh))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        curve = [step(model, opt, x[rows], y[rows], mesh, dims) for x, y in batches(STEPS, BATCH, SEQ)]
        experts = {n: (tuple(p.to_local().shape), p.device_mesh.mesh_dim_names) for n, p in model.named_parameters()
                   if n.endswith(".mlp.w1") and isinstance(p, DTensor)}
        reads = host_reads(model)
        x, y = batches(1, BATCH, SEQ, seed=5)[0]
        with CountSyncs() as counter:
            _, loss = model(x[rows], y[rows])
            loss.backward()
        out.append({"curve": curve, "state": whole_state(model), "experts": experts, "reads": reads,
                    "syncs": counter.syncs, "bias": [m.bias.clone() for m in model.moe_layers()]})
        if i == 0:  # a DCP checkpoint of FSDP2 x EP, loaded under plain FSDP2 (and in one process by the test)
            opt.zero_grad(set_to_none=True)
            dck.save_distributed(run_dir, STEPS, model, opt, {})
            out[-1].update(optim=whole_optim(model, opt), fsdp=reload_in_fsdp(run_dir, world))
            # a one-process checkpoint (step_*.pt: whole tensors, AdamW state by index) resumed under FSDP2 x EP
            model = parallelize(tiny_model(seed=3, **MOE), dims, mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            load_full_state(model, opt, one_process["model"], one_process["optim"])
            out[-1].update(from_one={"state": whole_state(model), "optim": whole_optim(model, opt)})
    return out


def reference():
    model = tiny_model(**MOE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    curve = [step(model, opt, x, y, None, None) for x, y in batches(STEPS, BATCH, SEQ)]
    names = [n for n, _ in model.named_parameters()]
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optim": opt.state_dict()}
    moments = {f"{names[i]}.{k}": v.clone() for i, st in opt.state_dict()["state"].items() for k, v in st.items()
               if v.dim() > 0}
    x, y = batches(1, BATCH, SEQ, seed=5)[0]
    with CountSyncs() as counter:
        _, loss = model(x, y)
        loss.backward()
    return {"curve": curve, "state": whole_state(model), "syncs": counter.syncs, "saved": saved,
            "moments": moments, "bias": [m.bias.clone() for m in model.moe_layers()]}


def test_expert_and_tensor_parallel_moe_match_one_process(tmp_path):
    ref = reference()
    run_dir = tmp_path / "run"
    results = spawn(ep_worker, 4, tmp_path, LAYOUTS, str(run_dir), ref["saved"])
    moe_layers = MOE["n_layers"] - MOE["first_dense_layers"]
    assert ref["curve"][0][0] != ref["curve"][-1][0]
    assert any((b != 0).any() for b in ref["bias"])  # the balancing bias moved
    for rank, per_rank in enumerate(results):
        for settings, r in zip(LAYOUTS, per_rank):
            what = f"rank {rank} {settings}"
            torch.testing.assert_close(torch.tensor(r["curve"]), torch.tensor(ref["curve"]), rtol=1e-5, atol=0,
                                       msg=lambda m, w=what: f"{w}: {m}")
            for k, v in ref["state"].items():  # atol 1% of one AdamW step (lr 1e-2): Adam normalises a near-zero
                # gradient (head_merge.scale's), so its float32 rounding moves the parameter by up to ~1e-4
                torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-4,
                                           msg=lambda m, k=k, w=what: f"{w} {k}: {m}")
            for got, want in zip(r["bias"], ref["bias"]):  # the load summed over the right group
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, w=what: f"{w} bias: {m}")
            ep = settings.get("ep", 1)
            if ep > 1:
                # each rank stores E/ep experts (FSDP2 may cut them further over dp_shard_mod_ep)
                assert len(r["experts"]) == moe_layers, what
                for shape, names in r["experts"].values():
                    assert "ep" in names and shape[0] * ep * (4 // (ep * settings.get("tp", 1)) // settings.get(
                        "dp_replicate", 1)) >= MOE["n_routed_experts"] >= shape[0] * ep, (what, shape, names)
                # one read per MoE layer and forward (the split sizes), none in backward: STEPS forwards
                assert r["reads"] == STEPS * moe_layers, what
                extra = dict(r["syncs"])
                assert extra.pop("Tensor.tolist") == moe_layers, what
            else:
                extra = dict(r["syncs"])
                assert r["reads"] == 0
            if settings.get("tp", 1) > 1:  # DTensor's row-parallel embedding masks the ids of other ranks' rows
                assert extra.pop("aten.index_put_.default") == 1, what  # (a boolean index_put_, not the MoE path)
            # no other read than the one-process model's (the mHC connections' finiteness checks)
            assert extra == ref["syncs"], (what, extra, ref["syncs"])
    # the FSDP2 x EP checkpoint holds the global tensors: loaded under FSDP2 without EP, and in one process, the
    # weights and AdamW moments are the EP run's bit for bit
    ep_run = results[0][0]
    for rank in range(4):
        fsdp = results[rank][0]["fsdp"]
        assert fsdp["state"].keys() == ep_run["state"].keys() and fsdp["optim"].keys() == ep_run["optim"].keys()
        for k in ep_run["state"]:
            assert torch.equal(fsdp["state"][k], ep_run["state"][k]), k
        for k in ep_run["optim"]:
            assert torch.equal(fsdp["optim"][k], ep_run["optim"][k]), k
    for rank in range(4):  # and a one-process checkpoint loads into FSDP2 x EP: its weights and moments exactly
        loaded = results[rank][0]["from_one"]
        assert loaded["state"].keys() == ref["saved"]["model"].keys()
        assert loaded["optim"].keys() == ref["moments"].keys()
        for k, v in ref["saved"]["model"].items():
            assert torch.equal(loaded["state"][k], v), k
        for k, v in ref["moments"].items():
            assert torch.equal(loaded["optim"][k], v), k
    one = tiny_model(seed=2, **MOE)
    dck.load_distributed(dck.dcp_dir(run_dir, STEPS), one)
    for k, v in one.state_dict().items():
        assert torch.equal(v, ep_run["state"][k]), k


def test_expert_parallel_layouts_that_cannot_work_are_refused():
    from types import SimpleNamespace

    from torch_mhc.distributed.runtime import layout_problems
    from torch_mhc.models import ModelConfig

    def problems(model, **parallel):
        cfg = SimpleNamespace(model=ModelConfig(**model), parallel=ParallelConfig(**parallel), batch_size=8)
        return "; ".join(layout_problems(cfg))

    assert problems({"moe": True}, dp_shard=4, ep=2) == ""
    assert "parallel.ep (2) > 1 needs an MoE model" in problems({}, dp_shard=4, ep=2)
    assert "parallel.ep (3) must divide model.n_routed_experts (8)" in problems({"moe": True}, dp_shard=3, ep=3)
    assert "parallel.ep (2) must divide parallel.dp_shard (3)" in problems({"moe": True}, dp_shard=3, ep=2)
    assert "parallel.ep > 1 needs parallel.dp_mode=fsdp" in problems(
        {"moe": True}, dp_mode="ddp", dp_replicate=2, dp_shard=1, ep=2)
    with pytest.raises(UserError, match=r"parallel.ep \(2\) must divide parallel.dp_shard \(3\)"):
        ParallelDims.from_config(ParallelConfig(ep=2), 3)
