"""Diagnostics of a model in training: one extra forward on a fixed batch records every
connection's coefficients and input streams; gains, statistics and stream health are computed from them."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from torch_mhc.diagnostics.gains import (
    amax_gains,
    coefficient_stats,
    logit_spread,
    saturation_stats,
    stream_stats,
)


@torch.no_grad()
def record_coefficients(model, idx: torch.Tensor, streams: list | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model(idx)`` and return each connection's (H_pre, H_post, H_res) over the batch's tokens.
    When a list is given as ``streams``, it receives each connection's input streams ``[B, T, n, C]``
    in the order of ``model.connections()`` (taken in ``pre``, so models that call ``pre``/``post``
    themselves are covered too)."""
    conns = model.connections()
    was_training = model.training
    model.eval()
    seen: dict[int, torch.Tensor] = {}
    for i, c in enumerate(conns):
        c.record, c.recorded = True, None
        if streams is not None:  # an instance attribute shadows the method until it is deleted below
            c.pre = lambda x, *a, _i=i, _pre=c.pre, **k: (seen.setdefault(_i, x.detach()), _pre(x, *a, **k))[1]
    try:
        model(idx)
        if streams is not None:
            streams.extend(seen[i] for i in range(len(conns)))
        return [c.recorded for c in conns]
    finally:
        for c in conns:
            c.record, c.recorded = False, None
            c.__dict__.pop("pre", None)
        model.train(was_training)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole value of a parameter: a DTensor (an FSDP2/HSDP shard between forwards) is gathered,
    which is a collective (every rank must call it, in the same order); a plain tensor is returned as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def connection_alpha(conn) -> list[float] | None:
    """The scales of the dynamic terms (pre, post, res): mHC's alpha, HC's scale; None without them."""
    if hasattr(conn, "projection"):
        return full(conn.projection()[2]).detach().double().tolist()
    scale = getattr(conn, "scale", None)
    return full(scale).detach().double().tolist() if isinstance(scale, torch.Tensor) else None


def dynamic_logits(conn, streams: torch.Tensor) -> torch.Tensor | None:
    """The per-token (dynamic) part of a connection's logits ``[..., 2n + k]`` (columns pre | post | res: k res
    logits, mHC's H_res map's; n^2 row-major for Sinkhorn and HC; bias excluded) for input streams
    ``[..., n, C]``; None for fixed or static connections."""
    n = streams.shape[-2]
    x = streams.double()
    if hasattr(conn, "projection"):  # mHC: alpha * (x_hat phi), x_hat = flattened streams / rms
        if not conn.dynamic:
            return None
        phi, _, alpha = (full(t) for t in conn.projection())
        xf = x.flatten(-2)
        inv_rms = torch.rsqrt(xf.square().mean(-1, keepdim=True) + conn.eps)
        scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(phi.shape[-1] - 2 * n)]).double()
        return (xf @ phi.double()) * inv_rms * scale
    if getattr(conn, "w_pre", None) is not None:  # HC: s * tanh(norm(x_i) w), per stream
        xn = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + conn.eps)
        s, w_pre, w_post, w_res = (full(t).double() for t in (conn.scale, conn.w_pre, conn.w_post, conn.w_res))
        pre = s[0] * torch.tanh(xn @ w_pre)
        post = s[1] * torch.tanh(xn @ w_post)
        res = (s[2] * torch.tanh(xn @ w_res)).transpose(-1, -2).flatten(-2)  # H_res = A_r^T
        return torch.cat([pre, post, res], -1)
    return None


