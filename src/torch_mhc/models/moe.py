"""DeepSeek-style mixture-of-experts FFN: shared experts plus fine-grained routed experts, top-k
routing on sigmoid affinities, and auxiliary-loss-free load balancing (a per-expert bias that only
affects which experts are chosen, nudged after each step towards equal load).

A plain loop over experts: correct and CPU-friendly; grouped-GEMM speed is left for later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed + shared SwiGLU experts. ``[..., dim] -> [..., dim]``.

    Router: ``s = sigmoid(x W_r)`` ``[tokens, E]``; experts chosen by top-k of ``s + bias``; gates are
    the chosen ``s`` normalised to sum 1. ``bias`` is a buffer, updated by :meth:`update_bias` from the
    expert loads counted in the forward passes since the last update.
    """

    def __init__(self, dim: int, n_routed: int, n_shared: int, top_k: int, expert_hidden: int, bias_rate: float = 1e-3):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"MoE needs 1 <= top_k <= n_routed_experts, got top_k={top_k}, n_routed={n_routed}")
        self.n_routed, self.top_k, self.bias_rate = n_routed, top_k, bias_rate
        self.router = nn.Linear(dim, n_routed, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_routed, dim, expert_hidden))
        self.w3 = nn.Parameter(torch.empty(n_routed, dim, expert_hidden))
        self.w2 = nn.Parameter(torch.empty(n_routed, expert_hidden, dim))
        self.shared = SwiGLU(dim, n_shared * expert_hidden) if n_shared > 0 else None
        self.register_buffer("bias", torch.zeros(n_routed), persistent=True)
        self.register_buffer("load", torch.zeros(n_routed), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[tokens, dim]`` -> (expert ids ``[tokens, k]``, gates ``[tokens, k]`` fp32)."""
        scores = torch.sigmoid(self.router(x).float())
        idx = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, idx)
        return idx, gates / gates.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, gates = self.route(x)
        if self.training:
            self.load += torch.bincount(idx.flatten(), minlength=self.n_routed).to(self.load.dtype)
        out = torch.zeros_like(x)
        for e in range(self.n_routed):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            h = x[token]
            h = (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]
            out.index_add_(0, token, (h * gates[token, slot, None]).to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def reset_balance(self) -> None:
        """Clear the balancing state (routing bias and counted loads), as at construction."""
        self.bias.zero_()
        self.load.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
        if self.load.sum() > 0:
            self.bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
