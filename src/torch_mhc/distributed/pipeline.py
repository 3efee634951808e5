"""Pipeline parallel with ``torch.distributed.pipelining``: a ``DecoderLM`` cut into stages whose
stage tensor is the stream state ``[b, S, n, C]`` (the first stage embeds and expands, the last
merges and applies the head), run by any schedule PyTorch ships (1F1B, interleaved 1F1B, zero bubble).

:class:`Pipeline` is what ``mhc train`` runs with ``parallel.pp > 1``: the stages of one rank (FSDP2 over
the data-parallel ranks of the same stage when ``dp_shard > 1``, and expert parallel over ``ep`` of those ranks
when ``parallel.ep > 1``), the schedule ``parallel.pp_schedule``
(:data:`SCHEDULES`), and what the trainer needs across stages: the global gradient norm, per-role norms,
evaluation and diagnostics (a forward through the stages in order, no schedule), the MoE loads, and
:class:`RankParts`, this rank's modules under the unpipelined model's parameter names (DCP checkpoints).

Point-to-point traffic: each stage boundary sends the n-stream state forward and its gradient
backward, ``b * S * n * C`` elements per micro-batch each way: n times what a residual network of
the same width sends (:func:`p2p_bytes_per_step`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from torch_mhc.errors import UserError
from torch_mhc.models.decoder import lm_loss, run_blocks

# name -> (schedule class, stages per rank, placement of the stages: "loop" (stage s on rank s % pp) or
# "v" (rank r runs stages r and 2 pp - 1 - r)); SCHEDULE_RULES: what each needs (checked by pipeline_errors)
SCHEDULES = {
    "1F1B": (Schedule1F1B, 1, "loop"),
    "Interleaved1F1B": (ScheduleInterleaved1F1B, 2, "loop"),
    "ZBVZeroBubble": (ScheduleZBVZeroBubble, 2, "v"),
    "DualPipeV": (ScheduleDualPipeV, 2, "v"),
}
SCHEDULE_RULES = {
    "1F1B": "1 stage per rank, grad_accum >= pp",
    "Interleaved1F1B": "2 stages per rank, grad_accum a multiple of pp",
    "ZBVZeroBubble": "2 stages per rank in a V, grad_accum >= 2 pp",
    "DualPipeV": "2 stages per rank in a V, grad_accum >= 2 pp",
}
ROLES = ("embed", "attn", "ffn", "connection", "head")


def schedule_list() -> str:
    return "; ".join(f"{name} ({rule})" for name, rule in SCHEDULE_RULES.items())


def pipeline_errors(train_cfg, parallel) -> list[str]:
    """What keeps ``mhc train`` from running ``parallel`` (its ``pp`` and ``pp_schedule``) for ``train_cfg``.
    The micro-batches of a step are its ``grad_accum`` micro-batches (each ``batch_size`` rows of the global
    batch, as one process accumulates them), so the schedules' micro-batch rules are rules on grad_accum."""
    name = parallel.pp_schedule
    if name not in SCHEDULES:
        return [f"parallel.pp_schedule must be one of: {schedule_list()} (got {name!r})"]
    pp = parallel.pp
    if pp <= 1:
        return []
    per = SCHEDULES[name][1]
    stages, m, cfg = pp * per, train_cfg.grad_accum, train_cfg.model
    errors = []
    if cfg.n_layers < stages:
        errors.append(f"parallel.pp_schedule={name} runs {per} stage(s) per rank: parallel.pp x {per} = {stages} "
                      f"stages need model.n_layers >= {stages} (got {cfg.n_layers})")
    need = {"1F1B": m >= pp, "Interleaved1F1B": m % pp == 0, "ZBVZeroBubble": m >= 2 * pp,
            "DualPipeV": m >= 2 * pp}[name]
    if not need:
        errors.append(f"parallel.pp_schedule={name} needs {SCHEDULE_RULES[name].split(', ')[1]} (the micro-batches "
                      f"of a step are its grad_accum micro-batches; got grad_accum={m}, parallel.pp={pp}): raise "
                      f"grad_accum (and lower batch_size to keep the tokens per step)")
    if parallel.tp > 1:
        errors.append("parallel.pp > 1 with parallel.tp > 1 is not supported yet (pipeline composes with FSDP2 only)")
    if parallel.dp_mode != "fsdp" or parallel.dp_replicate > 1:
        errors.append("parallel.pp > 1 composes with FSDP2 (parallel.dp_shard) only: set parallel.dp_mode=fsdp and "
                      "parallel.dp_replicate=1")
    if cfg.tie_embeddings:
        errors.append("parallel.pp > 1 cannot tie the embedding (first stage) to the LM head (last stage): "
                      "set model.tie_embeddings=false")
    if train_cfg.compile:
        errors.append("parallel.pp > 1 with compile=true is not supported yet: set compile=false")
    return errors


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stages pipeline rank ``pp_rank`` runs under ``schedule``, in order."""
    _, per, style = SCHEDULES[schedule]
    if per == 1:
        return [pp_rank]
    if style == "loop":
        return [pp_rank + k * pp for k in range(per)]
    return [pp_rank, 2 * pp - 1 - pp_rank]


def stage_owner(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs ``stage``."""
    return next(r for r in range(pp) if stage in stage_ids(r, pp, schedule))


