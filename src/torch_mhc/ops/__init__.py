"""Fused Triton kernels for the mHC hot path, and the switch that picks them.

Backends: ``"auto"`` (default: Triton kernels for CUDA tensors when Triton is installed, the
PyTorch reference otherwise), ``"reference"`` (always PyTorch) and ``"triton"`` (always the
kernels, also for CPU tensors, which needs ``TRITON_INTERPRET=1``: that is how CI tests them).
Model code calls :mod:`torch_mhc.nn.functional` and never knows which one runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Stream counts n the stream kernels (pre and post, forward and backward) are built for: 1 to 16. Their aranges over
# the streams take the next power of two (ops.blocks.padded: 3 -> 4, 5..7 -> 8, 9..15 -> 16) with the padded streams
# masked on every load and store; block tables (ops/coefficients.py, ops/streams.py) and register budgets
# (ops/aot.py) are those of the padded count. The compile gate traces every n up to 8, and 9, 12 and 16 of 9..16 (each
# of those costs about 80 configurations of several CPU-seconds: the loops over the streams unroll); all of 1..16
# passed it at once when 9..16 were added (`python -m torch_mhc.ops.aot --check --streams $(seq 1 16)`).
FUSED_STREAMS = tuple(range(1, 17))
# The coefficient kernels (the GEMM and its epilogue: Sinkhorn or the map on chip) take n = 1 to 16: at n = 1 to 8
# (MAP_STREAMS) every built-in map, at n = 9 to 16 Sinkhorn on chip only (the GEMM 2n + n^2 columns wide, 99 to 288,
# in column tiles; the epilogue on [1, 16, 16] tiles). Other maps there (identity, circulant, Kronecker, maps of
# your own: other widths) run their coefficients on the reference path and pre and post on the kernels.
COEFFICIENT_STREAMS = tuple(range(1, 17))
MAP_STREAMS = tuple(range(1, 9))
# The widest coefficient GEMM the kernels take at n <= 8: M = 2n + k columns (k res logits), tiled as the next power
# of two. The permutation mixture at n = 5 (k = 5! = 120, M = 130, 256-wide tiles) spilled in the GEMMs and
# epilogues (compile gate), so a wider M runs the reference path; every other built-in map at n <= 8 is at most 80
# wide.
MAX_GEMM_WIDTH = 128
_backend = os.environ.get("TORCH_MHC_BACKEND", "auto")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise ValueError("backend 'triton' needs the triton package (pip install triton)")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def should_fuse(x: torch.Tensor, width: int | None = None) -> bool:
    """Whether the kernels handle streams ``x [..., n, C]`` under the current backend: the one place that decides.

    Fused only when the backend allows it (``auto``: CUDA tensors with triton installed; ``triton``: any device),
    the dtype is in ``FUSED_DTYPES`` and n is in ``FUSED_STREAMS`` (1 to 16); for the coefficient kernels (pass
    their GEMM's ``width`` 2n + k) also: at n <= 8 the width at most ``MAX_GEMM_WIDTH``, at n = 9 to 16 Sinkhorn's
    width 2n + n^2. Everything else (fp64, n above 16, other maps' coefficients at n = 9 to 16, the permutation
    mixture at n = 5, ...) takes the PyTorch reference path, forward and backward, with the same results.
    Under ``torch.compile`` (backend ``auto`` or ``triton``) the fused path is taken for every such x: model code
    then calls the ``torch_mhc::`` custom ops (:mod:`torch_mhc.nn.custom_ops`), which run the kernels or the
    reference at run time as :func:`kernels_run` says; backend ``reference`` compiles the plain PyTorch path."""
    if _backend != "reference" and torch.compiler.is_compiling() and fusable(x, width):
        return True
    return kernels_run(x, width)


def fusable(x: torch.Tensor, width: int | None = None) -> bool:
    """Whether the kernels are built for streams ``x [..., n, C]``: dtype in ``FUSED_DTYPES``, n in ``FUSED_STREAMS``,
    C >= 1 (empty rows take the reference path); with a coefficient GEMM ``width`` (the coefficient kernels) also
    what :func:`unfused_reason` asks of it."""
    if x.dtype not in FUSED_DTYPES or x.dim() < 2 or x.shape[-1] == 0:
        return False
    return unfused_reason(x.shape[-2], width) is None


def kernels_run(x: torch.Tensor, width: int | None = None) -> bool:
    """Whether the Triton kernels (not the reference) compute for ``x`` under the current backend (see
    :func:`should_fuse`): what the custom ops' implementation asks at run time."""
    if _backend == "reference" or not fusable(x, width):
        return False
    if _backend == "triton":
        return True
    return x.is_cuda and triton_available()


def unfused_reason(n: int, width: int | None = None) -> str | None:
    """Why the kernels are not built for n streams (and, given, a coefficient GEMM ``width`` columns wide: the
    coefficient kernels), or None when they are: the one statement of ``FUSED_STREAMS``, ``COEFFICIENT_STREAMS``,
    ``MAP_STREAMS`` and ``MAX_GEMM_WIDTH`` that :func:`fusable`, the entry points below and the read-ahead post
    ask."""
    if n not in FUSED_STREAMS:
        return (f"the fused kernels take n in {FUSED_STREAMS} streams, got n = {n}; torch_mhc.nn.functional runs the "
                "reference path for other n (see should_fuse)")
    if width is not None and n not in COEFFICIENT_STREAMS:
        return (f"the fused coefficient kernels take n in {COEFFICIENT_STREAMS} streams, got n = {n}; "
                "torch_mhc.nn.functional runs the reference path for their coefficients (see should_fuse)")
    if width is not None and n not in MAP_STREAMS and width != 2 * n + n * n:
        return (f"at n = {n} the fused coefficient kernels take Sinkhorn's GEMM (2n + n^2 = {2 * n + n * n} "
                f"columns) only, got {width} (k = {width - 2 * n} res logits); torch_mhc.nn.functional runs the "
                "reference path for it (see should_fuse)")
    if width is not None and n in MAP_STREAMS and width > MAX_GEMM_WIDTH:
        return (f"the fused coefficient GEMM takes at most {MAX_GEMM_WIDTH} columns (2n + k), got {width} (n = {n}, "
                f"k = {width - 2 * n} res logits); torch_mhc.nn.functional runs the reference path for it (see "
                "should_fuse)")
    return None


def _require_fused_streams(n: int, what: str, width: int | None = None) -> None:
    """The entry points below are the kernels themselves: an n (or a coefficient GEMM width) they are not built for
    is a clear error here, not a KeyError in a block table, a spilling kernel or a failure in the backward (model
    code asks :func:`should_fuse` first)."""
    reason = unfused_reason(n, width)
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


# The kernels import triton; these entry points import them on first use, so ``import torch_mhc``
# works without triton.


def kernel_spec(h_res, iters: int, variant: str, n: int | None = None) -> tuple:
    """What the epilogue kernels compute for the res part: on chip ("sinkhorn", iters, softmax start, transposed),
    ("identity",) or ("mixture", ((kind, size), ...)) (circulant, permutation mixture, Kronecker of permutation
    mixtures: see ``ops.coefficients.Epilogue``), or ("logits", k): the k res logits handed out, the map's own
    ``h_res`` run on them in PyTorch between the two kernels (any map the kernels do not know, a user's map or a
    built-in whose ``h_res`` a subclass overrides included). ``h_res``: an
    :class:`torch_mhc.nn.maps.HResMap` (duck-typed: ``kernel_spec()``, ``logit_count()``, called on the logits),
    or None for the Sinkhorn that ``iters`` and ``variant`` name. Given ``n`` beyond ``MAP_STREAMS``, a map other
    than Sinkhorn takes the logits path (the gate traces no other on-chip map there; one reaches the kernels only
    when its logit count is Sinkhorn's n^2, see :func:`unfused_reason`)."""
    if h_res is None:
        v4 = variant == "deepseek-v4"
        return ("sinkhorn", iters, v4, v4)
    spec = h_res.kernel_spec()
    if spec is None or (n is not None and n not in MAP_STREAMS and spec[0] != "sinkhorn"):
        return ("logits", h_res.logit_count())
    return spec


def fused_mhc_coefficients(
    x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, *, iters: int, eps: float,
    variant: str, h_res=None, batch_invariant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[..., n, C]``, phi ``[n*C, 2n+k]``, bias ``[2n+k]``, alpha ``[3]`` -> fp32 (H_pre ``[..., n]``,
    H_post ``[..., n]``, H_res ``[..., n, n]``); ``h_res``: the map (None: the variant's Sinkhorn, k = n^2, with
    ``iters``); ``batch_invariant``: each token's results are the same bits alone or in any batch (no
    token-count-dependent split or tile); see :mod:`torch_mhc.ops.coefficients`."""
    _require_fused_streams(x.shape[-2], "fused_mhc_coefficients", phi.shape[-1])
    from torch_mhc.ops.coefficients import fused_mhc_coefficients as impl

    return impl(x, phi, bias, alpha, eps=eps, variant=variant, spec=kernel_spec(h_res, iters, variant, x.shape[-2]),
                h_res=h_res, batch_invariant=batch_invariant)


def fused_stream_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """x ``[..., n, C]``, h_pre ``[..., n]`` -> ``sum_i H_pre[i] x_i`` ``[..., C]`` in x's dtype."""
    _require_fused_streams(x.shape[-2], "fused_stream_pre")
    from torch_mhc.ops.streams import fused_stream_pre as impl

    return impl(x, h_pre)


def fused_stream_post(x: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, f_out: torch.Tensor) -> torch.Tensor:
    """x ``[..., n, C]``, h_post ``[..., n]``, h_res ``[..., n, n]``, f_out ``[..., C]`` -> ``H_res x + H_post^T f``
    ``[..., n, C]`` in x's dtype."""
    _require_fused_streams(x.shape[-2], "fused_stream_post")
    from torch_mhc.ops.streams import fused_stream_post as impl

    return impl(x, h_post, h_res, f_out)


def fused_sublayer_pre(x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, *, iters: int,
                       eps: float, variant: str, read_ahead=None, h_res=None, batch_invariant: bool = False):
    """x ``[..., n, C]`` -> (y ``[..., C]``, fp32 (H_pre, H_post, H_res), link): coefficients and pre in one
    autograd Function whose backward takes post's dx through ``link`` and adds pre's and the coefficient
    GEMM's terms in place (one dx buffer, no autograd adds); see :mod:`torch_mhc.ops.sublayer`.
    ``read_ahead``: what the post that wrote x computed of this GEMM (used if it matches x and phi). ``h_res``: as
    in :func:`fused_mhc_coefficients`, as is ``batch_invariant``."""
    _require_fused_streams(x.shape[-2], "fused_sublayer_pre", phi.shape[-1])
    from torch_mhc.ops.sublayer import fused_sublayer_pre as impl

    return impl(x, phi, bias, alpha, eps=eps, variant=variant, read_ahead=read_ahead,
                spec=kernel_spec(h_res, iters, variant, x.shape[-2]), h_res=h_res,
                batch_invariant=batch_invariant)


def fused_sublayer_post(link, h_post: torch.Tensor, h_res: torch.Tensor, f_out: torch.Tensor, read_ahead=None,
                        chain_backward: bool = False, batch_invariant: bool = False):
    """(link from :func:`fused_sublayer_pre`, h_post ``[..., n]``, h_res ``[..., n, n]``, f ``[..., C]``) ->
    new state ``[..., n, C]``; its backward hands dx to the pre half instead of to autograd. With
    ``read_ahead`` = (phi, eps) of the next sublayer: (new state, ReadAhead for its ``fused_sublayer_pre``).
    ``chain_backward``: that read's backward leaves the state's gradient to this post's backward.
    ``batch_invariant``: the read-ahead's tiles do not depend on the token count."""
    from torch_mhc.ops.sublayer import fused_sublayer_post as impl

    return impl(link, h_post, h_res, f_out, read_ahead=read_ahead, chain_backward=chain_backward,
                batch_invariant=batch_invariant)
