"""Per-GPU memory estimate of a training config under a parallel layout (a planning aid, calibrated against
measurement): parameter, gradient and AdamW states, FSDP2's gathered blocks and unsharded gradient buffers,
activations and logits.

    mhc memory configs/paper-27b.toml dp_shard=64 tp=8,dp_shard=8 dp_shard=64,ac=block

Model: bf16 compute (FSDP2 mixed precision: bf16 gathered params, fp32 master params, fp32 grads, fp32 AdamW
moments = 16 bytes per parameter, divided over the shards). FSDP2 holds one block gathered while it prefetches
the next (2 x 2 bytes per block parameter) and, in backward, a block's unsharded bf16 gradients with their
fp32 reduce-scatter input (6 bytes per block parameter).

Activations are the bytes autograd saves per token, term by term (:func:`layer_activation_bytes`), calibrated
against saved-tensor hooks (:class:`SavedBytes`) on small shapes, bf16, with the mHC kernels (on CPU through
Triton's interpreter): within 2% per layer for dense and MoE layers of mHC, HC and residual models
(tests/test_distributed_memory.py). Each RMSNorm counts as torch's composite (an fp32 copy of its input and
its output, 8 C + 4 bytes); CUDA's fused RMSNorm keeps less (2 C + 4), so on GPUs the figure is a little high.
mHC's own stream recompute (``model.recompute``) is not counted (it drops 2 n C per dropped state).
Activation checkpointing (``model.activation_checkpoint``, or ``ac=`` in a layout): a checkpointed block
keeps only its input state (2 n C), and one block's activations live again during its recompute. Tensor
parallel with sequence parallel divides the activations by tp except the all-gathered inputs of the
column-parallel projections; the full logits are on every TP rank. The logits are bf16 plus the fp32 loss
input and its gradient (10 bytes x vocab per token). Pipeline stages hold 1/pp of the layers (split into
``pp x stages per rank`` stages) and several micro-batches in flight, as many as the schedule keeps
(:func:`micro_batches_in_flight`). Layouts that ``mhc train`` refuses are marked, not estimated.

MoE sublayers are not split by tensor parallel (they run on each TP rank's share of the tokens): their
parameters count whole per TP rank. Expert parallel (``ep``) does not change the states (FSDP2 shards the
experts over ``dp_shard`` either way, as ``ep x dp_shard_mod_ep``) nor, at balanced load, the activations (a
rank receives as many expert rows as it sends; an unbalanced step holds more on the busy ranks): it shrinks
what FSDP2 gathers of an MoE block, whose routed experts are gathered over ``dp_shard / ep`` ranks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from torch_mhc.distributed.mesh import ParallelConfig
from torch_mhc.models.decoder import DecoderLM

GIB = 2**30


class SavedBytes:
    """Counts what autograd saves for backward during a forward (``with SavedBytes(model) as saved: ...``;
    ``saved.bytes`` after): every distinct storage saved, once, at its size; the module's own parameters and
    buffers are not counted (they are not activations). Saved-tensor hooks see only what the innermost hooks
    see: inside mHC's stream recompute it counts what that keeps (its recipes stand for tensors autograd keeps
    anyway), inside an activation-checkpointed block nothing (the checkpoint keeps the block's input alive by
    reference: not counted here)."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.skip = set() if module is None else {
            t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
        self.storages: dict[int, torch.Tensor] = {}  # held: no storage is freed and reused while counting

    @property
    def bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.storages.values())

    def add(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.skip:
                self.storages.setdefault(ptr, t)
        return t

    def __enter__(self):
        from torch_mhc.nn import recompute

        self._pack = pack = recompute.StreamRecompute.pack
        counter = self

        def counted(rc, t):
            return counter.add(pack(rc, t))

        recompute.StreamRecompute.pack = counted
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.add, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        from torch_mhc.nn import recompute

        self._hooks.__exit__(*exc)
        recompute.StreamRecompute.pack = self._pack


def block_params(model: DecoderLM) -> list[int]:
    return [sum(p.numel() for p in b.parameters()) for b in model.blocks]


def connection_bytes(cfg) -> float:
    """Bytes per token one connection (around one sublayer) saves: the stream state it reads (bf16), the
    sublayer output it writes in, and its fp32 coefficients."""
    n, C = cfg.streams, cfg.dim
    if cfg.connection == "residual" or n == 1:
        return 0.0
    if cfg.connection == "hc":  # reference path: fp32 copies of the state for the coefficients
        return 10 * n * C + 2 * C + 4 * (5 * n + 2 * n * n)
    return 2 * n * C + 2 * C + 4 * (4 * n + 2 * n * n + 1)  # mHC, fused read and write


def layer_activation_bytes(cfg, i: int, tp: int = 1) -> float:
    """Bytes per token that block ``i`` saves for backward (bf16 compute), on one of ``tp`` ranks."""
    C, H = cfg.dim, cfg.ffn_hidden
    norm = 8 * C + 4  # fp32 copy of the input and its normalised fp32 output, rstd
    gathered_in = 2 * C  # the sequence-parallel input all-gathered for a column-parallel projection: not split
    attn = (norm + 14 * C + 4 * cfg.n_heads) / tp + gathered_in  # q, k (rotated), qkv, out, proj input; lse
    if cfg.moe and i >= cfg.first_dense_layers:
        k, He, E = cfg.top_k, cfg.moe_hidden, cfg.n_routed_experts
        # router scores, indices, weights; gathered tokens and the k expert outputs; 4 He per routed row and per
        # shared expert (w1 and w3 outputs, their SwiGLU, the w2 input)
        ffn = norm + 2 * C + 4 * E + 32 * k + 8 + 4 * k * C + 8 * k * He + 8 * He * cfg.n_shared_experts
        ffn = ffn / tp
    else:
        ffn = (norm + 8 * H) / tp + gathered_in  # w1, w3 outputs, SwiGLU, w2 input
    return attn + ffn + 2 * connection_bytes(cfg) / tp


def activation_bytes_per_token(cfg, tp: int = 1, checkpoint: str | None = None) -> float:
    """Saved bf16 activations per token of the whole stack (without the logits) on one of ``tp`` ranks, under
    activation checkpointing ``checkpoint`` (default: the config's ``activation_checkpoint``)."""
    from torch_mhc.distributed.parallelize import checkpointed_blocks

    mode = cfg.activation_checkpoint if checkpoint is None else checkpoint
    per_layer = [layer_activation_bytes(cfg, i, tp) for i in range(cfg.n_layers)]
    chosen = set(checkpointed_blocks(mode, cfg.n_layers))
    # a block's first mHC read after a checkpointed block gets no read-ahead from the post before it (the chain
    # is cut there, see parallelize.apply_activation_checkpoint): it keeps an fp32 copy of the state
    unchained = 4 * cfg.streams * cfg.dim + 8 if cfg.connection == "mhc" and cfg.streams > 1 else 0.0
    kept = sum(b + (unchained if i - 1 in chosen else 0.0) for i, b in enumerate(per_layer) if i not in chosen)
    inputs = len(chosen) * 2 * cfg.streams * cfg.dim / tp  # a checkpointed block keeps its input state
    # one block's activations, live again during its recompute (whose first read is not chained either)
    recompute = max((per_layer[i] + unchained for i in chosen), default=0.0)
    return kept + inputs + recompute


def refused(train_cfg, parallel: ParallelConfig) -> str | None:
    """Why ``mhc train`` would refuse ``parallel`` for this config, or None: the runtime's own check
    (``runtime.layout_problems``, which ``mhc train`` runs before it starts)."""
    from torch_mhc.distributed.runtime import layout_problems

    problems = layout_problems(train_cfg, parallel)
    return "; ".join(problems) if problems else None


def moe_params(model: DecoderLM) -> tuple[list[int], list[int]]:
    """Per block: the parameters of its MoE sublayer (router, shared and routed experts, and the FFN norm:
    not split by tensor parallel, which runs the sublayer on the rank's share of the tokens), and those of
    its routed experts (split over ``ep`` under expert parallel)."""
    from torch_mhc.models.moe import MoE

    sublayer, experts = [], []
    for block in model.blocks:
        moes = [m for m in block.modules() if isinstance(m, MoE)]
        ffn = block.ffn.sublayer
        sublayer.append(sum(p.numel() for p in ffn.parameters()) if moes else 0)
        experts.append(sum(m.w1.numel() + m.w3.numel() + m.w2.numel() for m in moes))
    return sublayer, experts


def gathered_block_params(model: DecoderLM, tp: int = 1, ep: int = 1) -> int:
    """The most parameters FSDP2 gathers for one block on one rank: the TP-split part over ``tp``, the MoE
    sublayer whole but its routed experts over ``ep`` (FSDP2 gathers them over ``dp_shard / ep`` ranks)."""
    sublayer, experts = moe_params(model)
    return max((b - s) / tp + (s - e) + e / ep for b, s, e in zip(block_params(model), sublayer, experts))


def micro_batches_in_flight(schedule: str, pp: int, grad_accum: int) -> float:
    """The most micro-batch activations one pipeline rank holds at once, in micro-batches of ``L / pp`` layers
    (1 without a pipeline: the ``grad_accum`` micro-batches run one after the other).

    Counted on PyTorch's own order of each schedule's actions (``pipeline_order``): a stage's activations of a
    micro-batch live from its forward to its full backward (``B``), or to its weight backward (``W``) when the
    schedule splits the backward (the weight gradients need the saved inputs), and a V or interleaved rank holds
    ``2 pp`` stages of ``L / (2 pp)`` layers each. With ``m = grad_accum``, the busiest rank keeps:

    - 1F1B: ``min(pp, m)`` micro-batches (stage 0's warm-up forwards; its steady phase runs a backward before
      each further forward);
    - Interleaved1F1B: ``min(3 pp - 1, 2 m)`` stage micro-batches on rank 0 (its warm-up is ``pp`` forwards of the
      first stage plus ``2 (pp - 1)``, then one more before the first backward), i.e. about 1.5 x 1F1B's;
    - ZBVZeroBubble: ``min(2 pp, 2 m)`` on every rank (``pp`` micro-batches' worth: as 1F1B);
    - DualPipeV: ``min(2 pp + 1, 2 m)`` (an overlapped forward-backward pair holds one more while both run).

    tests/test_distributed_memory.py checks the last three against the schedules' action lists."""
    if pp <= 1:
        return 1.0
    from torch_mhc.distributed.pipeline import SCHEDULES

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
    m = grad_accum
    stage_micro_batches = {"1F1B": min(pp, m), "Interleaved1F1B": min(3 * pp - 1, 2 * m),
                           "ZBVZeroBubble": min(2 * pp, 2 * m), "DualPipeV": min(2 * pp + 1, 2 * m)}[schedule]
    return stage_micro_batches / SCHEDULES[schedule][1]


def memory_per_gpu(train_cfg, parallel: ParallelConfig, micro_batch: int = 1,
                   checkpoint: str | None = None) -> dict[str, float]:
    """GiB per GPU: ``states`` (params + grads + AdamW), ``gathered`` (FSDP2's unsharded bf16 blocks),
    ``grads`` (FSDP2's unsharded gradient buffers of one block), ``activations`` (one micro-batch, or those the
    pipeline schedule keeps in flight, :func:`micro_batches_in_flight`; under activation checkpointing
    ``checkpoint``, default the config's), ``logits`` and ``total``. An estimate for any layout, also one
    ``mhc train`` refuses (see :func:`refused`)."""
    cfg = train_cfg.model
    with torch.device("meta"):
        model = DecoderLM(cfg)
    n_params = model.num_params()
    tp, pp, ep = parallel.tp, parallel.pp, parallel.ep
    dp_shard = parallel.dp_shard if parallel.dp_mode == "fsdp" else 1
    moe = sum(moe_params(model)[0])  # not split by TP; experts split over ep x dp_shard_mod_ep = dp_shard
    states = 16 * ((n_params - moe) / tp + moe) / (dp_shard * pp)
    gathered = grads = 0.0
    if parallel.dp_mode == "fsdp" and parallel.dp_shard > 1:
        block = gathered_block_params(model, tp, ep)
        gathered = 2 * 2 * block  # this block and the prefetched next one, bf16
        grads = (2 + 4) * block  # one block's bf16 gradients and fp32 reduce-scatter input
    tokens = micro_batch * train_cfg.seq_len
    in_flight = micro_batches_in_flight(parallel.pp_schedule, pp, train_cfg.grad_accum)
    activations = tokens * activation_bytes_per_token(cfg, tp, checkpoint) / pp * in_flight
    logits = tokens * cfg.vocab_size * 10
    out = {"params_b": n_params / 1e9, "states": states / GIB, "gathered": gathered / GIB, "grads": grads / GIB,
           "activations": activations / GIB, "logits": logits / GIB}
    out["total"] = out["states"] + out["gathered"] + out["grads"] + out["activations"] + out["logits"]
    return out


LAYOUT_KEYS = ("dp_shard", "dp_replicate", "tp", "pp", "pp_schedule", "ep", "dp_mode", "ac")


def parse_row(text: str) -> tuple[ParallelConfig, str | None]:
    """``tp=8,dp_shard=8,ac=block`` -> (the layout, the activation checkpointing it names or None)."""
    values = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    ac = values.pop("ac", None)
    if ac is not None:
        from torch_mhc.models.decoder import ModelConfig

        ModelConfig(activation_checkpoint=ac).checkpoint_every  # ValueError when not none | block | every:K
    strings = ("dp_mode", "pp_schedule")
    return replace(ParallelConfig(), **{k: (v if k in strings else int(v)) for k, v in values.items()}), ac


def parse_layout(text: str) -> ParallelConfig:
    return parse_row(text)[0]


def memory_table(train_cfg, layouts: list[str]) -> list[str]:
    """The lines ``mhc memory`` prints, one per layout (``dp_shard=8``, ``tp=8,dp_shard=8``, ``dp_shard=8,ac=block``).
    """
    lines = [f"seq_len {train_cfg.seq_len}, micro-batch 1 sequence per GPU (bf16, activation checkpointing "
             f"{train_cfg.model.activation_checkpoint} unless the layout sets ac=, no mHC recompute)",
             f"{'layout':<34}{'GPUs':>6}{'states':>9}{'gathered':>10}{'grads':>7}{'activ.':>9}{'logits':>8}"
             f"{'total GiB':>11}"]
    for text in layouts:
        par, ac = parse_row(text)
        gpus = par.dp_shard * par.dp_replicate * par.tp * par.pp
        why = refused(train_cfg, par)
        if why is not None:
            lines.append(f"{text:<34}{gpus:>6}  refused by mhc train: {why}")
            continue
        m = memory_per_gpu(train_cfg, par, checkpoint=ac)
        lines.append(f"{text:<34}{gpus:>6}{m['states']:>9.1f}{m['gathered']:>10.1f}{m['grads']:>7.1f}"
                     f"{m['activations']:>9.1f}{m['logits']:>8.1f}{m['total']:>11.1f}")
    return lines