class StreamStage(nn.Module):
    """Blocks ``[start, stop)`` of ``model`` (plus the embedding on the first stage and merge, norm
    and head on the last). Parameter names are the model's (``blocks.<i>...``), so stage state dicts
    are slices of the model's. ``forward``: tokens ``[b, S]`` or streams ``[b, S, n, C]`` ->
    streams, or logits ``[b, S, vocab]`` on the last stage."""

    def __init__(self, model: nn.Module, start: int, stop: int):
        super().__init__()
        self.first, self.last = start == 0, stop == len(model.blocks)
        self._model = (model,)  # not a submodule: only this stage's modules are registered below
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(start, stop)})
        if self.first:
            self.embed = model.embed
        if self.last:
            self.head_merge, self.norm, self.lm_head = model.head_merge, model.norm, model.lm_head

    def connections(self) -> list[nn.Module]:
        """This stage's connections in depth order (attention, FFN, ...)."""
        return [c for b in self.blocks.values() for c in (b.attn, b.ffn)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        h = model.enter_streams(x) if self.first else x
        with model._recompute_context():  # model.recompute, as the unpipelined forward runs it
            # the read-ahead is handed on within the stage only: the stage's last post has no reader here (its
            # reader runs in another stage, maybe on another rank, and gets the state through a send)
            h = run_blocks(self.blocks.values(), h, model.rope_cos, model.rope_sin)
        return model.leave_streams(h) if self.last else h


class RankParts(nn.Module):
    """The modules of one rank's stages under the unpipelined model's names (``embed``, ``blocks.<i>``,
    ``head_merge``, ``norm``, ``lm_head``): its parameters are the optimizer's, its state dict is the slice
    of the model's that DCP saves and loads. Not called (the stages are)."""

    def __init__(self, model: nn.Module, stages: list[StreamStage]):
        super().__init__()
        blocks = {k: b for s in stages for k, b in s.blocks.items()}
        self.blocks = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
        if any(s.first for s in stages):
            self.embed = model.embed
        if any(s.last for s in stages):
            self.head_merge, self.norm, self.lm_head = model.head_merge, model.norm, model.lm_head


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Blocks per stage, as even as possible (earlier stages get the extra block)."""
    if not 1 <= n_stages <= n_layers:
        raise UserError(f"pipeline stages ({n_stages}) must be between 1 and model.n_layers ({n_layers}).")
    per, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for s in range(n_stages):
        stop = start + per + (s < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def stream_dtype(model: nn.Module, param_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the stage tensor: ``model.stream_dtype``, or that of the embedding's output (its weight's, or
    ``param_dtype`` when FSDP2 gathers the weights in it; autocast leaves the embedding alone)."""
    cfg = model.cfg
    if cfg.stream_dtype != "auto":
        return getattr(torch, cfg.stream_dtype)
    return param_dtype or model.embed.weight.dtype


def pipeline_stage(stage: StreamStage, index: int, n_stages: int, micro_batch: int, seq_len: int,
                   dtype: torch.dtype, device: torch.device, group=None) -> PipelineStage:
    """``StreamStage`` as a ``PipelineStage`` told its input and output shapes (tokens ``[b, S]`` or streams
    ``[b, S, n, C]`` in, streams or logits ``[b, S, vocab]`` out) instead of inferring them from a forward."""
    cfg = stage._model[0].cfg
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)
    streams = torch.zeros(micro_batch, seq_len, cfg.streams, cfg.dim, dtype=dtype, device=device, requires_grad=True)
    out = streams if not stage.last else torch.zeros(micro_batch, seq_len, cfg.vocab_size, device=device)
    return PipelineStage(stage, index, n_stages, device, input_args=tokens if stage.first else streams,
                         output_args=out, group=group)


