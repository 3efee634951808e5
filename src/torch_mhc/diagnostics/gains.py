"""The paper's stability metric (spec section 6), per-layer coefficient statistics and stream health.

For matrices ``H [L, n, n]`` (one per sublayer, averaged over tokens), the composite from layer l
to the end is ``P_l = H_{L-1} @ ... @ H_{l+1} @ H_l`` (the map from x_l to x_L along the residual
path). Forward gain: max absolute row sum; backward gain: max absolute column sum; distance from uniform:
the spectral norm of ``P_l - J/n`` (how much of the streams' differences survives the product).
"""

from __future__ import annotations

import torch


def forward_gain(m: torch.Tensor) -> torch.Tensor:
    """Max absolute row sum of ``[..., n, n]`` -> ``[...]``."""
    return m.abs().sum(-1).amax(-1)


def backward_gain(m: torch.Tensor) -> torch.Tensor:
    """Max absolute column sum of ``[..., n, n]`` -> ``[...]``."""
    return m.abs().sum(-2).amax(-1)


def composites(h_res: torch.Tensor) -> torch.Tensor:
    """``[L, n, n]`` -> ``[L, n, n]``: entry l is ``H_{L-1} @ ... @ H_l``."""
    if h_res.dim() != 3 or h_res.shape[-1] != h_res.shape[-2]:
        raise ValueError(f"composites expects [L, n, n] matrices, got {tuple(h_res.shape)}")
    out = torch.empty_like(h_res, dtype=torch.float64)
    acc = torch.eye(h_res.shape[-1], dtype=torch.float64, device=h_res.device)
    for layer in range(h_res.shape[0] - 1, -1, -1):
        acc = acc @ h_res[layer].double()
        out[layer] = acc
    return out


def distance_from_uniform(m: torch.Tensor) -> torch.Tensor:
    """Spectral norm of ``m - J/n`` for ``[..., n, n]`` -> ``[...]`` (float64). For a doubly stochastic m it is
    m's second singular value (the largest, 1, belongs to the all-ones vector): 1 for a permutation, which mixes
    nothing, 0 for the uniform average J/n, where the n streams have collapsed into one."""
    return torch.linalg.matrix_norm(m.double() - 1.0 / m.shape[-1], ord=2)


def amax_gains(h_res: torch.Tensor) -> dict[str, list[float]]:
    """Single-layer and composite forward/backward gains for ``[L, n, n]`` matrices, and each composite's
    :func:`distance_from_uniform` (``composite_from_uniform``: does the product collapse towards J/n with depth?)."""
    comp = composites(h_res)
    return {
        "single_fwd": forward_gain(h_res.double()).tolist(),
        "single_bwd": backward_gain(h_res.double()).tolist(),
        "composite_fwd": forward_gain(comp).tolist(),
        "composite_bwd": backward_gain(comp).tolist(),
        "composite_from_uniform": distance_from_uniform(comp).tolist(),
    }


def coefficient_stats(h_pre: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> dict[str, float]:
    """Statistics of one layer's coefficients over tokens: h_pre, h_post ``[..., n]``, h_res ``[..., n, n]``."""
    n = h_res.shape[-1]
    res = h_res.reshape(-1, n, n).double()
    mean_res = res.mean(0)
    eye = torch.eye(n, dtype=torch.float64, device=res.device)
    return {
        "pre_mean": h_pre.double().mean().item(), "pre_min": h_pre.min().item(), "pre_max": h_pre.max().item(),
        "post_mean": h_post.double().mean().item(), "post_min": h_post.min().item(), "post_max": h_post.max().item(),
        "res_min": res.min().item(), "res_max": res.max().item(),
        "res_row_err": (res.sum(-1) - 1).abs().max().item(),
        "res_col_err": (res.sum(-2) - 1).abs().max().item(),
        "res_dist_identity": torch.linalg.matrix_norm(mean_res - eye).item(),
        "res_dist_uniform": torch.linalg.matrix_norm(mean_res - 1.0 / n).item(),
    }


PRE_SATURATION = (0.02, 0.98)  # H_pre outside this interval: the sigmoid's gradient is below ~0.02
POST_SATURATION = 0.1  # H_post below this: the stream barely receives F's output


def saturation_stats(h_pre: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> dict[str, float]:
    """Saturation of mHC's sigmoids and exp over tokens (h_pre, h_post ``[..., n]``, h_res ``[..., n, n]``):
    fractions of H_pre outside (0.02, 0.98), of H_post < 0.1, and of H_res entries that are exactly 0
    (``res_zero_frac``: exp underflow, so no gradient reaches their logits)."""
    lo, hi = PRE_SATURATION
    return {"pre_saturated": ((h_pre <= lo) | (h_pre >= hi)).double().mean().item(),
            "post_saturated": (h_post < POST_SATURATION).double().mean().item(),
            "res_zero_frac": (h_res == 0).double().mean().item()}


def stream_stats(streams: torch.Tensor, h_pre: torch.Tensor, h_post: torch.Tensor) -> dict[str, float | list[float]]:
    """Health of the n streams entering one connection. streams ``[..., n, C]``; h_pre, h_post ``[..., n]``.

    - ``stream_copy_dist``: sqrt(sum_i |x_i - mean_j x_j|^2 / sum_i |x_i|^2) over all tokens; 0 when the
      streams are copies of each other, 1 when they are orthogonal with equal norms and sum to zero.
    - ``read_share`` / ``write_share`` ``[n]``: each stream's share of sum_i |H_pre_i| and sum_i |H_post_i|
      (token mean); ``max_read_share`` / ``max_write_share`` near 1: one stream takes over.
    """
    n = streams.shape[-2]
    x = streams.reshape(-1, n, streams.shape[-1]).double()
    spread = (x - x.mean(-2, keepdim=True)).square().sum()
    copy_dist = (spread / x.square().sum().clamp_min(1e-300)).sqrt().item()
    pre = h_pre.reshape(-1, n).double().abs()
    post = h_post.reshape(-1, n).double().abs()
    read = (pre / pre.sum(-1, keepdim=True).clamp_min(1e-300)).mean(0)
    write = (post / post.sum(-1, keepdim=True).clamp_min(1e-300)).mean(0)
    return {"stream_copy_dist": copy_dist, "read_share": read.tolist(), "write_share": write.tolist(),
            "max_read_share": read.max().item(), "max_write_share": write.max().item()}


def logit_spread(dynamic_logits: torch.Tensor, n: int) -> dict[str, float]:
    """Spread over tokens of the dynamic logits ``[..., 2n + k]`` (columns pre | post | res, k = the H_res
    map's logit count): per mapping, the mean over its columns of the standard deviation over tokens. A map
    without logits (identity, k = 0) has no res entry."""
    sd = dynamic_logits.reshape(-1, dynamic_logits.shape[-1]).double().std(0, correction=0)
    spread = {"pre_logit_spread": sd[:n].mean().item(), "post_logit_spread": sd[n:2 * n].mean().item()}
    if sd.numel() > 2 * n:
        spread["res_logit_spread"] = sd[2 * n:].mean().item()
    return spread
