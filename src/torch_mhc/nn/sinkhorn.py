"""Sinkhorn-Knopp projection of ``[..., n, n]`` logits onto (nearly) doubly stochastic matrices.

Orientation: the paper's. Each of ``iters`` rounds normalises columns, then rows, so the row sums of
the result are 1 (up to ``eps``) and the column sums approach 1 as ``iters`` grows.

- ``start="exp"`` (paper):  ``M = exp(L)``, then ``iters`` x (columns, rows).
- ``start="softmax"`` (DeepSeek-V4, read transposed): ``M = softmax(L, dim=-2) + eps`` (= exp and
  the first column normalisation), then rows, then ``iters - 1`` x (columns, rows).

The computation runs in fp32 whatever the input dtype (fp64 stays fp64, for gradcheck).
:class:`SinkhornFunction` saves only the logits and recomputes the iterations in backward, so the
memory kept for backward does not depend on ``iters`` (the recomputed iterates live only during
that backward call); its gradient is the exact gradient of the finite iteration (not the
implicit-function gradient of the converged limit).
"""

from __future__ import annotations

import torch

from torch_mhc.numerics import COL, EXP_SAFE_MAX, ROW, SINKHORN_STARTS, compute_dtype, sinkhorn_steps

# The iterations run on a [n, n, ...] layout (matrix dims first, tokens contiguous last): reductions
# over a size-n dim then vectorise over tokens, about 10x faster on CPUs than on [..., n, n].
# COL (= 0) and ROW (= 1) are both the normalisation names and the work layout's matrix dims.


def _to_work(t: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(t.dtype)).movedim((-2, -1), (0, 1)).contiguous()


def _from_work(t: torch.Tensor) -> torch.Tensor:
    return t.movedim((0, 1), (-2, -1))


def _start(L: torch.Tensor, eps: float, start: str):
    """Starting matrix from work-layout logits, with what the backward needs (shift or softmax)."""
    if start == "exp":
        # exp(L) as the spec writes it; only logits above EXP_SAFE_MAX are shifted down (a shift of
        # all entries cancels in the first normalisation, up to eps), so exp never overflows.
        shift = (L.amax(dim=(COL, ROW), keepdim=True) - EXP_SAFE_MAX).clamp(min=0)
        return torch.exp(L - shift), shift
    soft = torch.softmax(L, dim=COL)
    return soft + eps, soft


def sinkhorn_reference(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6, start: str = "exp") -> torch.Tensor:
    """Plain differentiable Sinkhorn-Knopp. logits ``[..., n, n]`` -> ``[..., n, n]`` (fp32 or fp64)."""
    m, _ = _start(_to_work(logits), eps, start)
    for dim in sinkhorn_steps(iters, start):
        m = m / (m.sum(dim=dim, keepdim=True) + eps)
    return _from_work(m)


def sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float, start: str) -> torch.Tensor:
    """Exact gradient of :func:`sinkhorn_reference` w.r.t. the logits, recomputing the iterations.

    Carried as ``h = dm * m`` (gradient times value) rather than ``dm``: for one normalisation
    ``y = m / (sum(m) + eps)`` along a dim, ``dm = (dy - sum(dy * m) / den) / den`` becomes
    ``h_in = h_out - y * sum(h_out)`` (``h_out = dy * y``), with no division. ``dm`` itself grows by 1/eps a step
    in a row or column whose sum is below eps (the exp start underflowing when logits spread by about 100): inf,
    then NaN in ``inf * 0``, in fp32, where ``h`` stays bounded; the exp start's gradient is ``h`` itself.
    """
    L = _to_work(logits)
    m0, aux = _start(L, eps, start)
    outputs, m = [], m0
    for dim in sinkhorn_steps(iters, start):
        m = m / (m.sum(dim=dim, keepdim=True) + eps)
        outputs.append((dim, m))
    h = _to_work(grad).to(L.dtype) * m
    for dim, y in reversed(outputs):
        h = h - y * h.sum(dim=dim, keepdim=True)
    if start == "softmax":  # m0 = soft + eps: soft * dm0 = h * (soft / m0), the ratio in [0, 1]
        q = torch.where(m0 > 0, h * (aux / m0), 0.0)
        return _from_work(q - aux * q.sum(dim=COL, keepdim=True))
    # Where the shift is on ([1, 1, ...] aux > 0) it follows the (first) largest logit: minus the total gradient
    # goes there. Selected with a mask rather than under `if active.any()`: no value read back to the host.
    n = L.shape[0]
    flat = h.flatten(0, 1)
    top = L.flatten(0, 1).argmax(dim=0, keepdim=True)
    entry = torch.arange(n * n, device=L.device).view(-1, *([1] * (flat.dim() - 1)))
    hit = (entry == top) & (aux > 0).flatten(0, 1)
    return _from_work(torch.where(hit, flat - flat.sum(dim=0, keepdim=True), flat).unflatten(0, (n, n)))


class SinkhornFunction(torch.autograd.Function):
    """Sinkhorn with a recomputing backward: saves only the logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float, start: str) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.config = (iters, eps, start)
        return sinkhorn_reference(logits, iters, eps, start)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(logits, grad_out, *ctx.config).to(logits.dtype), None, None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6, start: str = "exp") -> torch.Tensor:
    """Project ``[..., n, n]`` logits onto doubly stochastic matrices; returns fp32 (fp64 for fp64 input).

    Row sums are 1 (to fp32 precision and ``eps``); column sums converge to 1 with ``iters``.
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects logits of shape [..., n, n], got {tuple(logits.shape)}")
    if start not in SINKHORN_STARTS:
        raise ValueError(f"sinkhorn start must be one of {SINKHORN_STARTS}, got {start!r}")
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    if eps < 0:
        raise ValueError(f"sinkhorn needs eps >= 0, got {eps}")
    if not logits.requires_grad:
        return sinkhorn_reference(logits, iters, eps, start)
    return SinkhornFunction.apply(logits, int(iters), float(eps), start)