def build_stages(model: nn.Module, stage_ids: list[int], n_stages: int, micro_batch: int, seq_len: int,
                 device: torch.device, group=None) -> list[PipelineStage]:
    """``PipelineStage`` objects for the stages this rank runs (one for 1F1B, several interleaved)."""
    bounds = stage_bounds(len(model.blocks), n_stages)
    dtype = stream_dtype(model)
    return [pipeline_stage(StreamStage(model, *bounds[s]), s, n_stages, micro_batch, seq_len, dtype, device, group)
            for s in stage_ids]


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss the last stage computes per micro-batch (the model's own)."""
    return lm_loss(logits, targets)


class Pipeline:
    """One rank's share of a pipelined ``DecoderLM`` and its schedule (built by :func:`build_pipeline`).

    ``model``: the whole ``DecoderLM`` on the meta device but for this rank's modules (real, FSDP2-sharded
    when there are data-parallel ranks); ``parts``: those modules (:class:`RankParts`); ``stages``: this
    rank's :class:`StreamStage` objects by stage index."""

    def __init__(self, model, parts: RankParts, stages: dict[int, StreamStage], schedule, schedule_name: str,
                 pp: int, pp_group, dp_groups: list, dtype: torch.dtype, device: torch.device):
        self.model, self.parts, self.stages, self.schedule = model, parts, stages, schedule
        self.schedule_name, self.pp, self.pp_group, self.dp_groups = schedule_name, pp, pp_group, dp_groups
        self.pp_rank = dist.get_rank(pp_group)
        self.n_stages = pp * SCHEDULES[schedule_name][1]
        self.dtype, self.device = dtype, device
        self.has_first, self.has_last = 0 in stages, self.n_stages - 1 in stages

    # ---------------------------------------------------------------- training
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float | None:
        """Forward and backward of the step's micro-batches ``x, y [m * b, S]`` (micro-batch i: rows
        ``i b .. (i+1) b``) by the schedule; gradients are those of the mean of the micro-batch losses.
        Returns that mean on the rank with the last stage, else None."""
        losses: list[torch.Tensor] = []
        args = (x.to(self.device),) if self.has_first else ()
        self.schedule.step(*args, target=y.to(self.device) if self.has_last else None, losses=losses)
        return sum(loss.item() for loss in losses) / len(losses) if self.has_last else None

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so that their global norm (all parameters of all stages) is at
        most ``max_norm``; returns the norm before clipping (collective over all ranks)."""
        grads = [p.grad for p in self.parts.parameters() if p.grad is not None]
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            norm = torch.linalg.vector_norm(g, 2.0, dtype=torch.float32)
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # a shard's norm is partial
            square += norm.double() ** 2
        dist.all_reduce(square, group=self.pp_group)
        total = float(square.sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))  # as torch's clip_grad_norm_ computes it
        for g in grads:
            g.mul_(coef)
        return total

    def grad_norms_by_group(self) -> dict[str, float]:
        """``grad_norm_<role>`` over all stages, as ``diagnostics.collect.grad_norms_by_group`` gives for the
        unpipelined model (collective over all ranks)."""
        roles = self.model.parameter_roles()
        sums = torch.zeros(2 * len(ROLES), dtype=torch.float64)  # sums of squares, then "has a gradient"
        for name, p in self.parts.named_parameters():
            if p.grad is not None:
                s = p.grad.detach().float().square().sum()
                s = s.full_tensor() if isinstance(s, DTensor) else s
                i = ROLES.index(roles[name][0])
                sums[i] += s.item()
                sums[len(ROLES) + i] = 1.0
        dist.all_reduce(sums, group=self.pp_group)
        return {f"grad_norm_{r}": sums[i].item() ** 0.5 for i, r in enumerate(ROLES) if sums[len(ROLES) + i] > 0}

    def param_groups(self, weight_decay: float, lr: float, connection_lr_scale: float = 1.0) -> list[dict]:
        """``DecoderLM.param_groups`` for this rank's parameters (the same rules; empty groups dropped)."""
        params = dict(self.parts.named_parameters())
        groups: dict[tuple[bool, bool], list] = {(d, c): [] for d in (True, False) for c in (False, True)}
        for name, (role, decayed) in self.model.parameter_roles().items():
            if name in params:
                groups[(decayed, role == "connection")].append(params[name])
        return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
                 "lr": lr * (connection_lr_scale if conn else 1.0)}
                for (decay, conn), ps in groups.items() if ps]

    def moe_layers(self) -> list[nn.Module]:
        from torch_mhc.models.moe import MoE

        return [m for m in self.parts.modules() if isinstance(m, MoE)]

    def sync_moe_load(self) -> None:
        """Sum each of this rank's MoE layers' expert loads over the data-parallel ranks of its stage (the
        ranks that routed the other rows through the same layer; under expert parallel its ``ep`` ranks are among
        them, each counting its own tokens per global expert), never over other stages, as ``sync_moe_load`` does
        unpipelined."""
        for moe in self.moe_layers():
            for group in self.dp_groups:
                dist.all_reduce(moe.load, group=group)

    # ---------------------------------------------------------------- forward only: evaluation, diagnostics
    def run_through(self, tokens: torch.Tensor, fn) -> torch.Tensor | None:
        """Tokens ``[b, S]`` through every stage in order, ``fn(stage, input) -> output`` on each of this rank's,
        the streams ``[b, S, n, C]`` sent between ranks; no schedule, no gradients. Returns the last stage's
        output on the rank that runs it, else None. Every rank of the pipeline group must call it."""
        cfg = self.model.cfg
        carry = None
        for s in range(self.n_stages):
            owner = stage_owner(s, self.pp, self.schedule_name)
            if owner != self.pp_rank:
                continue
            if s == 0:
                carry = tokens.to(self.device)
            elif stage_owner(s - 1, self.pp, self.schedule_name) != self.pp_rank:
                carry = torch.empty(tokens.shape[0], tokens.shape[1], cfg.streams, cfg.dim, dtype=self.dtype,
                                    device=self.device)
                dist.recv(carry, group=self.pp_group, group_src=stage_owner(s - 1, self.pp, self.schedule_name))
            carry = fn(self.stages[s], carry)
            if s + 1 < self.n_stages and stage_owner(s + 1, self.pp, self.schedule_name) != self.pp_rank:
                dist.send(carry.to(self.dtype).contiguous(), group=self.pp_group,
                          group_dst=stage_owner(s + 1, self.pp, self.schedule_name))
        return carry if self.has_last else None

    @torch.no_grad()
    def loss_sums(self, batches, rows: slice, autocast_dtype: torch.dtype | None) -> tuple[float, int]:
        """(sum of token losses, token count) of this rank's ``rows`` of every batch ``(x, y [B, T])``,
        on the rank with the last stage; (0, 0) elsewhere. Stages in eval mode."""
        total, count = 0.0, 0
        modules = list(self.stages.values())
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            for x, y in batches:
                x, y = x[rows], y[rows]
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = self.run_through(x, lambda stage, inp: stage(inp))
                if logits is not None:
                    total += lm_loss(logits, y.to(self.device)).item() * y.numel()
                    count += y.numel()
        finally:
            for m, mode in zip(modules, was_training):
                m.train(mode)
        return total, count

    @torch.no_grad()
    def diagnostics(self, idx: torch.Tensor, step: int) -> dict:
        """``collect_diagnostics`` of the whole model on ``idx [B, S]``: each stage records its own connections,
        the records are gathered (stage order = depth order) and summarised; the same record on every rank."""
        from torch_mhc.diagnostics.collect import diagnostics_record, layer_stats, record_coefficients

        mine: dict[int, tuple[list, list]] = {}

        def record(stage: StreamStage, inp: torch.Tensor) -> torch.Tensor:
            out, streams = [], []
            hook = stage.register_forward_hook(lambda module, args, output: out.append(output))
            try:
                coeffs = record_coefficients(stage, inp, streams) if stage.connections() else []
            finally:
                hook.remove()
            if not out:  # no connection recorded (no forward ran): the plain forward
                out.append(stage(inp))
            layers = [layer_stats(c, x, k) for c, x, k in zip(stage.connections(), streams, coeffs)]
            n = self.model.cfg.streams
            mine[next(i for i, s in self.stages.items() if s is stage)] = (
                layers, [k[2].reshape(-1, n, n).double().mean(0).cpu() for k in coeffs])
            return out[0]

        self.run_through(idx, record)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        by_stage = {s: rec for part in gathered for s, rec in part.items()}
        layers = [layer for s in sorted(by_stage) for layer in by_stage[s][0]]
        mean_res = torch.stack([r for s in sorted(by_stage) for r in by_stage[s][1]])
        return diagnostics_record(step, layers, mean_res)


