"""One mHC sublayer as two autograd Functions around F, with ONE buffer for the state's gradient.

With separate ops (coefficients, pre, post) the state x ``[T, n, C]`` feeds three Functions and autograd sums
their three dx with two full ``[T, n, C]`` adds. Here:

- :class:`FusedSublayerPre` (coefficients + pre): x -> (y, H_pre, H_post, H_res, ``link``). ``link`` is a
  ``[T, n, C]`` stride-0 tensor with no data: the channel through which post's dx reaches this Function.
- :class:`FusedSublayerPost`: (x, link, H_post, H_res, f) -> new state. Its backward returns post's
  ``dx = H_res^T dout`` as the gradient of ``link`` and none for x.
- Pre-half backward: ``_pre_bwd`` only reduces dH_pre (reads x and dy, writes no dx); then the coefficient
  GEMM backward reads post's dx from the link gradient, adds the GEMM term, the RMS term and pre's
  ``H_pre[i] dy``, all in fp32, and writes the sum back in place: one rounding, each element read and
  written once by one program (no atomics, deterministic), one pass over x for pre and GEMM.

Autograd stays exact: x's gradient from this sublayer is ``post + pre + GEMM`` whatever else uses x (other
consumers' gradients are added by autograd as usual). If post never ran backward (post not called, called
under no_grad, or backward not reaching it) the link gradient is None and the GEMM writes a fresh dx;
if post ran twice on the same state autograd sums the two link gradients into a fresh buffer first.
"""

from __future__ import annotations

import torch

from torch_mhc.ops.coefficients import _sinkhorn_pairs, coefficients_backward, coefficients_forward
from torch_mhc.ops.streams import FusedStreamPost, pre_backward, pre_forward


def _owned_buffer(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The link gradient as a buffer the GEMM backward may overwrite: the tensor post's backward (or
    autograd's sum of several) returned; a copy when it is not a plain contiguous buffer of x's layout."""
    if g is None:
        return None
    if g.dtype != like.dtype or g.shape != like.shape or not g.is_contiguous() or g.requires_grad:
        return g.to(like.dtype).contiguous().clone()
    return g


class FusedSublayerPre(torch.autograd.Function):
    """x [T, n, C], phi, bias, alpha -> (y [T, C], H_pre [T, n], H_post [T, n], H_res [T, n, n], link [T, n, C])."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, iters: int, eps: float, v4: bool):
        T, n, C = x.shape
        pairs = _sinkhorn_pairs(iters, v4)
        x2d = x.view(T, n * C)
        pre, post, res, saved = coefficients_forward(x2d, phi, bias, alpha, n, pairs, eps, v4)
        y = pre_forward(x, pre)
        link = x.new_empty(1).expand(T, n, C)
        ctx.save_for_backward(x, phi, pre, *saved)
        ctx.config = (n, pairs, eps, v4, alpha.dtype, bias.dtype)
        ctx.set_materialize_grads(False)
        return y, pre, post, res, link

    @staticmethod
    def backward(ctx, dy, dpre_out, dpost, dres, dlink):
        x, phi, pre, *saved = ctx.saved_tensors
        n, pairs, eps, v4, alpha_dtype, bias_dtype = ctx.config
        T, _, C = x.shape
        dpre, pre_term = dpre_out, None
        if dy is not None:
            dy = dy.contiguous()
            _, dpre = pre_backward(x, pre, dy, write_dx=False)
            dpre = dpre if dpre_out is None else dpre + dpre_out
            pre_term = (pre, dy)
        dx = _owned_buffer(dlink, x)
        dx, dphi, dbias, dalpha = coefficients_backward(
            x.view(T, n * C), phi, saved, n, pairs, eps, v4, dpre, dpost, dres,
            dx=None if dx is None else dx.view(T, n * C), pre_term=pre_term)
        return (dx.view(T, n, C), dphi.to(phi.dtype), dbias.to(bias_dtype), dalpha.to(alpha_dtype),
                None, None, None)


class FusedSublayerPost(torch.autograd.Function):
    """(x [T, n, C], link [T, n, C], H_post [T, n], H_res [T, n, n], f [T, C]) -> H_res x + H_post^T f [T, n, C].
    x's gradient leaves through ``link`` (to :class:`FusedSublayerPre`), none through ``x``."""

    @staticmethod
    def forward(ctx, x, link, h_post, h_res, f):
        return FusedStreamPost.forward(ctx, x, h_post, h_res, f)  # the plain post; only the gradient's route differs

    @staticmethod
    def backward(ctx, dout):
        dx, dhp, dhr, df = FusedStreamPost.backward(ctx, dout)
        return None, dx, dhp, dhr, df


def _flat(t: torch.Tensor, *shape) -> torch.Tensor:
    t = t.reshape(*shape)
    return t if t.is_contiguous() else t.contiguous()


def fused_sublayer_pre(x, phi, bias, alpha, *, iters: int, eps: float, variant: str):
    """x ``[..., n, C]`` -> (y ``[..., C]``, (H_pre, H_post, H_res) fp32 ``[..., n]``/``[..., n, n]``, link).

    ``link`` = (x as ``[T, n, C]`` contiguous, the link tensor): pass it to :func:`fused_sublayer_post`."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = _flat(x, -1, n, C)
    y, pre, post, res, link = FusedSublayerPre.apply(x3, phi, bias, alpha, iters, eps, variant == "deepseek-v4")
    return y.view(*lead, C), (pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)), (x3, link)


def fused_sublayer_post(link, h_post, h_res, f_out):
    """(link from :func:`fused_sublayer_pre`, H_post ``[..., n]``, H_res ``[..., n, n]``, f ``[..., C]``) ->
    new state ``[..., n, C]``."""
    x3, link_t = link
    _, n, C = x3.shape
    lead = f_out.shape[:-1]
    out = FusedSublayerPost.apply(x3, link_t, _flat(h_post.float(), -1, n), _flat(h_res.float(), -1, n, n),
                                  _flat(f_out, -1, C))
    return out.view(*lead, n, C)
