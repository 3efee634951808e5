"""The fused mHC ops as ``torch.library`` custom ops (namespace ``torch_mhc``), for ``torch.compile``.

Eager code runs the autograd Functions of :mod:`torch_mhc.ops.coefficients`, ``streams`` and ``sublayer``; under
``torch.compile`` :mod:`torch_mhc.nn.functional` calls these ops instead (functions of the same names and
arguments as the :mod:`torch_mhc.ops` entry points, below), which dynamo records as single nodes (fake
implementations give the shapes) instead of tracing into Python objects and kernel launches:

- ``torch_mhc::mhc_coefficients(x [T, n, C], phi [n*C, M], bias [M], alpha [3], eps, variant, sinkhorn_iters,
  softmax_start, transpose, batch_invariant) -> (H_pre [T, n], H_post [T, n], res, raw [T, M], inv_rms [T])``:
  res is H_res ``[T, n, n]`` (Sinkhorn on chip, ``sinkhorn_iters`` >= 1) or, with ``sinkhorn_iters = 0``, the
  ``k = M - 2n`` res logits ``[T, k]`` of a map that runs outside the op in PyTorch (every other map: a user's own,
  and the identity and mixture maps the eager kernels compute on chip, whose specs the op does not take yet);
  raw = x phi and inv_rms are kept for the backward (no gradient);
- ``torch_mhc::stream_pre(x [T, n, C], h_pre [T, n]) -> y [T, C]``;
- ``torch_mhc::stream_post(x [T, n, C], h_post [T, n], h_res [T, n, n], f [T, C]) -> [T, n, C]``;

each with its backward as a custom op too (``..._backward``), tied by ``register_autograd``. Coefficients come
in the compute dtype (fp32; fp64 for fp64 streams). One implementation per op serves every device: the Triton
kernels where :func:`torch_mhc.ops.kernels_run` says so (CUDA under ``auto``, any device under ``triton``: the
interpreter on CPU), else the PyTorch reference: :mod:`torch_mhc.nn.functional`'s math forward, its derivative
written out backward (Sinkhorn's from :func:`torch_mhc.nn.sinkhorn.sinkhorn_backward`). The sublayer pair's link,
hand-off and read-ahead are not carried: under compile a sublayer is these three ops (see docs/design.md, "Custom
ops"). The ops live in ``nn`` (not ``ops``) because their reference implementation is nn's math and the kernels'
floor imports nothing above it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from torch_mhc import ops
from torch_mhc.nn.sinkhorn import sinkhorn_backward, sinkhorn_reference
from torch_mhc.numerics import VARIANTS, compute_dtype


def _check(variant: str, sinkhorn_iters: int) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"torch_mhc::mhc_coefficients: variant must be one of {VARIANTS}, got {variant!r}")
    if sinkhorn_iters < 0:
        raise ValueError(f"torch_mhc::mhc_coefficients: sinkhorn_iters must be >= 0 (0: res logits out), "
                         f"got {sinkhorn_iters}")


def _epilogue(n: int, k: int, variant: str, sinkhorn_iters: int, softmax_start: bool, transpose: bool):
    """The kernels' :class:`~torch_mhc.ops.coefficients.Epilogue` for the op's arguments."""
    from torch_mhc.ops.coefficients import make_epilogue

    spec = ("sinkhorn", sinkhorn_iters, softmax_start, transpose) if sinkhorn_iters else ("logits", k)
    return make_epilogue(n, spec, variant == "deepseek-v4")


def _res_map(n: int, eps: float, sinkhorn_iters: int, softmax_start: bool, transpose: bool):
    """res logits ``[T, k]`` -> what the op returns as res: Sinkhorn's H_res ``[T, n, n]`` or the logits
    themselves (``sinkhorn_iters = 0``); with its backward ``(logits, grad) -> dlogits``."""
    start = "softmax" if softmax_start else "exp"

    def orient(t):  # [T, n*n] <-> the [T, n, n] Sinkhorn sees (transpose: V4's comb)
        t = t.unflatten(-1, (n, n))
        return t.transpose(-1, -2) if transpose else t

    def forward(logits):
        return sinkhorn_reference(orient(logits), sinkhorn_iters, eps, start) if sinkhorn_iters else logits

    def backward(logits, grad):
        if not sinkhorn_iters:
            return grad
        d = sinkhorn_backward(orient(logits), grad, sinkhorn_iters, eps, start)
        return (d.transpose(-1, -2) if transpose else d).flatten(-2)

    return forward, backward


def _reference_coefficients(x, phi, bias, alpha, eps: float, variant: str, sinkhorn_iters: int,
                            softmax_start: bool, transpose: bool) -> tuple:
    """The op's forward in PyTorch (:func:`torch_mhc.nn.functional.mhc_logits`, ``mhc_gates``): (H_pre, H_post,
    res, raw, inv_rms), contiguous."""
    from torch_mhc.nn import functional as Fm  # imports this module: at call time

    n = x.shape[-2]
    res_map, _ = _res_map(n, eps, sinkhorn_iters, softmax_start, transpose)
    with torch.autocast(device_type=x.device.type, enabled=False):
        h, raw, inv = Fm.mhc_logits(x, phi, bias, alpha, eps)
        pre, post, res = Fm.mhc_gates(h, n, eps, variant, res_map)
    return pre.contiguous(), post.contiguous(), res.contiguous(), raw.contiguous(), inv.squeeze(-1).contiguous()


def _reference_coefficients_backward(x, phi, bias, alpha, dpre, dpost, dres, eps: float, sinkhorn_iters: int,
                                     softmax_start: bool, transpose: bool) -> tuple:
    """The op's backward in PyTorch, from the recomputed logits h = raw * inv_rms * alpha + bias: the gates'
    derivatives, Sinkhorn's (:func:`~torch_mhc.nn.sinkhorn.sinkhorn_backward`), then the chain rule through
    alpha, bias, raw = x phi and inv_rms. -> (dx, dphi, dbias, dalpha) in the inputs' dtypes. (Autograd is off
    inside an op's implementation, and ``torch.func.vjp`` fails under dispatch modes such as opcheck's.)"""
    from torch_mhc.nn import functional as Fm

    T, n, C = x.shape
    cdt = compute_dtype(x.dtype)
    _, res_backward = _res_map(n, eps, sinkhorn_iters, softmax_start, transpose)
    with torch.autocast(device_type=x.device.type, enabled=False):
        h, raw, inv = Fm.mhc_logits(x, phi, bias, alpha, eps)
        s_pre, s_post = torch.sigmoid(h[:, :n]), torch.sigmoid(h[:, n : 2 * n])
        dh = torch.cat([dpre.to(cdt) * s_pre * (1 - s_pre), 2.0 * dpost.to(cdt) * s_post * (1 - s_post),
                        res_backward(h[:, 2 * n :], dres.to(cdt)).reshape(T, -1)], dim=-1)
        columns = Fm.alpha_columns(n, alpha.device, h.shape[-1] - 2 * n)
        scale = alpha.to(cdt).index_select(0, columns)
        draw = dh * inv * scale
        dalpha = torch.zeros(3, dtype=cdt, device=alpha.device).index_add_(0, columns, (dh * raw * inv).sum(0))
        xf = x.reshape(T, n * C).to(cdt)
        coef = -(dh * raw * scale).sum(-1, keepdim=True) * inv ** 3 / (n * C)  # through inv_rms
        dx = draw @ phi.to(cdt).t() + coef * xf
        return (dx.view(T, n, C).to(x.dtype), (xf.t() @ draw).to(phi.dtype), dh.sum(0).to(bias.dtype),
                dalpha.to(alpha.dtype))


@custom_op("torch_mhc::mhc_coefficients", mutates_args=())
def _coefficients_op(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, eps: float, variant: str,
                     sinkhorn_iters: int, softmax_start: bool, transpose: bool,
                     batch_invariant: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(variant, sinkhorn_iters)
    T, n, C = x.shape
    if ops.kernels_run(x, phi.shape[1]):
        from torch_mhc.ops.coefficients import coefficients_forward

        epi = _epilogue(n, phi.shape[1] - 2 * n, variant, sinkhorn_iters, softmax_start, transpose)
        pre, post, res, (_, _, raw, inv) = coefficients_forward(
            x.reshape(T, n * C).contiguous(), phi, bias, alpha, epi, eps, batch_invariant=batch_invariant)
        return pre, post, res, raw, inv
    return _reference_coefficients(x, phi, bias, alpha, eps, variant, sinkhorn_iters, softmax_start, transpose)


@_coefficients_op.register_fake
def _(x, phi, bias, alpha, eps, variant, sinkhorn_iters, softmax_start, transpose, batch_invariant):
    _check(variant, sinkhorn_iters)
    T, n, _ = x.shape
    M, cdt = phi.shape[1], compute_dtype(x.dtype)
    res_shape = (n, n) if sinkhorn_iters else (M - 2 * n,)
    return (x.new_empty(T, n, dtype=cdt), x.new_empty(T, n, dtype=cdt), x.new_empty(T, *res_shape, dtype=cdt),
            x.new_empty(T, M, dtype=cdt), x.new_empty(T, dtype=cdt))


@custom_op("torch_mhc::mhc_coefficients_backward", mutates_args=())
def _coefficients_backward_op(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, raw: Tensor, inv: Tensor,
                              dpre: Tensor, dpost: Tensor, dres: Tensor, eps: float, variant: str,
                              sinkhorn_iters: int, softmax_start: bool,
                              transpose: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx [T, n, C], dphi, dbias, dalpha) in the inputs' dtypes."""
    T, n, C = x.shape
    if ops.kernels_run(x, phi.shape[1]):
        from torch_mhc.ops.coefficients import coefficients_backward

        epi = _epilogue(n, phi.shape[1] - 2 * n, variant, sinkhorn_iters, softmax_start, transpose)
        saved = (bias.float().contiguous(), alpha.float().contiguous(), raw, inv)
        dx, dphi, dbias, dalpha = coefficients_backward(x.reshape(T, n * C).contiguous(), phi, saved, epi, eps,
                                                        dpre, dpost, dres)
        return dx.view(T, n, C), dphi.to(phi.dtype), dbias.to(bias.dtype), dalpha.to(alpha.dtype)

    return _reference_coefficients_backward(x, phi, bias, alpha, dpre, dpost, dres, eps, sinkhorn_iters,
                                            softmax_start, transpose)


