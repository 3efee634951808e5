"""Data parallel on gloo (CPU): FSDP2 and DDP on 2 ranks and HSDP on 4 follow the one-process loss
curve on the same global batches.

Tolerance: the data-parallel gradient is the mean of per-rank means, i.e. the same sum as one
process taken in another order (and FSDP2 reduce-scatters in fp32), so the first step agrees to
float32 rounding (~1e-7 relative); AdamW then divides by sqrt(v) and the differences grow a little
each step. rtol 1e-5 over 4 steps leaves about 10x room over what we measure and still catches any
real mistake (a wrong slice, a missing gradient average, double counting: those show at 1e-2).
Parameters after the steps: AdamW's g / sqrt(v) is ill-conditioned for elements whose gradient is
near 0, where a rounding-level change of g moves the update by a visible fraction of one lr step;
atol 2e-5 is 0.2% of one step (lr 1e-2), we measure up to ~3e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed_helpers import batches, spawn, tiny_model
from torch_mhc.distributed import ParallelDims, global_rows, parallelize
from torch_mhc.distributed.parallelize import clip_grad_norm_, sync_moe_load
from torch_mhc.train.config import ParallelConfig

STEPS, BATCH, SEQ = 4, 8, 16


def train(model, data, rows=slice(None), dp_avg=None, max_norm=0.5):
    """A few AdamW steps with clipping; returns the losses of the global batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in data:
        _, loss = model(x[rows], y[rows])
        loss.backward()
        clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.cfg.moe:
            if dist.is_initialized():
                sync_moe_load(model)
            for moe in model.moe_layers():
                moe.update_bias()
        loss = loss.detach()
        if dp_avg is not None:
            dist.all_reduce(loss, group=dp_avg)
            loss /= dist.get_world_size(dp_avg)
        losses.append(loss.item())
    return losses


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def dp_worker(rank, world, cases):
    out = []
    for settings, model_overrides in cases:
        dims = ParallelDims.from_config(ParallelConfig(**settings), world)
        mesh = dims.build_mesh("cpu")
        model = parallelize(tiny_model(**model_overrides), dims, mesh)
        rows = global_rows(BATCH, dims.dp, dims.dp_rank(mesh))
        losses = train(model, batches(STEPS, BATCH, SEQ), rows, dp_avg=dist.group.WORLD)
        out.append({"losses": losses, "state": full_state(model)})
    return out


def reference(model_overrides: dict):
    model = tiny_model(**model_overrides)
    return {"losses": train(model, batches(STEPS, BATCH, SEQ)), "state": full_state(model)}


MOE = {"moe": True, "n_routed_experts": 4, "top_k": 2, "first_dense_layers": 1, "merge": "head",
       "tie_embeddings": True}
CASES = {  # world size -> (parallel settings, model overrides); one set of processes per world size
    2: [({"dp_mode": "fsdp"}, {}), ({"dp_mode": "ddp", "dp_replicate": 2, "dp_shard": 1}, {}),
        ({"dp_mode": "fsdp"}, MOE)],
    4: [({"dp_mode": "fsdp", "dp_replicate": 2, "dp_shard": 2}, {})],
}


@pytest.mark.parametrize("world", CASES, ids=["fsdp2-ddp-fsdp2moe-2", "hsdp-2x2"])
def test_data_parallel_matches_one_process(tmp_path, world):
    results = spawn(dp_worker, world, tmp_path, CASES[world])
    for i, (settings, model_overrides) in enumerate(CASES[world]):
        ref = reference(model_overrides)
        for r in results:
            r = r[i]
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0,
                                       msg=lambda m, s=settings: f"{s}: {m}")
            for k, v in ref["state"].items():
                torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
        init = tiny_model(**model_overrides).state_dict()
        assert all((ref["state"][k] - init[k]).abs().max() > 1e-3 for k in init if k.endswith("weight"))  # trained
