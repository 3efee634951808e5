"""What the trainer needs to run under torchrun: the process group and mesh from ``cfg.parallel``,
each rank's rows of the global batch, the collective parts of a step, rank-0-only output, and
errors that reach every rank.

One process with the default settings gives ``None`` from :func:`distributed_context`, and the
trainer runs exactly as it does without this module.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from torch_mhc.distributed.mesh import (
    ParallelDims,
    global_rows,
    launched_distributed,
    model_layout_errors,
    static_errors,
)
from torch_mhc.errors import UserError


@dataclass
class DistContext:
    """This rank's place in the run."""

    dims: ParallelDims
    mesh: DeviceMesh
    rank: int
    rows: slice  # this rank's rows of every global (micro-)batch

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def init_from_env() -> None:
    """Join torchrun's process group (env://): gloo for CPU tensors, plus nccl for CUDA ones."""
    if launched_distributed() and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def check_parallel(cfg) -> ParallelDims:
    """The parallel layout of ``cfg`` on this world (UserError naming the keys when impossible)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size())
    problems = layout_problems(cfg)
    if problems:
        raise UserError("invalid parallel settings: " + "; ".join(problems) + ".")
    return dims


def layout_problems(cfg, parallel=None) -> list[str]:
    """Why ``mhc train`` refuses the layout ``parallel`` (default ``cfg.parallel``) for ``cfg``, on any world
    size: the one check that :func:`check_parallel` runs and ``mhc memory`` marks refused layouts with."""
    parallel = cfg.parallel if parallel is None else parallel
    problems = static_errors(parallel, cfg.model.n_heads, cfg.batch_size) + model_layout_errors(parallel, cfg.model)
    from torch_mhc.distributed.pipeline import pipeline_errors

    return problems + pipeline_errors(cfg, parallel)  # parallel.pp, parallel.pp_schedule


def distributed_context(cfg, device: torch.device) -> DistContext | None:
    """None for one process (the plain run); else the mesh and this rank's batch rows."""
    dims = check_parallel(cfg)
    if not dims.enabled:
        return None
    mesh = dims.build_mesh(device.type)
    return DistContext(dims, mesh, dist.get_rank(), global_rows(cfg.batch_size, dims.dp, dims.dp_rank(mesh)))


