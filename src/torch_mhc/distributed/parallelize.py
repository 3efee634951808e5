"""Apply parallelism to a built ``DecoderLM`` (torchtitan's order): tensor/sequence parallel -> expert
parallel -> activation checkpointing -> torch.compile -> data parallel (FSDP2 or DDP).

The model itself holds no parallel code. Activation checkpointing (``model.activation_checkpoint``) is
applied here by :func:`apply_activation_checkpoint`, which the one-process trainer calls too. mHC's own
selective recompute stays the model's setting (``model.recompute``); it runs unchanged inside each rank,
and composes with activation checkpointing (inside a checkpointed block nothing is saved for it to drop;
it still drops the states of the blocks that are not checkpointed).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from torch_mhc.distributed.mesh import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, *, compile: bool = False,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard/replicate ``model`` in place over ``mesh`` and return it (same class, same parameter names).

    ``param_dtype``: FSDP2 mixed precision (e.g. bf16 on GPU: parameters all-gathered in bf16,
    gradients reduced in fp32); None keeps the parameters' dtype.
    """
    if dims.tp > 1:
        from torch_mhc.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    if dims.ep > 1:
        from torch_mhc.distributed.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, dims.expert_mesh(mesh)["ep"])
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        apply_activation_checkpoint(model, cfg.activation_checkpoint)
    if compile:
        for block in model.blocks:
            block.compile()
    dp_mesh = dims.dp_mesh(mesh)
    if dp_mesh is None:
        return model
    if dims.dp_mode == "ddp":
        apply_ddp(model, dp_mesh)
    else:
        apply_fsdp(model, dp_mesh, param_dtype, dims.expert_dp_mesh(mesh) if dims.ep > 1 else None)
    return model


def checkpointed_blocks(mode: str, n_blocks: int) -> list[int]:
    """The indices of the blocks that ``mode`` checkpoints: none -> [], block -> all, every:K -> one block
    in K (torchtitan's ``ac_freq``: blocks K-1, 2K-1, ...)."""
    from torch_mhc.models.decoder import ModelConfig

    every = ModelConfig(activation_checkpoint=mode).checkpoint_every
    return [] if every == 0 else [i for i in range(n_blocks) if (i + 1) % every == 0]


class _Checkpointed:
    """Mixed into a block's class (the block keeps its own class, attributes, parameter names and state-dict
    keys): its forward runs under ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only the block's
    inputs and re-runs its forward in backward. Without gradients (eval, sampling) the forward is plain."""

    def forward(self, *args, read_ahead=None, reader=None, **kwargs):
        """The block's forward; under gradients it takes no read-ahead and computes none (the recompute reads its
        input anew), so the block returns (streams, None)."""
        forward = super().forward
        if not torch.is_grad_enabled():
            return forward(*args, read_ahead=read_ahead, reader=reader, **kwargs)
        if not self._checkpoint_moe:
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return _checkpoint_keeping_moe_load(self, forward, *args, **kwargs)

    def first_reader(self):
        return None if torch.is_grad_enabled() else super().first_reader()


@torch.compiler.disable
def _checkpoint_keeping_moe_load(block: nn.Module, forward, *args, **kwargs):
    """A checkpointed block with MoE layers, which count their expert load in forward: the load is restored after
    the recompute. Eager also under torch.compile (dynamo traces neither a checkpoint whose forward mutates a
    buffer nor a context_fn; it would fall back to a checkpoint that counts the load twice); a dense block's
    checkpoint is traced and compiled."""
    return torch.utils.checkpoint.checkpoint(
        forward, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _keep_moe_load(block)),
        **kwargs)


class _keep_moe_load:
    """Around a block's recompute: its MoE layers count their expert load once per forward, not again.
    (Reusable: torch may enter the recompute context once per recompute of the block's graph.)"""

    def __init__(self, block: nn.Module):
        from torch_mhc.models.moe import MoE

        self.moes = [m for m in block.modules() if isinstance(m, MoE)]

    def __enter__(self):
        self.loads = [m.load.clone() for m in self.moes]

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, load in zip(self.moes, self.loads):
                m.load.copy_(load)


_CHECKPOINTED_CLASSES: dict[type, type] = {}


