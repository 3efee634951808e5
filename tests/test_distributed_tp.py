"""Tensor + sequence parallel on 2 gloo ranks: forward output and every gradient equal the unsharded
model's, the mHC parameters (per-token maps on each rank's token shard) included."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from distributed_helpers import batches, spawn, tiny_model
from test_distributed_dp import full_state
from torch_mhc.distributed import ParallelDims, parallelize
from torch_mhc.distributed.tensor_parallel import reduce_tp_partial_grads, tp_partial_params
from torch_mhc.train.config import ParallelConfig, UserError

MODELS = {
    "mhc": {},
    "mhc-v4-head": {"variant": "deepseek-v4", "merge": "head"},
    "hc": {"connection": "hc"},
}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def tp_worker(rank, world, settings):
    out = {}
    for name, overrides in MODELS.items():
        dims = ParallelDims.from_config(ParallelConfig(**settings), world)
        mesh = dims.build_mesh("cpu")
        model = parallelize(tiny_model(**overrides), dims, mesh)
        partial = {n for n, p in model.named_parameters() if any(p is q for q in tp_partial_params(model))}
        x, y = batches(1, 2, 16, seed=3)[0]
        logits, loss = model(x, y)
        loss.backward()
        reduce_tp_partial_grads(model, mesh["tp"])
        out[name] = {"logits": logits.detach(), "loss": loss.item(), "grads": grads(model), "partial": partial,
                     "state": full_state(model)}
    return out


def test_tp_sp_matches_unsharded(tmp_path):
    results = spawn(tp_worker, 2, tmp_path, {"tp": 2, "dp_shard": 1})
    for name, overrides in MODELS.items():
        ref = tiny_model(**overrides)
        x, y = batches(1, 2, 16, seed=3)[0]
        logits, loss = ref(x, y)
        loss.backward()
        ref_grads = grads(ref)
        for r in results:
            r = r[name]
            torch.testing.assert_close(r["logits"], logits.detach(), rtol=1e-5, atol=1e-6)
            assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
            assert r["state"].keys() == ref.state_dict().keys()
            # the connections' parameters are the replicated ones, reduced over the TP group
            assert r["partial"] and all(".sublayer." not in n and not n.startswith(("embed", "lm_head", "norm"))
                                        for n in r["partial"])
            assert any(n.endswith((".phi", ".fn", ".static_res")) for n in r["partial"])
            for n, g in ref_grads.items():
                torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_tp_rejects_bad_settings():
    with pytest.raises(UserError, match=r"parallel.tp \(3\) must divide model.n_heads \(2\)"):
        from torch_mhc.distributed.tensor_parallel import check_tensor_parallel

        check_tensor_parallel(tiny_model(), 3)
