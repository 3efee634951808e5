"""Pipeline parallel on 2 gloo ranks: 1F1B over 2 stages, interleaved 1F1B over 4 stages (2 per
rank), ZBVZeroBubble and DualPipeV over 4 stages in a V; the stage tensor is the [b, S, n, C] stream
state. Loss and every gradient equal the unpipelined model's."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from distributed_helpers import batches, spawn, tiny_model
from torch_mhc.distributed.pipeline import build_stages, p2p_bytes_per_step, pipeline_loss, stage_bounds

OVERRIDES = {"n_layers": 4, "merge": "head"}


def pp_worker(rank, world):
    out = {}
    x, y = batches(1, 4, 16, seed=11)[0]
    v = [rank, 2 * world - 1 - rank]  # the V: rank 0 runs the first and the last stage
    for name, schedule, stage_ids, micro in (("1f1b", Schedule1F1B, [rank], 2),
                                             ("interleaved", ScheduleInterleaved1F1B, [rank, rank + world], 2),
                                             ("zbv", ScheduleZBVZeroBubble, v, 4),
                                             ("dualpipev", ScheduleDualPipeV, v, 4)):
        model = tiny_model(**OVERRIDES)
        n_stages = world * len(stage_ids)
        stages = build_stages(model, stage_ids, n_stages, 4 // micro, 16, torch.device("cpu"))
        sched = schedule(stages if len(stages) > 1 else stages[0], n_microbatches=micro, loss_fn=pipeline_loss)
        losses = []
        is_first = any(s.is_first for s in stages)
        is_last = any(s.is_last for s in stages)
        sched.step(*([x] if is_first else []), target=y if is_last else None, losses=losses)
        loss = torch.stack(losses).mean() if is_last else torch.zeros(())
        dist.all_reduce(loss)  # only the last stage holds it
        grads = {n: p.grad.clone() for s in stages for n, p in s.submod.named_parameters() if p.grad is not None}
        out[name] = {"loss": loss.item(), "grads": grads,
                     "owned": [n for s in stages for n, _ in s.submod.named_parameters()]}
    return out


def test_pipeline_matches_unpipelined(tmp_path):
    ref = tiny_model(**OVERRIDES)
    x, y = batches(1, 4, 16, seed=11)[0]
    _, loss = ref(x, y)
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    results = spawn(pp_worker, 2, tmp_path)
    for name in ("1f1b", "interleaved", "zbv", "dualpipev"):
        owned = [n for r in results for n in r[name]["owned"]]
        assert sorted(owned) == sorted(ref_grads)  # every parameter on exactly one stage, same names
        for r in results:
            assert abs(r[name]["loss"] - loss.item()) < 1e-5 * loss.item()
            for n, g in r[name]["grads"].items():
                torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        assert sum(len(r[name]["grads"]) for r in results) == len(ref_grads)


def test_stage_bounds_and_traffic():
    assert stage_bounds(5, 2) == [(0, 3), (3, 5)]
    assert stage_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    t = p2p_bytes_per_step(batch=8, seq_len=16, dim=32, n_streams=4, n_stages=2, bytes_per_element=4)
    assert t["mhc"] == 4 * t["residual"] == 4 * 2 * 8 * 16 * 32 * 4
