"""Diagnostics of a model in training: one extra forward on a fixed batch records every
connection's coefficients; gains and statistics are computed from them."""

from __future__ import annotations

import torch

from torch_mhc.diagnostics.gains import amax_gains, coefficient_stats


@torch.no_grad()
def record_coefficients(model, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model(idx)`` and return each connection's (H_pre, H_post, H_res) over the batch's tokens."""
    conns = model.connections()
    was_training = model.training
    model.eval()
    for c in conns:
        c.record, c.recorded = True, None
    try:
        model(idx)
        return [c.recorded for c in conns]
    finally:
        for c in conns:
            c.record, c.recorded = False, None
        model.train(was_training)


def diagnostic_batch(data, batch_size: int) -> torch.Tensor:
    """The fixed input of the diagnostics: the first validation windows, at most 4 of them ``[B, T]``."""
    return next(data.val_batches(min(batch_size, 4), 1))[0]


def collect_diagnostics(model, idx: torch.Tensor, step: int) -> dict:
    """Per-layer coefficient statistics and Amax gains (H_res averaged over the batch's tokens)."""
    coeffs = record_coefficients(model, idx)
    n = coeffs[0][2].shape[-1]
    mean_res = torch.stack([c[2].reshape(-1, n, n).double().mean(0) for c in coeffs])
    gains = amax_gains(mean_res)
    layers = [coefficient_stats(*c) for c in coeffs]
    summary = {
        "max_single_fwd_gain": max(gains["single_fwd"]), "max_single_bwd_gain": max(gains["single_bwd"]),
        "max_composite_fwd_gain": max(gains["composite_fwd"]), "max_composite_bwd_gain": max(gains["composite_bwd"]),
    }
    return {"step": step, "summary": summary, "gains": gains, "layers": layers,
            "h_res_mean": mean_res.tolist()}


def grad_norms_by_group(model) -> dict[str, float]:
    """L2 norm of the gradients per parameter role (``model.parameter_roles()``: embed, attn, ffn,
    connection, head) as ``grad_norm_<role>``."""
    roles = model.parameter_roles()
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            role = roles[name][0]
            groups[role] = groups.get(role, 0.0) + p.grad.detach().float().square().sum().item()
    return {f"grad_norm_{k}": v ** 0.5 for k, v in groups.items()}
