"""Residual-stream connections around one sublayer F: plain residual, HC and mHC.

All three share one interface. The state is ``streams [..., n, dim]``; a connection reads it
through ``H_pre``, runs F once, writes back through ``H_post`` and mixes through ``H_res``::

    streams' = H_res @ streams + H_post^T F(H_pre @ streams)          (spec Eq. 3)

``forward(streams, *args, **kwargs)`` does all of it for a wrapped ``sublayer``; ``pre`` and
``post`` are the two halves for code that is not a module::

    x, state = conn.pre(streams)      # x: [..., dim]
    streams = conn.post(state, f(x))
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from torch_mhc.nn import functional as Fm
from torch_mhc.nn import recompute
from torch_mhc.nn.maps import HResMap, make_h_res
from torch_mhc.numerics import BIAS_INITS, MAPPINGS, VARIANTS, compute_dtype


@dataclass
class ConnectionState:
    """What ``post`` needs from ``pre``: the streams and the write/mix coefficients."""

    streams: torch.Tensor
    h_post: torch.Tensor
    h_res: torch.Tensor
    link: object = None  # fused kernels: ties post's backward to pre's (one dx buffer); None otherwise


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def fixed_coefficients(streams: torch.Tensor, dtype: torch.dtype):
    """The paper's fixed mappings for streams ``[..., n, C]``: H_pre = 1/n, H_post = 1, H_res = I."""
    lead, n, dev = streams.shape[:-2], streams.shape[-2], streams.device
    h_pre = torch.full((n,), 1.0 / n, device=dev, dtype=dtype).expand(*lead, n)
    h_post = torch.ones(n, device=dev, dtype=dtype).expand(*lead, n)
    h_res = torch.eye(n, device=dev, dtype=dtype).expand(*lead, n, n)
    return h_pre, h_post, h_res


def _check_learn(learn) -> tuple[str, ...]:
    unknown = set(learn) - set(MAPPINGS)
    if unknown:
        raise ValueError(f"learn may only name {MAPPINGS}, got {sorted(unknown)}")
    return tuple(m for m in MAPPINGS if m in learn)


def fix_unlearned(learn: tuple[str, ...], streams: torch.Tensor, coeffs):
    """(H_pre, H_post, H_res) with each mapping ``learn`` leaves out replaced by its fixed value."""
    if len(learn) == len(MAPPINGS):
        return coeffs
    fixed = fixed_coefficients(streams, coeffs[0].dtype)
    return tuple(h if m in learn else f for m, h, f in zip(MAPPINGS, coeffs, fixed))


