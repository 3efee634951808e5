"""Parallel degrees from the config, checked against the world size, and the device mesh they span.

Mesh dimensions, outermost first (only those of degree > 1 exist): ``pp``, ``dp_replicate``,
``dp_shard``, ``tp``. The data-parallel degree is ``dp_replicate * dp_shard``: each data-parallel
rank reads its own rows of every global batch (:func:`global_rows`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torch_mhc.errors import UserError

DP_MODES = ("fsdp", "ddp")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelConfig:
    """How many processes do what (see README "Multi-GPU / multi-node"); one process: all 1."""

    dp_shard: int = -1  # FSDP2 shard degree; -1: the world size / (dp_replicate * tp * pp)
    dp_replicate: int = 1  # replicas of the sharded model (HSDP when dp_shard > 1 too; DDP with dp_mode=ddp)
    tp: int = 1  # tensor (and sequence) parallel degree; must divide model.n_heads
    pp: int = 1  # pipeline ranks (1F1B: one stage each; Interleaved1F1B and the V schedules: two)
    pp_schedule: str = "1F1B"  # 1F1B | Interleaved1F1B | ZBVZeroBubble | DualPipeV (distributed.pipeline)
    dp_mode: str = "fsdp"  # fsdp (FSDP2 / HSDP) | ddp
    ep: int = 1  # expert parallel degree, a part of dp_shard: each MoE layer's experts split over ep ranks


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each kind of parallelism; ``dp_shard=-1`` takes what the others leave of the world."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    dp_mode: str = "fsdp"
    world_size: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, parallel, world_size: int) -> ParallelDims:
        """Resolve ``dp_shard=-1`` and check the product against ``world_size`` (UserError naming the keys)."""
        errors = static_errors(parallel)
        if errors:
            raise UserError("invalid parallel settings: " + "; ".join(errors) + ".")
        others = parallel.dp_replicate * parallel.tp * parallel.pp
        dp_shard = parallel.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise UserError(
                    f"parallel.dp_replicate * parallel.tp * parallel.pp = {others} does not divide the world size "
                    f"{world_size}; choose degrees whose product divides the number of processes."
                )
            dp_shard = world_size // others
        if others * dp_shard != world_size:
            raise UserError(
                f"the parallel mesh parallel.pp x dp_replicate x dp_shard x tp = {parallel.pp} x "
                f"{parallel.dp_replicate} x {dp_shard} x {parallel.tp} = {others * dp_shard} processes, but "
                f"{world_size} were started; make the product equal the world size (dp_shard=-1 fills it in)."
            )
        if parallel.dp_mode == "ddp" and dp_shard > 1 and parallel.dp_replicate > 1:
            raise UserError("parallel.dp_mode=ddp replicates only: set parallel.dp_shard=1 and use "
                            "parallel.dp_replicate, or dp_mode=fsdp for sharded or hybrid (HSDP) data parallel.")
        if dp_shard % parallel.ep:
            raise UserError(f"parallel.ep ({parallel.ep}) must divide parallel.dp_shard ({dp_shard}): expert parallel "
                            "splits the data-parallel shard group (dp_shard = dp_shard_mod_ep x ep).")
        return cls(parallel.dp_replicate, dp_shard, parallel.tp, parallel.pp, parallel.dp_mode, world_size,
                   parallel.ep)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The world as a mesh over the dimensions of degree > 1 (a 1-D ``dp_shard`` mesh at least)."""
        dims = {k: v for k, v in self.degrees().items() if v > 1} or {"dp_shard": 1}
        return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))

    def expert_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The same ranks as ``mesh`` with ``dp_shard`` split into ``(dp_shard_mod_ep, ep)`` (row-major: the ep
        ranks of one group are consecutive dp_shard ranks), as torchtitan's DeepSeek-V3 does. Experts are
        sharded over ``ep`` and FSDP-sharded over ``dp_shard_mod_ep`` (kept even at size 1); everything else
        keeps ``mesh``. Made once per mesh (it creates process groups: every rank calls it in the same order)."""
        cached = getattr(mesh, "_mhc_expert_mesh", None)
        if cached is None:
            cached = mesh._unflatten("dp_shard", (self.dp_shard // self.ep, self.ep), ("dp_shard_mod_ep", "ep"))
            mesh._mhc_expert_mesh = cached
        return cached

    def expert_dp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """What FSDP2 shards the experts over: ``(dp_replicate, dp_shard_mod_ep)`` (HSDP) or ``dp_shard_mod_ep``."""
        names = ("dp_replicate", "dp_shard_mod_ep") if self.dp_replicate > 1 else ("dp_shard_mod_ep",)
        return self.expert_mesh(mesh)[names]

    def dp_mesh(self, mesh: DeviceMesh) -> DeviceMesh | None:
        """The data-parallel part of ``mesh``: ``(dp_replicate, dp_shard)`` (HSDP), one of them, or None."""
        names = tuple(n for n in ("dp_replicate", "dp_shard") if n in (mesh.mesh_dim_names or ()))
        return mesh[names] if names else None

    def dp_rank(self, mesh: DeviceMesh) -> int:
        """This process's index among the ``dp`` data-parallel ranks (row-major over replicate, shard)."""
        names = mesh.mesh_dim_names or ()
        rep = mesh.get_local_rank("dp_replicate") if "dp_replicate" in names else 0
        shard = mesh.get_local_rank("dp_shard") if "dp_shard" in names else 0
        return rep * self.dp_shard + shard


