"""The mHC / HC math as plain functions. This is the reference path: the fused Triton ops in
:mod:`torch_mhc.ops` compute the same functions and are tested against these.

Shapes: ``x`` is the residual state ``[..., n, C]``; coefficients come back in fp32 (fp64 for fp64 streams) as
``H_pre [..., n]``, ``H_post [..., n]`` and ``H_res [..., n, n]`` with ``out = H_res @ x``
(row i of ``H_res`` says how much of each input stream goes into output stream i).
"""

from __future__ import annotations

import functools

import torch

from torch_mhc import ops
from torch_mhc.nn import custom_ops
from torch_mhc.nn.maps import HResMap, SinkhornMap
from torch_mhc.numerics import compute_dtype, no_autocast, sinkhorn_start


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise ValueError on NaN/Inf, where that costs no device sync (CPU, not compiling)."""
    if t.is_cuda or torch.compiler.is_compiling():
        return
    if not torch.isfinite(t).all():
        raise ValueError(f"non-finite values (NaN or Inf) in {what}")


def check_channels(x: torch.Tensor) -> None:
    """Dynamic coefficients read the streams' RMS over n * C channels: C = 0 has none (a named error, not a NaN
    or a reshape failure)."""
    if x.shape[-1] == 0:
        raise ValueError(f"dynamic mHC coefficients need streams with at least one channel, got x of shape "
                         f"{tuple(x.shape)} ([..., n, C] with C = 0)")


def fused():
    """Where the fused path goes: the kernels' autograd Functions (:mod:`torch_mhc.ops`), or under
    ``torch.compile`` the ``torch_mhc::`` custom ops (:mod:`torch_mhc.nn.custom_ops`, same functions)."""
    return custom_ops if torch.compiler.is_compiling() else ops


@functools.cache
def alpha_columns(n: int, device: torch.device, k: int | None = None) -> torch.Tensor:
    """Which alpha (0 pre, 1 post, 2 res) scales each of the ``2n + k`` coefficient columns (k res logits; default
    n^2, Sinkhorn's). Built once per (n, device, k), so the hot path makes no host-to-device copy; gathered with
    ``index_select``, whose backward sums alpha's gradient in the same order as the former ``repeat_interleave``
    (bit-identical curves)."""
    return torch.tensor([0] * n + [1] * n + [2] * (n * n if k is None else k), device=device)


def default_map(n: int, iters: int, eps: float, variant: str) -> HResMap:
    """The map ``variant`` stands for: Sinkhorn with the paper's exp start, or V4's softmax start read transposed."""
    v4 = variant == "deepseek-v4"
    return SinkhornMap(n, iters=iters, eps=eps, start=sinkhorn_start(variant), transpose=v4)


def mhc_coefficients(
    x: torch.Tensor,
    phi: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    *,
    iters: int = 20,
    eps: float = 1e-6,
    variant: str = "paper",
    dynamic: bool = True,
    h_res: HResMap | None = None,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients (spec Eq. 7-9, fused form Eq. 10-19).

    x ``[..., n, C]``; phi ``[n*C, 2n + k]`` (columns pre | post | res); bias ``[2n + k]``; alpha ``[3]`` (pre,
    post, res). ``h_res``: the map from the k res logits to H_res (:mod:`torch_mhc.nn.maps`); None: Sinkhorn
    (k = n^2, res row-major) with ``iters`` and ``eps`` as ``variant`` says. Returns fp32 ``(H_pre, H_post, H_res)``.

    ``variant="deepseek-v4"``: ``H_pre = sigmoid(.) + eps``; its default map reads the res block as V4's ``comb``
    logits, so ``H_res = comb^T`` with V4's softmax-start Sinkhorn.

    ``batch_invariant``: the fused kernels reduce in an order that does not depend on the token count, so a
    token's coefficients (and its gradient of x) are the same bits alone or in any batch (the reference path
    is left to torch's matmul: see tests/test_batch_invariant.py for what it gives on CPU).
    """
    n = x.shape[-2]
    h_res = default_map(n, iters, eps, variant) if h_res is None else h_res
    if dynamic:
        check_channels(x)
    if dynamic and ops.should_fuse(x, width=phi.shape[-1]):
        with no_autocast(x):
            return fused().fused_mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=eps, variant=variant,
                                                  h_res=h_res, batch_invariant=batch_invariant)
    with no_autocast(x):
        if dynamic:
            h = mhc_logits(x, phi, bias, alpha, eps)[0]
        else:
            h = bias.to(compute_dtype(x.dtype)).expand(*x.shape[:-2], bias.shape[-1])
        check_finite(h, "the mHC coefficients (check the streams and parameters)")
        return mhc_gates(h, n, eps, variant, h_res)


