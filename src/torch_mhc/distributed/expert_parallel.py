"""Expert parallel: each MoE layer's routed experts split over the ``ep`` ranks of a group, tokens sent to the
rank that holds their expert and back with ``all_to_all_single`` (uneven splits).

The ``ep`` group lies inside the data-parallel shard group (``dp_shard = dp_shard_mod_ep x ep``, as
torchtitan's DeepSeek-V3 places it; :meth:`ParallelDims.expert_mesh`), so its ranks hold different tokens.
Every rank routes its own tokens with the whole router and bias, and sorts its ``tokens x top_k`` rows by
expert (``MoE.forward``). Rank r of the group holds experts ``[r E/ep, (r+1) E/ep)`` (``Shard(0)`` of the
``[E, ...]`` weights over ``ep``), so the rows for rank r are one run of that sorted buffer:

1. the per-expert counts go to the ranks that hold the experts (an all-to-all of ``E/ep`` numbers per peer);
2. one device-to-host read per layer: the rows each peer sends and receives (``all_to_all_single`` takes
   its split sizes as Python ints, and the buffer received has their sum as its length, so a shape here
   depends on the routing and must be read; everything before and after stays on the device);
3. the rows go out (``all_to_all_single``, uneven splits); they arrive ordered by source rank, then
   local expert, and are regrouped by local expert (a stable sort on the device);
4. the local experts run grouped (``models.moe.grouped_swiglu``: one grouped GEMM per projection);
5. the outputs return in received order through the reverse all-to-all, and ``MoE.forward`` combines them.

Backward runs the two all-to-alls the other way with the forward's split sizes: no read. Under activation
checkpointing the recompute of a block makes its layers' reads again.

Gradients: a local expert's gradient sums the contributions of every peer's tokens, that is ``ep`` ranks'
losses, where FSDP2 (over ``dp_shard_mod_ep``, and ``dp_replicate``) averages over the remaining ranks only:
the local weights' gradient is scaled by ``1 / ep`` in backward, so the update is the one-process one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from torch_mhc.models.moe import MoE, grouped_swiglu


class _AllToAll(torch.autograd.Function):
    """``x [sum(send), ...]`` -> ``[sum(recv), ...]``: ``send[i]`` rows to peer i, ``recv[i]`` rows from it."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


class ExpertParallel:
    """``MoE.experts_fn`` under expert parallel: ``grouped_swiglu``'s arguments (rows sorted by global
    expert ``xs [N, dim]``, ``counts [E]`` on the device, weights ``[E, ...]`` as DTensors sharded over
    ``ep``) -> the expert outputs ``[N, dim]`` in the same order. ``host_reads`` counts step 2's reads."""

    def __init__(self, ep_mesh: DeviceMesh, n_experts: int):
        self.group, self.ep = ep_mesh.get_group(), ep_mesh.size()
        if n_experts % self.ep:
            raise ValueError(f"parallel.ep ({self.ep}) must divide the number of routed experts ({n_experts})")
        self.local = n_experts // self.ep
        self.host_reads = 0

    def __call__(self, xs, counts, w1, w3, w2, capacity=None, impl="auto", block=None):
        ep, local = self.ep, self.local
        w1, w3, w2 = (_ScaleGrad.apply(w.to_local() if isinstance(w, DTensor) else w, 1.0 / ep) for w in (w1, w3, w2))
        send_counts = counts.view(ep, local)  # [peer, its expert]: rows this rank sends
        recv_counts = torch.empty_like(send_counts)  # [source, my expert]: rows this rank receives
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The one read per layer (see the module docstring, step 2): the split sizes as Python ints.
        sizes = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        self.host_reads += 1
        send, recv = sizes[:ep], sizes[ep:]
        received = _AllToAll.apply(xs, send, recv, self.group)
        n_recv = received.shape[0]
        ends = recv_counts.flatten().cumsum(0)  # received rows: source-major, then local expert
        run = torch.searchsorted(ends, torch.arange(n_recv, device=xs.device), right=True)
        order = torch.argsort(run % local, stable=True)  # grouped by local expert, sources in order within
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n_recv, device=xs.device))
        ys = grouped_swiglu(received.index_select(0, order), recv_counts.sum(0), w1, w3, w2, impl=impl, block=block)
        return _AllToAll.apply(ys.index_select(0, inverse), recv, send, self.group)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every MoE layer's routed experts (``w1, w3, w2 [E, ...]``) over ``ep_mesh`` (``Shard(0)``:
    a rank keeps ``E / ep`` whole experts) and route their rows through :class:`ExpertParallel`. In place;
    parameter names do not change. Works on the meta device (no communication: each rank cuts its part of
    its own copy, which every rank builds alike)."""
    for moe in moe_layers(model):
        for name in ("w1", "w3", "w2"):
            p = getattr(moe, name)
            shard = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(moe, name, nn.Parameter(shard, requires_grad=p.requires_grad))
        moe.experts_fn = ExpertParallel(ep_mesh, moe.n_routed)


def host_reads(model: nn.Module) -> int:
    """The device-to-host reads the expert-parallel dispatch of ``model`` has made (one per layer and forward)."""
    return sum(m.experts_fn.host_reads for m in moe_layers(model) if isinstance(m.experts_fn, ExpertParallel))