def layer_stats(conn, streams: torch.Tensor, coeffs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    """Every per-layer statistic of one connection: coefficients, alpha, logit spread, saturation, stream health."""
    stats = {**coefficient_stats(*coeffs), **stream_stats(streams, coeffs[0], coeffs[1]),
             "alpha": connection_alpha(conn)}
    if hasattr(conn, "projection"):  # sigmoid and exp saturation only exist in mHC
        stats.update(saturation_stats(*coeffs))
        if "res" not in conn.learn:  # H_res fixed to I: its zeros are not underflow
            del stats["res_zero_frac"]
    logits = dynamic_logits(conn, streams)
    if logits is not None:
        stats.update(logit_spread(logits, streams.shape[-2]))
    return stats


def diagnostic_batch(data, batch_size: int) -> torch.Tensor:
    """The fixed input of the diagnostics: the first validation windows, at most 4 of them ``[B, T]``."""
    return next(data.val_batches(min(batch_size, 4), 1))[0]


def whole_sequence(t: torch.Tensor, seq_mesh, seq_len: int) -> torch.Tensor:
    """``[B, S/tp, ...]``, this rank's share of the tokens under sequence parallel, -> ``[B, S, ...]`` (a
    collective over ``seq_mesh``; shares in mesh order, uneven ones as ``torch.chunk`` cuts them)."""
    shape = (t.shape[0], seq_len, *t.shape[2:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t.contiguous(), seq_mesh, [Shard(1)], run_check=False, shape=shape,
                              stride=stride).full_tensor()


def collect_diagnostics(model, idx: torch.Tensor, step: int, seq_mesh=None) -> dict:
    """Per-layer coefficient statistics, alpha, saturation and stream health, and the Amax gains (H_res averaged
    over the batch's tokens ``idx [B, S]``); ``summary`` holds the extremes over layers (logged with the metrics).
    ``seq_mesh``: the tensor-parallel mesh when the streams are sequence-sharded between sublayers; every rank
    then gathers all S tokens, so the figures are those of one process (every rank must call this)."""
    streams: list[torch.Tensor] = []
    coeffs = record_coefficients(model, idx, streams)
    if seq_mesh is not None:
        streams = [whole_sequence(x, seq_mesh, idx.shape[1]) for x in streams]
        coeffs = [tuple(whole_sequence(h, seq_mesh, idx.shape[1]) for h in c) for c in coeffs]
    n = coeffs[0][2].shape[-1]
    mean_res = torch.stack([c[2].reshape(-1, n, n).double().mean(0) for c in coeffs])
    with torch.no_grad():
        layers = [layer_stats(conn, x, c) for conn, x, c in zip(model.connections(), streams, coeffs)]
    return diagnostics_record(step, layers, mean_res)


def diagnostics_record(step: int, layers: list[dict], mean_res: torch.Tensor) -> dict:
    """The diagnostics record of every connection's ``layer_stats`` and batch-mean H_res ``[L, n, n]``
    (depth order): the Amax gains and the summary over layers (also for layers gathered from pipeline stages)."""
    gains = amax_gains(mean_res)
    alphas = [abs(a) for s in layers for a in (s["alpha"] or [])]
    summary = {
        "max_single_fwd_gain": max(gains["single_fwd"]), "max_single_bwd_gain": max(gains["single_bwd"]),
        "max_composite_fwd_gain": max(gains["composite_fwd"]), "max_composite_bwd_gain": max(gains["composite_bwd"]),
        "stack_from_uniform": gains["composite_from_uniform"][0],
        "max_abs_alpha": max(alphas) if alphas else None,
        "mean_stream_copy_dist": mean_stream_copy_dist(layers),
        "max_read_share": max(s["max_read_share"] for s in layers),
        "max_write_share": max(s["max_write_share"] for s in layers),
    }
    for key in ("pre_saturated", "post_saturated", "res_zero_frac"):
        if any(key in s for s in layers):
            summary[f"max_{key}"] = max(s[key] for s in layers if key in s)
    summary = {k: v for k, v in summary.items() if v is not None and math.isfinite(v)}
    return {"step": step, "summary": summary, "gains": gains, "layers": layers,
            "h_res_mean": mean_res.tolist()}


def mean_stream_copy_dist(layers: list[dict]) -> float:
    """Mean over layers of the streams' distance from copies, leaving out the first layer (whose input is
    n copies of the embedding by construction) when there are others."""
    values = [s["stream_copy_dist"] for s in layers]
    return sum(values[1:] or values) / len(values[1:] or values)


def grad_norms_by_group(model) -> dict[str, float]:
    """L2 norm of the gradients per parameter role (``model.parameter_roles()``: embed, attn, ffn,
    connection, head) as ``grad_norm_<role>``. A sharded (DTensor) gradient counts whole: its sum of
    squares is reduced over the ranks, so under FSDP/TP every rank must call this (a collective)."""
    roles = model.parameter_roles()
    groups: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            s = p.grad.detach().float().square().sum()
            if isinstance(s, DTensor):
                s = s.full_tensor()
            role = roles[name][0]
            groups[role] = groups.get(role, 0.0) + s.item()
    return {f"grad_norm_{k}": v ** 0.5 for k, v in groups.items()}


def h_res_distances(h_res: list | torch.Tensor, start: list | torch.Tensor | None = None) -> dict[str, float]:
    """How far each layer's token-mean H_res ``[L, n, n]`` (``collect_diagnostics``' ``h_res_mean``) lies from I,
    from the uniform matrix J/n and, given ``start`` (the same at step 0), from where it started: Frobenius
    norms, mean over layers (``from_identity``, ``from_uniform``, ``from_start``). For n streams I and J/n are
    sqrt(n - 1) apart."""
    h = torch.as_tensor(h_res, dtype=torch.float64)
    n = h.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    out = {"from_identity": torch.linalg.matrix_norm(h - eye).mean().item(),
           "from_uniform": torch.linalg.matrix_norm(h - 1.0 / n).mean().item()}
    if start is not None:
        out["from_start"] = torch.linalg.matrix_norm(h - torch.as_tensor(start, dtype=torch.float64)).mean().item()
    return out
