"""Issue 19 item 7: a parallelized model is built on the meta device on every rank and filled from rank 0,
one tensor at a time, under FSDP2, HSDP, TP and TP x FSDP: every rank's shards are bit-identical to those of
the plain build (the whole model built on every rank, then parallelized), and no rank but 0 ever builds a
``DecoderLM`` with real (non-meta) tensors. (Under TP x FSDP the qkv weight is strided on both mesh dims, and
``distribute_tensor`` cuts it differently from ``fully_shard``: this test caught that on the first try.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from distributed_helpers import spawn, tiny_config
from torch_mhc.distributed import ParallelDims, global_rows, parallelize, runtime
from torch_mhc.models import DecoderLM
from torch_mhc.train.config import ParallelConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYOUTS = {4: {"fsdp": {"dp_shard": 4}, "hsdp": {"dp_replicate": 2, "dp_shard": 2},
               "tp-fsdp": {"tp": 2, "dp_shard": 2}},
           2: {"tp": {"tp": 2, "dp_shard": 1}}}
DENSE = dict(n_layers=3, variant="deepseek-v4", merge="head")
MOE = dict(DENSE, moe=True, n_routed_experts=4, first_dense_layers=1)  # TP with MoE is refused (no EP yet)


def local(model) -> dict[str, torch.Tensor]:
    return {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}


def build_worker(rank, world):
    built_on = []
    init = DecoderLM.__init__

    def recording_init(self, cfg):  # which device each DecoderLM this rank builds lives on
        init(self, cfg)
        built_on.append(self.embed.weight.device.type)

    out = {}
    for name, settings in LAYOUTS[world].items():
        cfg = tiny_config(**(DENSE if name.startswith("tp") else MOE))
        dims = ParallelDims.from_config(ParallelConfig(**settings), world)
        mesh = dims.build_mesh("cpu")
        torch.manual_seed(0)
        plain = local(parallelize(DecoderLM(cfg), dims, mesh))
        ctx = runtime.DistContext(dims, mesh, dist.get_rank(), global_rows(8, dims.dp, dims.dp_rank(mesh)))
        torch.manual_seed(0)
        DecoderLM.__init__ = recording_init
        try:
            model = runtime.build_model(cfg, ctx, torch.device("cpu"))
        finally:
            DecoderLM.__init__ = init
        out[name] = {"plain": plain, "meta": local(model), "built_on": list(built_on)}
        built_on.clear()
    return out


def test_sharded_layouts_are_built_on_meta_and_filled_from_rank0(tmp_path):
    for world in LAYOUTS:
        for rank, r in enumerate(spawn(build_worker, world, tmp_path)):
            for name in LAYOUTS[world]:
                assert r[name]["built_on"] == (["cpu", "meta"] if rank == 0 else ["meta"]), (rank, name)
                plain, meta = r[name]["plain"], r[name]["meta"]
                assert plain.keys() == meta.keys()
                for k, v in plain.items():
                    assert torch.equal(meta[k], v), (world, rank, name, k)
