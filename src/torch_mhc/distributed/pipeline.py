"""Pipeline parallel with ``torch.distributed.pipelining``: a ``DecoderLM`` cut into stages whose
stage tensor is the stream state ``[b, S, n, C]`` (the first stage embeds and expands, the last
merges and applies the head), run by any schedule PyTorch ships (1F1B, interleaved 1F1B, zero bubble).

Point-to-point traffic: each stage boundary sends the n-stream state forward and its gradient
backward, ``b * S * n * C`` elements per micro-batch each way: n times what a residual network of
the same width sends (:func:`p2p_bytes_per_step`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from torch_mhc.errors import UserError
from torch_mhc.models.decoder import lm_loss
from torch_mhc.nn import chain_reads


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
        chain_reads([c for b in self.blocks.values() for c in (b.attn, b.ffn)])  # no read-ahead into another stage
        if self.first:
            self.embed = model.embed
        if self.last:
            self.head_merge, self.norm, self.lm_head = model.head_merge, model.norm, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        h = model.enter_streams(x) if self.first else x
        for block in self.blocks.values():
            h = block(h, model.rope_cos, model.rope_sin)
        return model.leave_streams(h) if self.last else h


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


def build_stages(model: nn.Module, stage_ids: list[int], n_stages: int, micro_batch: int, seq_len: int,
                 device: torch.device, group=None) -> list[PipelineStage]:
    """``PipelineStage`` objects for the stages this rank runs (one for 1F1B, several interleaved).
    The stages are told their input shapes (tokens ``[b, S]``, then streams ``[b, S, n, C]``) instead
    of inferring them from a forward on uninitialised memory."""
    cfg = model.cfg
    bounds = stage_bounds(len(model.blocks), n_stages)
    dtype = model.embed.weight.dtype if cfg.stream_dtype == "auto" else getattr(torch, cfg.stream_dtype)
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long, device=device)
    streams = torch.zeros(micro_batch, seq_len, cfg.streams, cfg.dim, dtype=dtype, device=device, requires_grad=True)
    stages = []
    for s in stage_ids:
        start, stop = bounds[s]
        out = streams if stop < cfg.n_layers else torch.zeros(micro_batch, seq_len, cfg.vocab_size, device=device)
        stages.append(PipelineStage(StreamStage(model, start, stop), s, n_stages, device,
                                    input_args=tokens if start == 0 else streams, output_args=out, group=group))
    return stages


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss the last stage computes per micro-batch (the model's own)."""
    return lm_loss(logits, targets)


def p2p_bytes_per_step(batch: int, seq_len: int, dim: int, n_streams: int, n_stages: int,
                       bytes_per_element: int = 2) -> dict[str, float]:
    """Point-to-point bytes one optimizer step sends over all stage boundaries (activations forward
    plus their gradients backward), for the n-stream state and for a residual network of the same width."""
    per_boundary = 2 * batch * seq_len * dim * bytes_per_element  # forward + backward, all micro-batches
    boundaries = n_stages - 1
    return {"mhc": per_boundary * n_streams * boundaries, "residual": per_boundary * boundaries,
            "ratio": float(n_streams)}
