"""Entering and leaving the n-stream residual state."""

from __future__ import annotations

import torch
from torch import nn

from torch_mhc.nn.functional import stream_pre
from torch_mhc.numerics import compute_dtype, no_autocast


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., C] -> [..., n, C]``: every stream a copy of x (a broadcast view; writes make copies)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if x.dim() < 1:
        raise ValueError(f"expand_streams expects a tensor of shape [..., C], got {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])


def merge_streams(streams: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """``[..., n, C] -> [..., C]`` by the sum or the mean over streams (for "head" use :class:`HyperHead`)."""
    if streams.dim() < 2:
        raise ValueError(f"merge_streams expects streams of shape [..., n, C], got {tuple(streams.shape)}")
    if mode == "sum":
        return streams.sum(dim=-2)
    if mode == "mean":
        return streams.mean(dim=-2)
    raise ValueError(f"merge mode must be 'sum' or 'mean' here, got {mode!r} (use HyperHead for 'head')")


class HyperHead(nn.Module):
    """DeepSeek-V4's learned merge before the final norm:
    ``w = sigmoid(scale * (x_hat fn^T) + base) + eps``, output ``sum_i w_i x_i``.

    streams ``[..., n, dim]`` -> ``[..., dim]``. Parameters ``fn [n, n*dim]`` (zero init),
    ``base [n]`` (zero init: w = 1/2), ``scale [1]`` (0.01).
    """

    DECAYED = ("fn",)

    def __init__(self, dim: int, n: int = 4, eps: float = 1e-6, scale_init: float = 0.01):
        super().__init__()
        if n < 1 or dim < 1:
            raise ValueError(f"HyperHead needs n >= 1 and dim >= 1, got n={n}, dim={dim}")
        self.dim, self.n, self.eps, self.scale_init = dim, n, eps, scale_init
        self.fn = nn.Parameter(torch.empty(n, n * dim))
        self.base = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """fn = 0, base = 0 (w = 1/2 + eps), scale = scale_init; nothing random."""
        self.fn.zero_()
        self.base.zero_()
        self.scale.fill_(float(self.scale_init))

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        """Merge weights ``[..., n]`` (fp32; fp64 for fp64 streams)."""
        if streams.dim() < 2 or streams.shape[-2:] != (self.n, self.dim):
            raise ValueError(
                f"HyperHead expects streams of shape [..., n={self.n}, dim={self.dim}], got {tuple(streams.shape)}"
            )
        cdt = compute_dtype(streams.dtype)
        with no_autocast(streams):
            xf = streams.flatten(-2).to(cdt)
            inv_rms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
            logits = self.scale.to(cdt) * (xf @ self.fn.t().to(cdt)) * inv_rms + self.base.to(cdt)
            return torch.sigmoid(logits) + self.eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return stream_pre(streams, self.weights(streams))
