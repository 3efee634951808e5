"""Emulate the input precision of the kernels' ``tl.dot`` on a float64 reference, to derive the CUDA-path tolerances
of tests/test_ops.py from the tests' own inputs (Triton's interpreter ignores ``input_precision``: on the CPU every
dot is exact fp32, so the interpreter cannot show what tensor cores round away).

Inside ``with EmulateDots(prec):`` every ``a @ b`` / ``torch.matmul(a, b)`` rounds its operands as the kernels'
dots would and multiplies the rounded values in float64; its backward rounds the gradient rows and the operands
the same way (``dx = draw @ phi^T``, ``dphi = x^T draw``: the coefficient GEMM backward's dots). The reference's
only matmul on the fused path is the coefficient GEMM ``x @ phi`` (Sinkhorn, pre and post are elementwise), so
a reference run inside the context is what the kernels compute with that precision, up to summation order.
Precisions (``torch_mhc.ops.coefficients.dot_precision``):

- ``"ieee"``: operands rounded to fp32 (the kernels' operands are fp32 values; gradient rows are fp32 there),
  products and sums exact (float64 here, fp32 FMA there);
- ``"tf32"``: operands rounded to fp32, then truncated to tf32's 10 mantissa bits (tensor cores take the top 19
  bits of an fp32 register; truncation, the worse of the two roundings, bounds round-to-nearest too);
- ``"tf32x3"``: each operand split into a tf32 high part and a tf32 low part (the residual), the product
  ``hi_a hi_b + hi_a lo_b + lo_a hi_b`` (Triton's 3xTF32).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

PRECISIONS = ("ieee", "tf32", "tf32x3")


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``t`` with the 13 low mantissa bits cleared (tf32: 10 mantissa bits), in ``t``'s dtype."""
    bits = t.float().contiguous().view(torch.int32) & ~0x1FFF
    return bits.view(torch.float32).to(t.dtype)


def _split(t: torch.Tensor, prec: str) -> list[torch.Tensor]:
    """The float64 parts a dot multiplies for an operand ``t``: one part, or (high, low) for tf32x3."""
    t32 = t.float()
    if prec == "ieee":
        return [t32.double()]
    hi = round_tf32(t32)
    if prec == "tf32":
        return [hi.double()]
    return [hi.double(), round_tf32(t32 - hi).double()]


def emulated_mm(a: torch.Tensor, b: torch.Tensor, prec: str) -> torch.Tensor:
    """``a @ b`` (float64) with both operands rounded as a ``tl.dot(..., input_precision=prec)`` rounds them."""
    if prec not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {prec!r}")
    pa, pb = _split(a, prec), _split(b, prec)
    out = _mm(pa[0], pb[0])
    if prec == "tf32x3":
        out = out + _mm(pa[0], pb[1]) + _mm(pa[1], pb[0])
    return out


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., K] x [K, M] by torch.mm (which :class:`EmulateDots` does not intercept)."""
    return torch.mm(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])


class _EmulatedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, prec):
        ctx.save_for_backward(a, b)
        ctx.prec = prec
        return emulated_mm(a, b, prec).to(torch.promote_types(a.dtype, b.dtype))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = emulated_mm(g, b.mT, ctx.prec).to(a.dtype)  # [..., M] x [M, K]: dx = draw @ phi^T
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        gb = emulated_mm(a2.mT, g2, ctx.prec).to(b.dtype)  # dphi = x^T draw over all tokens
        return ga, gb, None


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch._C.TensorBase.matmul)


class EmulateDots(TorchFunctionMode):
    """Context: ``@`` and ``torch.matmul`` of a ``[..., K]`` by a 2-D ``[K, M]`` run as the kernels' dots would
    with input precision ``prec`` (forward and backward). Other functions run unchanged."""

    def __init__(self, prec: str):
        super().__init__()
        if prec not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {prec!r}")
        self.prec = prec
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _MATMULS and not kwargs and len(args) == 2 and isinstance(args[1], torch.Tensor)
                and args[1].dim() == 2):
            self.calls += 1
            return _EmulatedMatmul.apply(args[0], args[1], self.prec)
        return func(*args, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b`` (the tests' error measure)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def emulated_errors(reference, prec: str) -> list[float]:
    """``reference()`` -> a list of tensors (outputs and gradients, computed inside the call). Runs it exactly and
    with the dots emulated at ``prec``; -> the relative error (:func:`rel_err`) of each emulated tensor: what the
    precision alone costs on these inputs."""
    exact = reference()
    with EmulateDots(prec) as mode:
        emulated = reference()
    if mode.calls == 0:
        raise AssertionError("the reference made no matmul: nothing was emulated")
    return [rel_err(e, x) for e, x in zip(emulated, exact)]