def static_errors(parallel, n_heads: int | None = None, batch_size: int | None = None) -> list[str]:
    """What is wrong with the parallel settings before the world size is known."""
    errors = []
    for name in ("dp_replicate", "tp", "pp"):
        if getattr(parallel, name) < 1:
            errors.append(f"parallel.{name} must be >= 1 (got {getattr(parallel, name)})")
    if parallel.dp_shard != -1 and parallel.dp_shard < 1:
        errors.append(f"parallel.dp_shard must be >= 1, or -1 for the rest of the world (got {parallel.dp_shard})")
    ep = getattr(parallel, "ep", 1)
    if ep < 1:
        errors.append(f"parallel.ep must be >= 1 (got {ep})")
    elif ep > 1 and parallel.dp_shard not in (-1,) and parallel.dp_shard % ep:
        errors.append(f"parallel.ep ({ep}) must divide parallel.dp_shard ({parallel.dp_shard})")
    if ep > 1 and parallel.dp_mode != "fsdp":
        errors.append("parallel.ep > 1 needs parallel.dp_mode=fsdp (expert parallel splits FSDP's shard group)")
    if parallel.dp_mode not in DP_MODES:
        errors.append(f"parallel.dp_mode must be one of {', '.join(DP_MODES)} (got {parallel.dp_mode!r})")
    if n_heads is not None and parallel.tp >= 1 and n_heads % parallel.tp:
        errors.append(f"parallel.tp ({parallel.tp}) must divide model.n_heads ({n_heads})")
    dp = parallel.dp_replicate * parallel.dp_shard
    if batch_size is not None and dp >= 1 and batch_size % dp:
        errors.append(f"batch_size ({batch_size}, the global batch) must be divisible by the data-parallel degree "
                      f"parallel.dp_replicate x dp_shard = {dp}")
    return errors


def model_layout_errors(parallel, model_cfg) -> list[str]:
    """What is wrong with the parallel settings for this model (tensor and expert parallel); the checks that
    ``mhc train`` runs (``runtime.check_parallel``) and that ``mhc memory`` marks refused layouts with."""
    errors = []
    tp, ep = parallel.tp, getattr(parallel, "ep", 1)
    if tp > 1 and model_cfg.n_heads % tp:
        errors.append(f"parallel.tp ({tp}) must divide model.n_heads ({model_cfg.n_heads})")
    if tp > 1 and model_cfg.tie_embeddings:
        errors.append("model.tie_embeddings with parallel.tp > 1 is not supported (the embedding is row-parallel, "
                      "the LM head column-parallel)")
    if ep > 1 and not model_cfg.moe:
        errors.append(f"parallel.ep ({ep}) > 1 needs an MoE model (model.moe = true)")
    elif ep > 1 and model_cfg.n_routed_experts % ep:
        errors.append(f"parallel.ep ({ep}) must divide model.n_routed_experts ({model_cfg.n_routed_experts})")
    return errors


def global_rows(batch_size: int, dp: int, dp_rank: int) -> slice:
    """Rows of a global batch that data-parallel rank ``dp_rank`` of ``dp`` reads."""
    if batch_size % dp:
        raise UserError(f"batch_size ({batch_size}, the global batch) must be divisible by the data-parallel "
                        f"degree {dp}.")
    per = batch_size // dp
    return slice(dp_rank * per, (dp_rank + 1) * per)


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str = "cpu", timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun describes (env://); gloo on CPU, nccl on CUDA. Returns (rank, world)."""
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
