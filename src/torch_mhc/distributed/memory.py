"""Per-GPU memory estimate of a training config under a parallel layout (a planning aid, not a
measurement): parameter, gradient and AdamW states, FSDP2's gathered blocks, and activations.

    mhc memory configs/paper-27b.toml dp_shard=64 tp=8,dp_shard=8

Model: bf16 compute (FSDP2 mixed precision: bf16 gathered params, fp32 master params, fp32 grads,
fp32 AdamW moments = 16 bytes per parameter, divided over the shards). Activations are saved
tensors per token in bf16, without activation checkpointing or mHC recompute (an upper estimate):
per sublayer the mHC stream state and its working copy (2 n C), attention 6 C, a dense SwiGLU
2 C + 3 H, an MoE layer 2 C + top_k (C + 3 H_e) + 3 n_shared H_e; plus the logits (bf16) and the
fp32 loss input and its gradient (10 bytes x vocab per token). Tensor parallel with sequence
parallel divides the activations (and the sharded weights) by tp; the full logits are on every TP
rank. Pipeline (1F1B) stages hold 1/pp of the layers but up to pp micro-batches in flight.
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


def activation_bytes_per_token(cfg) -> float:
    """Saved bf16 activations per token of the whole stack (no recompute), without the logits."""
    C, n, H = cfg.dim, cfg.streams, cfg.ffn_hidden
    total = 0
    for i in range(cfg.n_layers):
        stream = 2 * n * C if cfg.streams > 1 else C
        attn = 6 * C
        if cfg.moe and i >= cfg.first_dense_layers:
            ffn = 2 * C + cfg.top_k * (C + 3 * cfg.moe_hidden) + 3 * cfg.n_shared_experts * cfg.moe_hidden
        else:
            ffn = 2 * C + 3 * H
        total += 2 * stream + attn + ffn
    return 2.0 * total


def memory_per_gpu(train_cfg, parallel: ParallelConfig, micro_batch: int = 1) -> dict[str, float]:
    """GiB per GPU: ``states`` (params + grads + AdamW), ``gathered`` (FSDP2's unsharded bf16 blocks),
    ``activations`` (one micro-batch, or pp of them in flight), ``logits`` and ``total``."""
    cfg = train_cfg.model
    with torch.device("meta"):
        model = DecoderLM(cfg)
    n_params = model.num_params()
    tp, pp = parallel.tp, parallel.pp
    shard = (parallel.dp_shard if parallel.dp_mode == "fsdp" else 1) * tp * pp
    states = 16 * n_params / shard
    gathered = 0.0
    if parallel.dp_mode == "fsdp" and parallel.dp_shard > 1:
        gathered = 2 * 2 * max(block_params(model)) / tp  # this block and the prefetched next one, bf16
    tokens = micro_batch * train_cfg.seq_len
    in_flight = pp  # 1F1B: stage 0 holds pp micro-batches of its L/pp layers
    activations = tokens * activation_bytes_per_token(cfg) / tp / pp * in_flight
    logits = tokens * cfg.vocab_size * 10
    out = {"params_b": n_params / 1e9, "states": states / GIB, "gathered": gathered / GIB,
           "activations": activations / GIB, "logits": logits / GIB}
    out["total"] = out["states"] + out["gathered"] + out["activations"] + out["logits"]
    return out


def parse_layout(text: str) -> ParallelConfig:
    values = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    return replace(ParallelConfig(), **{k: (v if k == "dp_mode" else int(v)) for k, v in values.items()})


def memory_table(train_cfg, layouts: list[str]) -> list[str]:
    """The lines ``mhc memory`` prints: one per layout (``dp_shard=8``, ``tp=8,dp_shard=8``, ...)."""
    lines = [f"seq_len {train_cfg.seq_len}, micro-batch 1 sequence per GPU (bf16, no recompute)",
             f"{'layout':<34}{'GPUs':>6}{'states':>9}{'gathered':>10}{'activ.':>9}{'logits':>8}{'total GiB':>11}"]
    for text in layouts:
        par = parse_layout(text)
        m = memory_per_gpu(train_cfg, par)
        gpus = par.dp_shard * par.dp_replicate * par.tp * par.pp
        lines.append(f"{text:<34}{gpus:>6}{m['states']:>9.1f}{m['gathered']:>10.1f}{m['activations']:>9.1f}"
                     f"{m['logits']:>8.1f}{m['total']:>11.1f}")
    return lines