@_coefficients_backward_op.register_fake
def _(x, phi, bias, alpha, raw, inv, dpre, dpost, dres, eps, variant, sinkhorn_iters, softmax_start, transpose):
    return x.new_empty(x.shape), phi.new_empty(phi.shape), bias.new_empty(bias.shape), alpha.new_empty(alpha.shape)


def _setup_coefficients(ctx, inputs, output):
    x, phi, bias, alpha, eps, variant, sinkhorn_iters, softmax_start, transpose, _ = inputs
    ctx.save_for_backward(x, phi, bias, alpha, output[3], output[4])
    ctx.config = (eps, variant, sinkhorn_iters, softmax_start, transpose)
    ctx.mark_non_differentiable(output[3], output[4])


def _coefficients_grad(ctx, dpre, dpost, dres, _draw, _dinv):
    x, phi, bias, alpha, raw, inv = ctx.saved_tensors
    T, n, _ = x.shape
    res_shape = (n, n) if ctx.config[2] else (phi.shape[1] - 2 * n,)
    dpre, dpost, dres = (torch.zeros(T, *s, device=x.device, dtype=raw.dtype) if g is None else g
                         for g, s in ((dpre, (n,)), (dpost, (n,)), (dres, res_shape)))
    grads = _coefficients_backward_op(x, phi, bias, alpha, raw, inv, dpre, dpost, dres, *ctx.config)
    return (*grads, None, None, None, None, None, None)