def mhc_logits(x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, eps: float):
    """The dynamic coefficient logits: x ``[..., n, C]`` -> (h ``[..., 2n + k]``, raw = x phi ``[..., 2n + k]``,
    inv_rms ``[..., 1]``) in the compute dtype, ``h = raw * inv_rms * alpha + bias`` (alpha per column group)."""
    n, cdt = x.shape[-2], compute_dtype(x.dtype)
    xf = x.flatten(-2).to(cdt)
    inv_rms = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    k = phi.shape[-1] - 2 * n
    scale = alpha.to(cdt).index_select(0, alpha_columns(n, alpha.device, None if k == n * n else k))
    raw = xf @ phi.to(cdt)
    return raw * inv_rms * scale + bias.to(cdt), raw, inv_rms


def mhc_gates(h: torch.Tensor, n: int, eps: float, variant: str, h_res) -> tuple:
    """Logits h ``[..., 2n + k]`` -> (H_pre ``[..., n]``, H_post ``[..., n]``, ``h_res`` of the k res logits):
    sigmoid (V4: + eps), 2 sigmoid, the map."""
    h_pre = torch.sigmoid(h[..., :n])
    h_post = 2.0 * torch.sigmoid(h[..., n : 2 * n])
    if variant == "deepseek-v4":  # V4: eps on H_pre
        h_pre = h_pre + eps
    return h_pre, h_post, h_res(h[..., 2 * n :])


def mhc_sublayer_pre(
    x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, *, iters: int = 20,
    eps: float = 1e-6, variant: str = "paper", read_ahead=None, h_res: HResMap | None = None,
    batch_invariant: bool = False,
):
    """The read half of a dynamic mHC sublayer: x ``[..., n, C]`` -> (sublayer input ``[..., C]``,
    fp32 (H_pre, H_post, H_res), link). ``link`` is None on the reference path; with the kernels it ties this
    read to :func:`stream_post` (pass it as ``link=``) so that the sublayer's three gradient terms of x are
    summed in one buffer instead of by autograd (see :mod:`torch_mhc.ops.sublayer`). ``read_ahead``: what the
    fused post that wrote x computed of this sublayer's GEMM (:func:`stream_post`), or None. ``h_res``: as in
    :func:`mhc_coefficients`, as is ``batch_invariant``."""
    h_res = default_map(x.shape[-2], iters, eps, variant) if h_res is None else h_res
    check_channels(x)
    if ops.should_fuse(x, width=phi.shape[-1]):
        with no_autocast(x):
            return fused().fused_sublayer_pre(x, phi, bias, alpha, iters=iters, eps=eps, variant=variant,
                                              read_ahead=read_ahead, h_res=h_res, batch_invariant=batch_invariant)
    coeffs = mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=eps, variant=variant, h_res=h_res,
                              batch_invariant=batch_invariant)
    return stream_pre(x, coeffs[0]), coeffs, None