def apply_activation_checkpoint(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint the blocks of ``model`` (a ``DecoderLM``) that ``mode`` names (``none``, ``block``,
    ``every:K``), in place. Parameter names and state-dict keys do not change (the block's class becomes a
    subclass of its own whose forward is checkpointed), so checkpoints load either way. Under the fused kernels,
    the read-ahead is not handed across a checkpointed block's boundary (``_Checkpointed``: the recompute reads
    its input anew). Call it before torch.compile and data parallel, as
    :func:`parallelize` does; idempotent."""
    if mode == "none":
        return model
    from torch_mhc.models.moe import MoE

    blocks = list(model.blocks)
    chosen = checkpointed_blocks(mode, len(blocks))
    for i in chosen:
        block = blocks[i]
        cls = type(block)
        if isinstance(block, _Checkpointed):
            continue
        if cls not in _CHECKPOINTED_CLASSES:
            _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
        block.__class__ = _CHECKPOINTED_CLASSES[cls]
        block._checkpoint_moe = any(isinstance(m, MoE) for m in block.modules())
    return model


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               expert_dp_mesh: DeviceMesh | None = None) -> None:
    """FSDP2: each block is one unit (its own all-gather / reduce-scatter), the root holds the rest
    (embedding, final norm, head merge, LM head). A 2-D ``(dp_replicate, dp_shard)`` mesh is HSDP.

    Under expert parallel (``expert_dp_mesh``: the ranks that hold the same experts) each MoE layer's
    experts, already split over ``ep``, are their own unit sharded over ``expert_dp_mesh``; its router
    and shared experts are one unit over ``dp_mesh``, as the rest of the block."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed again first in backward: keep them gathered
        fully_shard_block(block, dp_mesh, mp, reshard_after_forward=i < n - 1, expert_dp_mesh=expert_dp_mesh)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def fully_shard_block(block: nn.Module, dp_mesh: DeviceMesh, mp: MixedPrecisionPolicy, reshard_after_forward: bool,
                      expert_dp_mesh: DeviceMesh | None = None) -> None:
    """One block as one FSDP2 unit over ``dp_mesh``; under expert parallel (``expert_dp_mesh``) each MoE layer's
    experts (``w1, w3, w2``, already split over ``ep``) are their own unit over ``expert_dp_mesh`` and its router
    and shared experts another over ``dp_mesh``. Used unpipelined and by each pipeline stage."""
    from torch_mhc.models.moe import MoE

    for moe in (m for m in block.modules() if isinstance(m, MoE)) if expert_dp_mesh is not None else ():
        fully_shard([moe.router] + ([moe.shared] if moe.shared is not None else []), mesh=dp_mesh,
                    mp_policy=mp, reshard_after_forward=reshard_after_forward)
        fully_shard(moe, mesh=expert_dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    """Plain data parallel (PyTorch DDP through the composable ``replicate``; names stay unchanged)."""
    from torch.distributed._composable.replicate import replicate

    cfg = getattr(model, "cfg", None)
    # MoE experts that receive no token, and phi of static mHC, get no gradient in some steps
    unused = cfg is not None and (cfg.moe or not cfg.dynamic)
    replicate(model, device_mesh=dp_mesh, find_unused_parameters=unused)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over plain and DTensor (sharded) gradients; returns the global norm."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    norms = [torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in grads]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]  # a sharded grad's norm is partial
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0).item()  # as torch's clip_grad_norm_ computes it
    for g in grads:  # one by one: plain and DTensor grads (on different meshes) do not mix in a foreach op
        g.mul_(coef)
    return total


def sync_moe_load(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """Sum every MoE layer's expert-load counts over the ranks that route other tokens through the same layers,
    so the load-balancing bias update is the one-process update, and the same on each of them.

    The load is counted at the router, per global expert, of this rank's tokens. The group is every
    rank that holds the same layers: the data-parallel ranks (``dp_replicate x dp_shard``, whose
    ``ep`` part routes its own tokens too) and the tensor-parallel ones (an MoE sublayer runs on the
    rank's share of the tokens under TP), not the pipeline stages (other layers: a sum over the world
    would add one stage's layer to another's). ``mesh``: the run's mesh (None: the whole world). One
    all-reduce per mesh dimension of all layers' loads at once."""
    moes = model.moe_layers()
    if not moes:
        return
    loads = torch.cat([m.load for m in moes])
    if mesh is None:
        dist.all_reduce(loads)
    else:
        for name in mesh.mesh_dim_names or ():
            if name != "pp" and mesh.size(mesh.mesh_dim_names.index(name)) > 1:
                dist.all_reduce(loads, group=mesh.get_group(name))
    for m, load in zip(moes, loads.split([m.load.numel() for m in moes])):
        m.load.copy_(load)