def build_pipeline(train_cfg, dims, mesh, device: torch.device, param_dtype: torch.dtype | None = None) -> Pipeline:
    """This rank's stages of ``DecoderLM(train_cfg.model)`` with exactly the one-process initial weights, and
    the schedule ``parallel.pp_schedule`` over ``grad_accum`` micro-batches.

    The model is built on the meta device; this rank's stages are cut out of it, activation-checkpointed,
    FSDP2-sharded over the data-parallel ranks of the same stage (``mesh["dp_shard"]``; under expert parallel
    each MoE layer's experts split over ``ep`` of those ranks and sharded over the rest, as ``parallelize`` does)
    and materialised;
    rank 0 alone builds the whole model (seeded as the plain run is) and broadcasts it a tensor at a time,
    each rank keeping (its shard of) what its stages hold."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from torch_mhc.distributed.expert_parallel import apply_expert_parallel
    from torch_mhc.distributed.parallelize import apply_activation_checkpoint, fully_shard_block
    from torch_mhc.distributed.tensor_parallel import shard_like
    from torch_mhc.models.decoder import DecoderLM, rope_tables

    model_cfg, name = train_cfg.model, train_cfg.parallel.pp_schedule
    full = DecoderLM(model_cfg).state_dict() if dist.get_rank() == 0 else None
    with torch.device("meta"):
        model = DecoderLM(model_cfg)
    pp, pp_mesh = dims.pp, mesh["pp"]
    ids = stage_ids(pp_mesh.get_local_rank(), pp, name)
    n_stages = pp * SCHEDULES[name][1]
    bounds = stage_bounds(model_cfg.n_layers, n_stages)
    stages = {s: StreamStage(model, *bounds[s]) for s in ids}
    # expert parallel inside each stage: mesh is (pp, dp_shard); the expert mesh splits its dp_shard into
    # (dp_shard_mod_ep, ep), so an ep group is ep data-parallel ranks of one stage (never ranks of two stages)
    expert_dp_mesh = None
    if dims.ep > 1:
        for stage in stages.values():  # this rank's MoE layers only (the others stay on the meta device, whole)
            apply_expert_parallel(stage, dims.expert_mesh(mesh)["ep"])
        expert_dp_mesh = dims.expert_dp_mesh(mesh)
    apply_activation_checkpoint(model, model_cfg.activation_checkpoint)
    parts = RankParts(model, list(stages.values()))
    dp_mesh = dims.dp_mesh(mesh)
    if dp_mesh is not None:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for stage in stages.values():  # each stage its own FSDP2 root, each block one unit kept gathered between
            for block in stage.blocks.values():  # the micro-batches' forwards and backwards (torchtitan's choice)
                fully_shard_block(block, dp_mesh, mp, reshard_after_forward=False, expert_dp_mesh=expert_dp_mesh)
            fully_shard(stage, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    parts.to_empty(device=device)
    mine = parts.state_dict()
    with torch.no_grad():
        cos, sin = rope_tables(model_cfg.max_seq_len, model_cfg.dim // model_cfg.n_heads, model_cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)  # buffers outside the state dict
        for name_, t in model.state_dict().items():  # every rank the same order; keep what this rank holds
            whole = full[name_].to(device) if full is not None else torch.empty(t.shape, dtype=t.dtype, device=device)
            dist.broadcast(whole, src=0)
            if name_ in mine:
                target = mine[name_]
                if isinstance(target, DTensor):
                    whole, target = shard_like(whole, target).to_local(), target.to_local()
                target.copy_(whole)
    del full
    pipe = Pipeline(model, parts, stages, None, name, pp, pp_mesh.get_group(),
                    [dp_mesh.get_group(d) for d in dp_mesh.mesh_dim_names] if dp_mesh is not None else [],
                    stream_dtype(model, param_dtype if dp_mesh is not None else None), device)
    for moe in pipe.moe_layers():
        moe.reset_balance()
    rows = train_cfg.batch_size // dims.dp
    pipeline_stages = [pipeline_stage(stages[s], s, n_stages, rows, train_cfg.seq_len, pipe.dtype, device,
                                      pp_mesh.get_group()) for s in ids]
    cls, per, _ = SCHEDULES[name]
    pipe.schedule = cls(pipeline_stages if per > 1 else pipeline_stages[0], n_microbatches=train_cfg.grad_accum,
                        loss_fn=pipeline_loss)
    return pipe


def p2p_bytes_per_step(batch: int, seq_len: int, dim: int, n_streams: int, n_stages: int,
                       bytes_per_element: int = 2) -> dict[str, float]:
    """Point-to-point bytes one optimizer step sends over all stage boundaries (activations forward
    plus their gradients backward), for the n-stream state and for a residual network of the same width."""
    per_boundary = 2 * batch * seq_len * dim * bytes_per_element  # forward + backward, all micro-batches
    boundaries = n_stages - 1
    return {"mhc": per_boundary * n_streams * boundaries, "residual": per_boundary * boundaries,
            "ratio": float(n_streams)}