_coefficients_op.register_autograd(_coefficients_grad, setup_context=_setup_coefficients)


@custom_op("torch_mhc::stream_pre", mutates_args=())
def _stream_pre_op(x: Tensor, h_pre: Tensor) -> Tensor:
    if ops.kernels_run(x):
        from torch_mhc.ops.streams import pre_forward

        return pre_forward(x.contiguous(), h_pre.contiguous())
    from torch_mhc.nn import functional as Fm

    return Fm.stream_pre_reference(x, h_pre).contiguous()


@_stream_pre_op.register_fake
def _(x, h_pre):
    return x.new_empty(x.shape[0], x.shape[2])


@custom_op("torch_mhc::stream_pre_backward", mutates_args=())
def _stream_pre_backward_op(x: Tensor, h_pre: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """-> (dx [T, n, C], dH_pre [T, n])."""
    if ops.kernels_run(x):
        from torch_mhc.ops.streams import pre_backward

        dx, dh = pre_backward(x.contiguous(), h_pre.contiguous(), dy.contiguous())
        return dx, dh.to(h_pre.dtype)
    cdt = compute_dtype(x.dtype)  # y = sum_i H_pre[i] x_i
    dyc = dy.to(cdt).unsqueeze(-2)
    return (h_pre.to(cdt).unsqueeze(-1) * dyc).to(x.dtype), (x.to(cdt) * dyc).sum(-1).to(h_pre.dtype)


@_stream_pre_backward_op.register_fake
def _(x, h_pre, dy):
    return x.new_empty(x.shape), h_pre.new_empty(h_pre.shape)


def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _stream_pre_grad(ctx, dy):
    return _stream_pre_backward_op(*ctx.saved_tensors, dy)


_stream_pre_op.register_autograd(_stream_pre_grad, setup_context=_setup_saving_inputs)


@custom_op("torch_mhc::stream_post", mutates_args=())
def _stream_post_op(x: Tensor, h_post: Tensor, h_res: Tensor, f: Tensor) -> Tensor:
    if ops.kernels_run(x):
        from torch_mhc.ops.streams import post_forward

        return post_forward(x.contiguous(), h_post.contiguous(), h_res.contiguous(), f.contiguous())
    from torch_mhc.nn import functional as Fm

    return Fm.stream_post_reference(x, h_post, h_res, f).contiguous()


@_stream_post_op.register_fake
def _(x, h_post, h_res, f):
    return x.new_empty(x.shape)


@custom_op("torch_mhc::stream_post_backward", mutates_args=())
def _stream_post_backward_op(x: Tensor, h_post: Tensor, h_res: Tensor, f: Tensor,
                             dout: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx [T, n, C], dH_post [T, n], dH_res [T, n, n], df [T, C])."""
    if ops.kernels_run(x):
        from torch_mhc.ops.streams import post_backward

        dx, dhp, dhr, df = post_backward(x.contiguous(), h_post.contiguous(), h_res.contiguous(), f.contiguous(),
                                         dout.contiguous())
        return dx, dhp.to(h_post.dtype), dhr.to(h_res.dtype), df
    cdt = compute_dtype(x.dtype)  # out_i = H_post[i] f + sum_j H_res[i, j] x_j
    g, hp, hr = dout.to(cdt), h_post.to(cdt), h_res.to(cdt)
    return ((hr.transpose(-1, -2) @ g).to(x.dtype), (g * f.to(cdt).unsqueeze(-2)).sum(-1).to(h_post.dtype),
            (g @ x.to(cdt).transpose(-1, -2)).to(h_res.dtype), (hp.unsqueeze(-1) * g).sum(-2).to(f.dtype))


@_stream_post_backward_op.register_fake
def _(x, h_post, h_res, f, dout):
    return x.new_empty(x.shape), h_post.new_empty(h_post.shape), h_res.new_empty(h_res.shape), f.new_empty(f.shape)


def _stream_post_grad(ctx, dout):
    return _stream_post_backward_op(*ctx.saved_tensors, dout)


_stream_post_op.register_autograd(_stream_post_grad, setup_context=_setup_saving_inputs)


def fused_mhc_coefficients(x, phi, bias, alpha, *, iters: int, eps: float, variant: str, h_res=None,
                           batch_invariant: bool = False):
    """x ``[..., n, C]`` -> (H_pre ``[..., n]``, H_post ``[..., n]``, H_res ``[..., n, n]``) through
    ``torch_mhc::mhc_coefficients``; as :func:`torch_mhc.ops.fused_mhc_coefficients`, except that every map but
    Sinkhorn (``kernel_spec`` other than ("sinkhorn", ...)) runs on the op's res logits, outside the op."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    spec = ops.kernel_spec(h_res, iters, variant)
    iters, softmax, transpose = spec[1:] if spec[0] == "sinkhorn" else (0, False, False)
    pre, post, res, _, _ = _coefficients_op(x.reshape(-1, n, C).contiguous(), phi, bias, alpha, float(eps), variant,
                                            int(iters), bool(softmax), bool(transpose), bool(batch_invariant))
    res = res.view(*lead, n, n) if iters else h_res(res.view(*lead, res.shape[-1]))
    return pre.view(*lead, n), post.view(*lead, n), res


def fused_stream_pre(x: Tensor, h_pre: Tensor) -> Tensor:
    """x ``[..., n, C]``, h_pre ``[..., n]`` -> ``[..., C]`` in x's dtype, through ``torch_mhc::stream_pre``."""
    n, C = x.shape[-2:]
    y = _stream_pre_op(x.reshape(-1, n, C).contiguous(), h_pre.float().reshape(-1, n).contiguous())
    return y.view(*x.shape[:-2], C)


def fused_stream_post(x: Tensor, h_post: Tensor, h_res: Tensor, f_out: Tensor) -> Tensor:
    """x ``[..., n, C]``, h_post ``[..., n]``, h_res ``[..., n, n]``, f ``[..., C]`` -> ``[..., n, C]`` in x's
    dtype, through ``torch_mhc::stream_post``."""
    n, C = x.shape[-2:]
    out = _stream_post_op(x.reshape(-1, n, C).contiguous(), h_post.float().reshape(-1, n).contiguous(),
                          h_res.float().reshape(-1, n, n).contiguous(), f_out.reshape(-1, C).contiguous())
    return out.view(*x.shape[:-2], n, C)


def fused_sublayer_pre(x, phi, bias, alpha, *, iters: int, eps: float, variant: str, read_ahead=None, h_res=None,
                       batch_invariant: bool = False):
    """x ``[..., n, C]`` -> (y ``[..., C]``, (H_pre, H_post, H_res), None): the coefficient and pre ops. No link
    (post is then ``torch_mhc::stream_post`` and autograd sums x's gradient terms); ``read_ahead`` is ignored
    (under compile no post computes one)."""
    coeffs = fused_mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=eps, variant=variant, h_res=h_res,
                                    batch_invariant=batch_invariant)
    return fused_stream_pre(x, coeffs[0]), coeffs, None