class StreamConnection(nn.Module):
    """Base class: subclasses define ``coefficients(streams) -> (H_pre, H_post, H_res)``.

    ``DECAYED`` names the connection's own parameters that take weight decay (its dynamic projections);
    the others (biases, gains, static mappings) do not.
    """

    DECAYED: tuple[str, ...] = ()

    def __init__(self, dim: int, n: int, sublayer: nn.Module | None = None):
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("n", n)
        self.dim, self.n = dim, n
        self.sublayer = sublayer
        self.record = False  # when True, pre() keeps the last coefficients in self.recorded
        self.recorded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.n}"

    def check_streams(self, streams: torch.Tensor) -> None:
        if streams.dim() < 2 or streams.shape[-2] != self.n or streams.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects streams of shape [..., n={self.n}, dim={self.dim}], "
                f"got {tuple(streams.shape)}"
            )

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Set the connection's own parameters as construction does (not the sublayer's)."""

    def pre(self, streams: torch.Tensor) -> tuple[torch.Tensor, ConnectionState]:
        """streams ``[..., n, dim]`` -> (sublayer input ``[..., dim]``, state for ``post``)."""
        self.check_streams(streams)
        x, (h_pre, h_post, h_res), link = self.read(streams)
        if self.record:
            self.recorded = (h_pre.detach(), h_post.detach(), h_res.detach())
        return x, ConnectionState(streams, h_post, h_res, link)

    def read(self, streams: torch.Tensor):
        """streams -> (sublayer input, (H_pre, H_post, H_res), link for ``post`` or None)."""
        coeffs = self.coefficients(streams)
        return Fm.stream_pre(streams, coeffs[0]), coeffs, None

    def check_output(self, state: ConnectionState, sublayer_output: torch.Tensor) -> None:
        expected = state.streams.shape[:-2] + (self.dim,)
        if sublayer_output.shape != expected:
            raise ValueError(
                f"{type(self).__name__}: sublayer output must have shape {tuple(expected)}, "
                f"got {tuple(sublayer_output.shape)}"
            )

    def write(self, state: ConnectionState, sublayer_output: torch.Tensor) -> torch.Tensor:
        """The new streams ``H_res @ streams + H_post^T F`` (``post`` without its checks)."""
        return Fm.stream_post(state.streams, state.h_post, state.h_res, sublayer_output, link=state.link)

    def post(self, state: ConnectionState, sublayer_output: torch.Tensor) -> torch.Tensor:
        """(state, F's output ``[..., dim]``) -> new streams ``[..., n, dim]``."""
        self.check_output(state, sublayer_output)
        out = self.write(state, sublayer_output)
        rc = recompute.active()
        if rc is not None and torch.is_grad_enabled():
            rc.register(out, state.streams, state.h_post, state.h_res, sublayer_output)
        return out

    def forward(self, streams: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.sublayer is None:
            raise ValueError(
                f"{type(self).__name__} was built without a sublayer: call pre()/post() around your "
                "own code, or pass sublayer=..."
            )
        x, state = self.pre(streams)
        return self.post(state, self.sublayer(x, *args, **kwargs))


class Residual(StreamConnection):
    """Pre-Norm residual ``x + F(x)``. With n > 1 streams it is the paper's "all mappings fixed"
    baseline: ``H_pre = 1/n``, ``H_post = 1``, ``H_res = I``; n = 1 is the ordinary residual."""

    def __init__(self, dim: int, n: int = 1, sublayer: nn.Module | None = None):
        super().__init__(dim, n, sublayer)

    def coefficients(self, streams):
        return fixed_coefficients(streams, compute_dtype(streams.dtype))

    def pre(self, streams):
        if self.n > 1 or self.record:
            return super().pre(streams)
        self.check_streams(streams)  # n = 1: skip the coefficient arithmetic entirely
        return streams[..., 0, :], ConnectionState(streams, None, None)

    def post(self, state, sublayer_output):
        if state.h_post is not None:
            return super().post(state, sublayer_output)
        self.check_output(state, sublayer_output)
        return state.streams + sublayer_output.unsqueeze(-2).to(state.streams.dtype)


class ManifoldHyperConnection(StreamConnection):
    """mHC around one sublayer (spec sections 1-4).

    Args:
        dim: stream width C. n: number of streams (expansion rate).
        sublayer: the F to wrap, or None to use ``pre``/``post``.
        layer_index: which sublayer this is (picks the "home" stream of the identity bias init).
        sinkhorn_iters, eps: Sinkhorn-Knopp rounds and the epsilon of the norm and of Sinkhorn.
        alpha_init: initial alpha (pre, post, res); paper: 0.01.
        bias_init: "identity" (b_pre = -3 except +3 on stream ``layer_index % n``, b_post = 0,
            b_res = g(2I - 1)/2 with g = ``identity_gap``, 6 by default: H_res starts near I, the
            farther the larger g), "zero" (H_pre = 1/2, H_post = 1, H_res = 1/n; the same as
            identity with g = 0 but for b_pre) or "v4" (transformers' DeepSeek-V4 init: every bias 0,
            phi normal with std ``phi_std`` on every column; V4's scale starts at 1: ``alpha_init=1``).
            With a zero bias the gradient of H_res vanishes while the streams are copies.
        identity_gap: g of the identity init (ignored by the other schemes).
        phi_std: std of phi's random columns; None: 1/sqrt(n*dim) (identity, zero), 0.02 (v4).
        dynamic: False drops the ``x phi`` term (static-only mHC).
        learn: which mappings are learned; the others are fixed to H_pre = 1/n, H_post = 1, H_res = I.
        variant: "paper", or "deepseek-v4" (V4 numerics and parameter layout: ``fn [2n+k, nC]``,
            ``base [2n+k]``, ``scale [3]``, ``H_pre = sigmoid + eps``; with ``h_res="sinkhorn"`` the res block
            holds V4's ``comb`` logits, read by V4's softmax-start Sinkhorn).
        h_res: the map from the res logits to H_res: a name ("sinkhorn", default, with ``sinkhorn_iters``, ``eps``
            and the variant's numerics; "identity"; "permutation-mixture", n <= 5; "circulant"; "kronecker") or an
            :class:`~torch_mhc.nn.maps.HResMap` instance (a map of your own); see :mod:`torch_mhc.nn.maps`.

    Parameters (paper layout): ``phi [n*dim, 2n+k]`` (columns pre | post | res, k = the map's logit count; Sinkhorn:
    k = n^2, row-major, ``H_res[i, j]`` from column ``2n + i*n + j``), ``bias [2n+k]``, ``alpha [3]``. At step 0
    ``H_post = 1`` exactly; ``H_pre`` and ``H_res`` vary slightly per token (``phi`` is random on
    their columns, to break the symmetry of copied streams), which for copied streams and a
    pre-normed sublayer changes nothing: the stack starts as the Pre-Norm residual network.
    """

    DECAYED = ("phi", "fn")

    def __init__(
        self,
        dim: int,
        n: int = 4,
        sublayer: nn.Module | None = None,
        *,
        layer_index: int = 0,
        sinkhorn_iters: int = 20,
        eps: float = 1e-6,
        alpha_init: float = 0.01,
        bias_init: str = "identity",
        identity_gap: float = 6.0,
        phi_std: float | None = None,
        dynamic: bool = True,
        learn: tuple[str, ...] = MAPPINGS,
        variant: str = "paper",
        h_res: str | HResMap = "sinkhorn",
        batch_invariant: bool = False,
    ):
        super().__init__(dim, n, sublayer)
        _check_positive("sinkhorn_iters", sinkhorn_iters)
        if bias_init not in BIAS_INITS:
            raise ValueError(f"bias_init must be one of {BIAS_INITS}, got {bias_init!r}")
        if not math.isfinite(identity_gap) or identity_gap < 0:
            raise ValueError(f"identity_gap must be a finite number >= 0, got {identity_gap!r}")
        if phi_std is not None and (not math.isfinite(phi_std) or phi_std < 0):
            raise ValueError(f"phi_std must be a finite number >= 0 or None, got {phi_std!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.sinkhorn_iters, self.eps, self.variant = sinkhorn_iters, eps, variant
        self.batch_invariant = batch_invariant  # fused kernels: a token's bits do not depend on the batch
        self.dynamic, self.learn = dynamic, _check_learn(learn)
        self.layer_index, self.alpha_init, self.bias_init = layer_index, alpha_init, bias_init
        self.identity_gap, self.phi_std = identity_gap, phi_std
        if h_res == "sinkhorn":  # the variant's Sinkhorn (V4: softmax start, comb read transposed)
            h_res = Fm.default_map(n, sinkhorn_iters, eps, variant)
        self.h_res_map = make_h_res(h_res, n)
        width = 2 * n + self.h_res_map.logit_count()
        if variant == "paper":
            self.phi = nn.Parameter(torch.empty(n * dim, width))
            self.bias = nn.Parameter(torch.empty(width))
            self.alpha = nn.Parameter(torch.empty(3))
        else:
            self.fn = nn.Parameter(torch.empty(width, n * dim))
            self.base = nn.Parameter(torch.empty(width))
            self.scale = nn.Parameter(torch.empty(3))
        self.next_reader: ManifoldHyperConnection | None = None  # see chain_reads (not a submodule)
        self._read_ahead = None  # the GEMM of our read, computed by the previous connection's fused post
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Set phi, bias and alpha as construction does, drawing phi from ``generator`` (CPU; default:
        the global one). Works on parameters of any device, meta-built and materialised ones included.

        identity and zero: phi ~ N(0, 1/(n*dim)) on the pre and res columns, so x_hat phi has unit scale
        and breaks the symmetry between copied streams; zero on the post columns, so H_post =
        2 sigmoid(b_post) = 1 exactly at step 0 and the network starts as the Pre-Norm residual network.
        v4: phi ~ N(0, 0.02^2) on every column, biases 0 (H_post is then 1 only on average).
        """
        n, dim = self.n, self.dim
        width = 2 * n + self.h_res_map.logit_count()
        bias = torch.zeros(width, device="cpu")
        if self.bias_init == "identity":
            bias[:n] = -3.0
            bias[self.layer_index % n] = 3.0
        bias[2 * n :] = self.h_res_map.init_logits(self.bias_init, self.identity_gap)
        v4 = self.bias_init == "v4"
        phi = torch.randn(n * dim, width, generator=generator, device="cpu")
        if self.phi_std is not None or v4:
            phi *= self.phi_std if self.phi_std is not None else 0.02
        else:
            phi /= math.sqrt(n * dim)
        if not v4:
            phi[:, n : 2 * n] = 0.0
        proj, b, alpha = self.projection()  # proj is a view of fn for V4: writing it writes fn
        proj.copy_(phi)
        b.copy_(bias)
        alpha.fill_(float(self.alpha_init))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n={self.n}, variant={self.variant}, h_res={self.h_res_map!r}, "
            f"dynamic={self.dynamic}, learn={self.learn}"
        )

    def projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(phi ``[n*dim, 2n+k]``, bias, alpha) whatever the parameter layout."""
        if self.variant == "paper":
            return self.phi, self.bias, self.alpha
        return self.fn.t(), self.base, self.scale

    def __setattr__(self, name, value):
        if name == "next_reader":  # a reference, not a child: kept out of modules(), state_dict() and .to()
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def fused_read(self) -> bool:
        """Whether the read is the fused sublayer's (dynamic, every mapping learned, ``coefficients`` not
        overridden by a subclass: then the read goes through it) when the kernels run."""
        return (self.dynamic and len(self.learn) == len(MAPPINGS)
                and type(self).coefficients is ManifoldHyperConnection.coefficients)

    def read(self, streams):
        if not self.fused_read():
            return super().read(streams)
        ahead, self._read_ahead = self._read_ahead, None
        phi, bias, alpha = self.projection()
        return Fm.mhc_sublayer_pre(streams, phi, bias, alpha, iters=self.sinkhorn_iters, eps=self.eps,
                                   variant=self.variant, read_ahead=ahead, h_res=self.h_res_map,
                                   batch_invariant=self.batch_invariant)

    def write(self, state, sublayer_output):
        """With the kernels and a next reader (:func:`chain_reads`), the post also computes the next
        connection's coefficient GEMM on the state it writes (one pass over the state less per sublayer)."""
        nxt = self.next_reader
        if state.link is None or nxt is None or torch.compiler.is_compiling():
            return super().write(state, sublayer_output)
        phi = nxt.projection()[0]
        if (not nxt.fused_read() or (nxt.n, nxt.dim) != (self.n, self.dim) or type(phi.data) is not torch.Tensor
                or phi.device != state.streams.device):  # e.g. an FSDP-sharded phi (DTensor) is not read ahead
            return super().write(state, sublayer_output)
        out, nxt._read_ahead = Fm.stream_post(state.streams, state.h_post, state.h_res, sublayer_output,
                                              link=state.link, read_ahead=(phi, nxt.eps),
                                              chain_backward=getattr(_chained, "depth", 0) > 0,
                                              batch_invariant=nxt.batch_invariant)
        return out

    def coefficients(self, streams):
        """streams ``[..., n, dim]`` -> fp32 (H_pre ``[..., n]``, H_post ``[..., n]``, H_res ``[..., n, n]``)."""
        self.check_streams(streams)
        phi, bias, alpha = self.projection()
        h_pre, h_post, h_res = Fm.mhc_coefficients(
            streams, phi, bias, alpha, iters=self.sinkhorn_iters, eps=self.eps, variant=self.variant,
            dynamic=self.dynamic, h_res=self.h_res_map, batch_invariant=self.batch_invariant,
        )
        return fix_unlearned(self.learn, streams, (h_pre, h_post, h_res))


class HyperConnection(StreamConnection):
    """Hyper-Connections (Zhu et al., ICLR 2025): unconstrained, per-stream norm, tanh dynamics.

    Initialised to Pre-Norm: ``H_pre`` one-hot on stream ``layer_index % n``, ``H_post = 1``,
    ``H_res = I``, dynamic weights 0, scales 0.01. ``dynamic=False`` is static HC.
    Parameters: ``static_pre [n]``, ``static_post [n]``, ``static_res [n, n]`` (HC's A_r, so
    ``H_res = static_res^T`` plus dynamics), ``w_pre [dim]``, ``w_post [dim]``, ``w_res [dim, n]``,
    ``scale [3]``. ``learn`` as in mHC: the mappings it leaves out are fixed to H_pre = 1/n, H_post = 1,
    H_res = I (``learn=("pre", "post")`` is the ``hc-identity`` control).
    """

    DECAYED = ("w_pre", "w_post", "w_res")

    def __init__(
        self,
        dim: int,
        n: int = 4,
        sublayer: nn.Module | None = None,
        *,
        layer_index: int = 0,
        dynamic: bool = True,
        scale_init: float = 0.01,
        eps: float = 1e-6,
        learn: tuple[str, ...] = MAPPINGS,
    ):
        super().__init__(dim, n, sublayer)
        self.dynamic, self.eps, self.learn = dynamic, eps, _check_learn(learn)
        self.layer_index, self.scale_init = layer_index, scale_init
        self.static_pre = nn.Parameter(torch.empty(n))
        self.static_post = nn.Parameter(torch.empty(n))
        self.static_res = nn.Parameter(torch.empty(n, n))
        if dynamic:
            self.w_pre = nn.Parameter(torch.empty(dim))
            self.w_post = nn.Parameter(torch.empty(dim))
            self.w_res = nn.Parameter(torch.empty(dim, n))
            self.scale = nn.Parameter(torch.empty(3))
        else:
            self.w_pre = self.w_post = self.w_res = self.scale = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Pre-Norm init (nothing random; ``generator`` is accepted for a uniform interface)."""
        self.static_pre.zero_()
        self.static_pre[self.layer_index % self.n] = 1.0
        self.static_post.fill_(1.0)
        self.static_res.copy_(torch.eye(self.n, device="cpu"))
        if self.dynamic:
            for w in (self.w_pre, self.w_post, self.w_res):
                w.zero_()
            self.scale.fill_(float(self.scale_init))

    def coefficients(self, streams):
        """streams ``[..., n, dim]`` -> fp32 (H_pre ``[..., n]``, H_post ``[..., n]``, H_res ``[..., n, n]``)."""
        self.check_streams(streams)
        coeffs = Fm.hc_coefficients(
            streams, self.static_pre, self.static_post, self.static_res, self.w_pre, self.w_post, self.w_res,
            self.scale, eps=self.eps,
        )
        return fix_unlearned(self.learn, streams, coeffs)


_chained = threading.local()  # per thread: a forward in another thread is not chained by this one's scope


@contextlib.contextmanager
def chained_backward():
    """Forwards run inside this scope (in this thread) let the fused kernels skip writing the gradient of each
    state between two chained mHC sublayers (:func:`chain_reads`): the reader's backward leaves its terms to the
    backward of the post that wrote the state, which sums them in its own pass (one write and one read of
    ``[T, n, C]`` less per sublayer). The scope is read at forward time; the backward may run anywhere. The
    trainer runs each micro-batch's forward inside it. The price: those states' gradients are never
    materialised, so do not ask for them: ``torch.autograd.grad`` with respect to a state between two sublayers
    together with anything that needs the post that wrote it (an earlier sublayer's parameters, the input) returns
    zeros for the state (alone it is exact: the read then keeps its own dx; so is ``backward(inputs=[state])``,
    which retains the state's gradient), and hooks on autograd graph nodes (``grad_fn.register_hook``,
    ``register_prehook``) around such a state see zeros and cannot change the deferred terms. Tensor hooks
    (``register_hook``) and ``retain_grad`` on the state are detected and turn the deferral off for it, and so do
    module backward hooks (they hand the reader a new tensor). Otherwise parameter and input gradients are the
    same function either way (summed in another order: rounding-level differences). n <= 4; no effect on the
    reference path."""
    _chained.depth = getattr(_chained, "depth", 0) + 1
    try:
        yield
    finally:
        _chained.depth -= 1


def chain_reads(connections: list[StreamConnection]) -> None:
    """Tell each mHC connection which one reads the state it writes: the next in ``connections`` (depth
    order), if that is a dynamic mHC connection too. With the fused kernels a post then computes its reader's
    coefficient GEMM while it writes the state; the reader uses it only if it gets that very state (anything
    in between that changes or replaces the state makes it compute its own). Results are the same function
    of the inputs either way (the GEMM's sums run in another order: rounding-level differences)."""
    for conn, nxt in zip(connections, list(connections[1:]) + [None]):
        if isinstance(conn, ManifoldHyperConnection):
            conn.next_reader = nxt if isinstance(nxt, ManifoldHyperConnection) else None