def hc_coefficients(
    x: torch.Tensor,
    static_pre: torch.Tensor,
    static_post: torch.Tensor,
    static_res: torch.Tensor,
    w_pre: torch.Tensor | None,
    w_post: torch.Tensor | None,
    w_res: torch.Tensor | None,
    scale: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hyper-Connections (Zhu et al.) coefficients, unconstrained.

    Per-stream RMS norm ``xn [..., n, C]``; with ``w_* = None`` the static HC. HC's own matrices
    are ``A_m = static_pre + s0 tanh(xn w_pre)``, ``B = static_post + s1 tanh(xn w_post)`` and
    ``A_r = static_res + s2 tanh(xn w_res)`` (row i from stream i); ``H_res = A_r^T``.
    w_pre, w_post ``[C]``; w_res ``[C, n]``; scale ``[3]``.
    """
    lead, cdt = x.shape[:-2], compute_dtype(x.dtype)
    with no_autocast(x):
        h_pre = static_pre.to(cdt).expand(*lead, -1)
        h_post = static_post.to(cdt).expand(*lead, -1)
        a_res = static_res.to(cdt).expand(*lead, -1, -1)
        if w_pre is not None:
            xf = x.to(cdt)
            xn = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
            s = scale.to(cdt)
            h_pre = h_pre + s[0] * torch.tanh(xn @ w_pre.to(cdt))
            h_post = h_post + s[1] * torch.tanh(xn @ w_post.to(cdt))
            a_res = a_res + s[2] * torch.tanh(xn @ w_res.to(cdt))
        check_finite(h_pre, "the HC coefficients (check the streams and parameters)")
    return h_pre, h_post, a_res.transpose(-1, -2)


def stream_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Sublayer input ``sum_i H_pre[i] x_i``: x ``[..., n, C]``, h_pre ``[..., n]`` -> ``[..., C]`` in x's dtype."""
    if ops.should_fuse(x):
        return fused().fused_stream_pre(x, h_pre)
    return stream_pre_reference(x, h_pre)


def stream_pre_reference(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """:func:`stream_pre` in PyTorch (fp32 arithmetic, fp64 for fp64 streams)."""
    cdt = compute_dtype(x.dtype)
    with no_autocast(x):  # elementwise + sum: a batched matmul of [1, n] x [n, C] per token is slow on CPUs
        return (h_pre.to(cdt).unsqueeze(-1) * x.to(cdt)).sum(dim=-2).to(x.dtype)


def stream_post(
    x: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, f_out: torch.Tensor, link=None, read_ahead=None,
    chain_backward: bool = False, batch_invariant: bool = False,
):
    """New state ``H_res x + H_post^T F``: x ``[..., n, C]``, h_post ``[..., n]``, h_res ``[..., n, n]``,
    f_out ``[..., C]`` -> ``[..., n, C]`` in x's dtype (accumulated in fp32). ``link``: from
    :func:`mhc_sublayer_pre` on the same x (x's gradient then goes back through it). ``read_ahead`` =
    (phi, eps) of the next mHC sublayer, with a ``link``: returns (new state, its read-ahead for that sublayer's
    :func:`mhc_sublayer_pre`), the next GEMM computed in the same pass; without a link, (new state, None).
    ``chain_backward`` (with a read-ahead): that read's backward leaves the state's gradient terms to this post's
    backward (see :func:`torch_mhc.nn.chained_backward`). ``batch_invariant``: the read-ahead's GEMM tiles do not
    depend on the token count (as in :func:`mhc_coefficients`)."""
    if link is not None:
        with no_autocast(x):
            return ops.fused_sublayer_post(link, h_post, h_res, f_out, read_ahead=read_ahead,
                                           chain_backward=chain_backward, batch_invariant=batch_invariant)
    if read_ahead is not None:
        return stream_post(x, h_post, h_res, f_out), None
    if ops.should_fuse(x):
        return fused().fused_stream_post(x, h_post, h_res, f_out)
    return stream_post_reference(x, h_post, h_res, f_out)


def stream_post_reference(x: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, f_out: torch.Tensor):
    """:func:`stream_post` in PyTorch (no link or read-ahead): ``[..., n, C]`` in x's dtype."""
    cdt = compute_dtype(x.dtype)
    with no_autocast(x):
        xc, h_res = x.to(cdt), h_res.to(cdt)
        out = h_post.to(cdt).unsqueeze(-1) * f_out.to(cdt).unsqueeze(-2)
        for j in range(x.shape[-2]):  # sum over input streams j of H_res[:, j] x_j (n <= 8 elementwise ops)
            out = out + h_res[..., :, j, None] * xc[..., None, j, :]
    return out.to(x.dtype)