def build_model(model_cfg, ctx: DistContext, device: torch.device, *, compile: bool = False,
                param_dtype: torch.dtype | None = None):
    """The parallelized ``DecoderLM`` with exactly the one-process initial weights.

    FSDP2, HSDP, TP and TP x FSDP: every rank builds the model on the meta device and parallelizes
    it; only rank 0 builds the full model (on the CPU, seeded as the plain run is), and each tensor is
    broadcast from it and cut into this rank's shard one at a time (``tensor_parallel.shard_like``,
    no communication), so no other rank holds more than one whole tensor at a time. DDP (with or
    without TP) keeps the plain build: every rank builds the model (same seed, same weights) and
    ``parallelize`` cuts its share out; DDP replicates the whole model anyway.
    """
    from torch.distributed.tensor import DTensor

    from torch_mhc.distributed.parallelize import parallelize
    from torch_mhc.distributed.tensor_parallel import shard_like
    from torch_mhc.models.decoder import DecoderLM, rope_tables

    if ctx.dims.dp_mode == "ddp":
        return parallelize(DecoderLM(model_cfg).to(device), ctx.dims, ctx.mesh, compile=compile,
                           param_dtype=param_dtype)
    full = DecoderLM(model_cfg).state_dict() if ctx.is_main else None
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    parallelize(model, ctx.dims, ctx.mesh, compile=compile, param_dtype=param_dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        cos, sin = rope_tables(model_cfg.max_seq_len, model_cfg.dim // model_cfg.n_heads, model_cfg.rope_theta)
        model.rope_cos.copy_(cos)  # buffers outside the state dict
        model.rope_sin.copy_(sin)
        for moe in model.moe_layers():
            moe.reset_balance()
        for name, t in model.state_dict().items():  # one whole tensor at a time: broadcast, keep this rank's part
            whole = full[name].to(device) if full is not None else torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(whole, src=0)
            if isinstance(t, DTensor):  # this rank's cut, as fully_shard over TP cuts (strided qkv included)
                whole, t = shard_like(whole, t).to_local(), t.to_local()
            t.copy_(whole)
    return model


def load_full_state(model, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load a one-process checkpoint (``step_*.pt``: whole tensors; the optimizer's state keyed by parameter
    index) into the parallelized ``model`` and its ``optimizer``. Collective: every rank passes the same
    state and keeps its own shards. UserError when the checkpoint is of another model or optimizer shape."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from torch_mhc.distributed.tensor_parallel import shard_like

    names = {id(p): n for n, p in model.named_parameters()}
    saved_groups = optim_sd["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise UserError("the checkpoint's optimizer has other parameter groups than this model; "
                        "resume with the config the run was started with.")
    fqn = {i: names[id(p)] for saved, g in zip(saved_groups, optimizer.param_groups)
           for i, p in zip(saved["params"], g["params"])}
    optim_by_name = {"state": {fqn[i]: s for i, s in optim_sd["state"].items()},
                     "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved_groups]}
    try:  # each whole tensor cut into this rank's shard as fully_shard over TP cuts (torch's own cut differs)
        like_model, like_optim = get_state_dict(model, optimizer)
        model_sd = {k: shard_like(model_sd[k], v) for k, v in like_model.items()}
        optim_by_name["state"] = {n: {k: shard_like(v, like_optim["state"][n][k]) if torch.is_tensor(v) else v
                                      for k, v in st.items()} for n, st in optim_by_name["state"].items()}
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_by_name,
                       options=StateDictOptions(strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"the one-process checkpoint does not fit this model (another model shape or connection): "
                        f"{str(e).splitlines()[0]}. Resume with the config the run was started with.") from None


def agree(fn, *args, **kwargs):
    """Run ``fn`` on every rank; when it raises UserError on any rank, raise it on every rank (with
    the failing rank named), so that all of them exit with the message instead of hanging."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    error, result = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if error is not None:
        raise UserError(error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise UserError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result


def main_first(fn, *args, **kwargs):
    """Run ``fn`` on rank 0, then on the other ranks (e.g. rank 0 tokenises and writes the token cache,
    the others read it); a UserError on any rank is raised on every rank."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    rank, result, box = dist.get_rank(), None, [None]
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)  # only the error travels, never the result
    if box[0] is not None:
        raise UserError(box[0] if rank == 0 else f"rank 0 failed: {box[0]}")
    return agree(lambda: result if rank == 0 else fn(*args, **kwargs))


def _outcome_of_main(fn):
    """Call ``fn()`` on rank 0 (initialised group) and return its result on every rank, or raise its
    UserError on every rank."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def from_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and hand its result (or its UserError) to every rank."""
    if not dist.is_initialized():
        return fn(*args, **kwargs)
    return _outcome_of_main(lambda: fn(*args, **kwargs))


@contextmanager
def claimed_on_main(make_claim):
    """Enter ``make_claim()`` (a run-directory claim: lock, removed on a failed start) on rank 0 only,
    for the whole run; yields its path on every rank (a UserError of the claim reaches every rank)."""
    if not dist.is_initialized():
        with make_claim() as claim:
            yield claim.path
        return
    with ExitStack() as stack:
        yield Path(_outcome_of_main(lambda: str(stack.enter_context(make_claim()).path)))


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank scalar (the loss of each rank's rows -> the global batch's loss)."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over all ranks (float64). Tensor-parallel peers hold the same rows and add
    alike, so a ratio of two such sums (loss sum / token count) is that of the data-parallel ranks."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def sequence_mesh(ctx: DistContext | None) -> DeviceMesh | None:
    """The mesh over which tensor parallel shards the tokens between sublayers (``[B, S/tp, n, C]``), or None."""
    return ctx.mesh["tp"] if ctx is not None and ctx.dims.tp > 1 else None


def after_backward(model, ctx: DistContext) -> None:
    """Collectives between backward and clipping: the TP-replicated parameters' gradient sums."""
    if ctx.dims.tp > 1:
        from torch_mhc.distributed.tensor_parallel import reduce_tp_partial_grads

        reduce_tp_partial_grads(model, ctx.mesh["tp"])


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
