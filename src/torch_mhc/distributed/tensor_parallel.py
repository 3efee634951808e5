"""Tensor parallel with sequence parallel (Megatron-style) on DTensor ``parallelize_module``.

Between sublayers every TP rank holds its own share of the tokens: the stream state
``[B, S/tp, n, C]`` is a plain local tensor. The mHC coefficient, pre and post maps are per token,
so they run on that local share with no communication; their parameters (phi, bias, alpha; HC's;
the head merge's) stay plain replicated tensors, and their gradients, partial sums over each rank's
tokens, are summed over the TP group by :func:`reduce_tp_partial_grads` after backward.

Inside a sublayer: the norm runs sequence-parallel, the tokens are all-gathered, ``qkv`` / ``w1`` /
``w3`` are column-parallel (each rank a share of the heads / hidden units), ``proj`` / ``w2``
row-parallel with a reduce-scatter back to the token shards. The fused ``qkv`` weight
``[3C, C]`` is sharded as ``_StridedShard(0, split_factor=3)`` so each rank holds the rows of its
heads in q, k and v alike. The embedding is row-parallel into token shards; the LM head
column-parallel with the full logits on every rank (the loss is then the same on all TP ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from torch_mhc.errors import UserError


class FusedQKVColwise(ColwiseParallel):
    """Column parallel for a fused ``[3C, C]`` q|k|v weight: rank r holds q_r, k_r and v_r."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in module.named_parameters():
            dist_param = distribute_tensor(param, device_mesh, [_StridedShard(0, split_factor=3)])
            module.register_parameter(pname, nn.Parameter(dist_param, requires_grad=param.requires_grad))

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        # the output is strided-sharded on the last dim like the weight's rows: this rank's q|k|v heads
        return outputs.to_local()


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """UserError naming what keeps ``model`` from tensor parallel of degree ``tp`` (mesh.model_layout_errors)."""
    from torch_mhc.distributed.mesh import ParallelConfig, model_layout_errors

    problems = model_layout_errors(ParallelConfig(tp=tp), model.cfg)
    if problems:
        raise UserError("invalid parallel settings: " + "; ".join(problems) + ".")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard ``model``'s attention and dense FFN weights over ``tp_mesh`` and make it sequence-parallel.

    An MoE FFN sublayer (norm, router, shared and routed experts) is not split: it runs on this rank's share
    of the tokens, as the connections do (every op of it is per token), with its parameters replicated over
    the TP group and their gradients summed over it (:func:`reduce_tp_partial_grads`); under expert parallel
    its experts are split over ``ep`` instead. So TP ranks route different tokens (their expert loads add)."""
    check_tensor_parallel(model, tp_mesh.size())
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.blocks:
        plan = {
            "attn.sublayer.norm": SequenceParallel(),
            "attn.sublayer.qkv": FusedQKVColwise(input_layouts=Shard(1)),
            "attn.sublayer.proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if not is_moe_block(block):
            plan.update({
                "ffn.sublayer.norm": SequenceParallel(),
                "ffn.sublayer.mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "ffn.sublayer.mlp.w1": ColwiseParallel(),
                "ffn.sublayer.mlp.w3": ColwiseParallel(),
                "ffn.sublayer.mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
            })
        parallelize_module(block, tp_mesh, plan)


def is_moe_block(block: nn.Module) -> bool:
    from torch_mhc.models.moe import MoE

    return any(isinstance(m, MoE) for m in block.modules())


def tp_partial_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated over the TP group whose gradients are per-rank partial sums: the ones
    that are not DTensors on a mesh with a ``tp`` dimension (connections and the head merge)."""
    out = []
    for p in model.parameters():
        names = (p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()
        if "tp" not in names:
            out.append(p)
    return out


@torch.no_grad()
def reduce_tp_partial_grads(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Sum the gradients of :func:`tp_partial_params` over the TP group (after backward, before
    clipping). Under FSDP2 the gradient is this rank's data-parallel shard; the sums commute."""
    group = tp_mesh.get_group()
    for p in tp_partial_params(model):
        if p.grad is not None:
            dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=group)


def _shards_dim0(p) -> bool:
    return isinstance(p, (Shard, _StridedShard)) and p.dim == 0


MODEL_PARALLEL_DIMS = ("tp", "ep")  # a tensor is split over one of them at most (experts: ep, the rest: tp)


def _split(dt: DTensor) -> tuple[int | None, list[int]]:
    """``dt``'s model-parallel mesh dim (``tp``, or ``ep`` for experts; None without one) and its other mesh
    dims that shard tensor dim 0 (FSDP's)."""
    names = dt.device_mesh.mesh_dim_names or ()
    tp = next((names.index(n) for n in MODEL_PARALLEL_DIMS if n in names), None)
    dp = [d for d, p in enumerate(dt.placements) if d != tp and not p.is_replicate()]
    if any(not _shards_dim0(dt.placements[d]) for d in dp):
        raise NotImplementedError(f"a data-parallel placement other than a dim-0 shard: {dt.placements}")
    return tp, dp


def whole_tensor(dt: torch.Tensor) -> torch.Tensor:
    """The global tensor of ``dt`` (itself when it is not a DTensor). Collective over ``dt``'s mesh.
    Expert-parallel weights (``Shard(0)`` over ``ep``, FSDP's shard of that over ``dp_shard_mod_ep``) go the
    same way as tensor-parallel ones, ``ep`` in TP's place.

    FSDP over tensor parallel shards dim 0 of each rank's TP part (``_StridedShard`` on the
    data-parallel dim, over TP's ``Shard``/``_StridedShard``); DTensor's own ``full_tensor()`` of the
    fused qkv (strided on both mesh dims) returns its rows in another order (measured in torch 2.13;
    the column-parallel FFN weights, ``Shard`` under TP, come out right). So FSDP's shard is gathered
    first (the TP part, ``torch.chunk`` rows per data-parallel rank), then TP's, which DTensor
    gathers right; every such tensor goes the same way."""
    if not isinstance(dt, DTensor):
        return dt
    tp, dp = _split(dt)
    if tp is None or not dp:
        return dt.full_tensor()
    (d,) = dp
    mesh, local = dt.device_mesh, dt.to_local()
    rows = dt.shape[0] // mesh.size(tp) if _shards_dim0(dt.placements[tp]) else dt.shape[0]
    sizes = [c.shape[0] for c in torch.empty(rows).chunk(mesh.size(d))]
    sizes += [0] * (mesh.size(d) - len(sizes))
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=mesh.get_group(d))
    tp_part = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    tp_mesh = mesh[mesh.mesh_dim_names[tp]]
    return DTensor.from_local(tp_part, tp_mesh, [dt.placements[tp]], run_check=False).full_tensor()


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global tensor ``whole`` in ``like``'s layout (the inverse of
    :func:`whole_tensor`; no communication: every rank passes the same ``whole``)."""
    if not isinstance(like, DTensor):
        return whole
    tp, dp = _split(like)
    if tp is None or not dp:
        return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
    (d,) = dp
    mesh = like.device_mesh
    tp_mesh = mesh[mesh.mesh_dim_names[tp]]
    tp_part = distribute_tensor(whole, tp_mesh, [like.placements[tp]], src_data_rank=None).to_local()
    chunks = tp_part.chunk(mesh.size(d))
    i = mesh.get_local_rank(d)
    local = chunks[i] if i < len(chunks) else tp_part[:0]
    return DTensor.from_local(local.contiguous(), mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())
