"""Residual-stream connections around one sublayer F: plain residual, HC and mHC.

All three share one interface. The state is ``streams [..., n, dim]``; a connection reads it
through ``H_pre``, runs F once, writes back through ``H_post`` and mixes through ``H_res``::

    streams' = H_res @ streams + H_post^T F(H_pre @ streams)          (spec Eq. 3)

``forward(streams, *args, **kwargs)`` does all of it for a wrapped ``sublayer``; ``pre`` and
``post`` are the two halves for code that is not a module::

    x, state = conn.pre(streams)      # x: [..., dim]
    streams = conn.post(state, f(x))

Read-ahead (fused kernels, mHC): a post may also compute the coefficient GEMM of the connection that reads the
state it writes. That is a value the caller hands on, never state kept in a module::

    streams, ahead = conn.forward_ahead(streams, reader=nxt)          # or: conn.post_ahead(state, f, nxt)
    streams, ahead = nxt.forward_ahead(streams, read_ahead=ahead)     # or: nxt.pre(streams, read_ahead=ahead)

``run_chain`` does this for a list of connections; ``forward_ahead_of`` for one connection that may carry hooks.
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

    def unused_param_count(self) -> int:
        """Entries of this connection's own parameters that its output never reads (those of the mappings that
        ``learn`` fixes, or the dynamic projections of static mappings): they get no gradient and are not
        counted by ``DecoderLM.num_params(trained_only=True)``."""
        return 0

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

    def pre(self, streams: torch.Tensor, read_ahead=None) -> tuple[torch.Tensor, ConnectionState]:
        """streams ``[..., n, dim]`` -> (sublayer input ``[..., dim]``, state for ``post``). ``read_ahead``: what
        the post that wrote ``streams`` computed for this read (:meth:`post_ahead`), or None; used only by a
        fused mHC read, and only if it was computed from this very tensor and this connection's phi."""
        self.check_streams(streams)
        x, (h_pre, h_post, h_res), link = self.read(streams, read_ahead)
        if self.record:
            self.recorded = (h_pre.detach(), h_post.detach(), h_res.detach())
        return x, ConnectionState(streams, h_post, h_res, link)

    def read(self, streams: torch.Tensor, read_ahead=None):
        """streams -> (sublayer input, (H_pre, H_post, H_res), link for ``post`` or None); ``read_ahead`` is
        ignored here (see :meth:`ManifoldHyperConnection.read`)."""
        coeffs = self.coefficients(streams)
        return Fm.stream_pre(streams, coeffs[0]), coeffs, None

    def read_ahead_spec(self) -> tuple[torch.Tensor, float, bool] | None:
        """(phi ``[n*dim, M]``, eps, batch_invariant) with which the post that writes this connection's input may
        compute its read ahead, or None: this connection takes no read-ahead (only a fused mHC read does)."""
        return None

    def check_output(self, state: ConnectionState, sublayer_output: torch.Tensor) -> None:
        expected = state.streams.shape[:-2] + (self.dim,)
        if sublayer_output.shape != expected:
            raise ValueError(
                f"{type(self).__name__}: sublayer output must have shape {tuple(expected)}, "
                f"got {tuple(sublayer_output.shape)}"
            )

    def write(self, state: ConnectionState, sublayer_output: torch.Tensor, reader=None):
        """(The new streams ``H_res @ streams + H_post^T F``, None): ``post_ahead`` without its checks; a fused mHC
        post also computes ``reader``'s read-ahead (:meth:`ManifoldHyperConnection.write`)."""
        return Fm.stream_post(state.streams, state.h_post, state.h_res, sublayer_output, link=state.link), None

    def post(self, state: ConnectionState, sublayer_output: torch.Tensor) -> torch.Tensor:
        """(state, F's output ``[..., dim]``) -> new streams ``[..., n, dim]``."""
        return self.post_ahead(state, sublayer_output)[0]

    def post_ahead(self, state: ConnectionState, sublayer_output: torch.Tensor, reader=None):
        """(state, F's output ``[..., dim]``, the connection that reads the new streams next or None) -> (new streams
        ``[..., n, dim]``, the read-ahead to hand to ``reader.pre`` or None). The read-ahead is computed only for a
        ``reader`` given here, by a fused mHC post whose reader takes one (:meth:`read_ahead_spec`); else None."""
        self.check_output(state, sublayer_output)
        out, ahead = self.write(state, sublayer_output, reader)
        rc = recompute.active()
        if rc is not None and torch.is_grad_enabled() and state.h_post is not None:
            rc.register(out, state.streams, state.h_post, state.h_res, sublayer_output)
        return out, ahead

    def forward(self, streams: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """streams ``[..., n, dim]`` -> new streams (the wrapped sublayer called with ``x, *args, **kwargs``)."""
        return self._run(streams, args, kwargs, None, None)[0]

    def forward_ahead(self, streams: torch.Tensor, *args, read_ahead=None, reader=None, **kwargs):
        """``forward`` with the read-ahead as a value: streams ``[..., n, dim]`` and what the previous post computed
        for this read (or None) -> (new streams, the read-ahead for ``reader``, the next connection, or None).
        Module hooks do not run (this is not ``__call__``): :func:`forward_ahead_of` calls hooked modules plainly."""
        return self._run(streams, args, kwargs, read_ahead, reader)

    def _run(self, streams, args, kwargs, read_ahead, reader):
        if self.sublayer is None:
            raise ValueError(
                f"{type(self).__name__} was built without a sublayer: call pre()/post() around your "
                "own code, or pass sublayer=..."
            )
        x, state = self.pre(streams, read_ahead)
        return self.post_ahead(state, self.sublayer(x, *args, **kwargs), reader)


class Residual(StreamConnection):
    """Pre-Norm residual ``x + F(x)``. With n > 1 streams it is the paper's "all mappings fixed"
    baseline: ``H_pre = 1/n``, ``H_post = 1``, ``H_res = I``; n = 1 is the ordinary residual."""

    def __init__(self, dim: int, n: int = 1, sublayer: nn.Module | None = None):
        super().__init__(dim, n, sublayer)

    def coefficients(self, streams):
        return fixed_coefficients(streams, compute_dtype(streams.dtype))

    def pre(self, streams, read_ahead=None):
        if self.n > 1 or self.record:
            return super().pre(streams, read_ahead)
        self.check_streams(streams)  # n = 1: skip the coefficient arithmetic entirely
        return streams[..., 0, :], ConnectionState(streams, None, None)

    def write(self, state, sublayer_output, reader=None):
        if state.h_post is not None:
            return super().write(state, sublayer_output, reader)
        return state.streams + sublayer_output.unsqueeze(-2).to(state.streams.dtype), None


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
        self.reset_parameters()

    def unused_param_count(self) -> int:
        n, per_column = self.n, self.n * self.dim
        columns = dict(zip(MAPPINGS, (n, n, self.h_res_map.logit_count())))
        fixed = [m for m in MAPPINGS if m not in self.learn]
        if not self.dynamic:  # static mappings read the bias alone: phi and alpha are unused
            return per_column * sum(columns.values()) + 3 + sum(columns[m] for m in fixed)
        return sum(columns[m] * (per_column + 1) + 1 for m in fixed)  # phi columns, bias entries, alpha

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

    def coefficients_are_base(self) -> bool:
        """Whether ``coefficients`` is :class:`ManifoldHyperConnection`'s own function under this connection's
        settings: then the fused read, which computes that function, may replace it. A subclass that overrides
        ``coefficients`` answers for its override (True where it reduces to the base's); by default it does not."""
        return type(self).coefficients is ManifoldHyperConnection.coefficients

    def fused_read(self) -> bool:
        """Whether the read is the fused sublayer's when the kernels run: dynamic, every mapping learned, and
        ``coefficients`` the base's function (:meth:`coefficients_are_base`)."""
        return self.dynamic and len(self.learn) == len(MAPPINGS) and self.coefficients_are_base()

    def read(self, streams, read_ahead=None):
        if not self.fused_read():
            return super().read(streams)
        phi, bias, alpha = self.projection()
        return Fm.mhc_sublayer_pre(streams, phi, bias, alpha, iters=self.sinkhorn_iters, eps=self.eps,
                                   variant=self.variant, read_ahead=read_ahead, h_res=self.h_res_map,
                                   batch_invariant=self.batch_invariant)

    def read_ahead_spec(self):
        """(phi ``[n*dim, M]``, eps, batch_invariant) for a fused read; None otherwise, and for a phi that is not a
        plain tensor (an FSDP-sharded phi is a DTensor until its block gathers it)."""
        phi = self.projection()[0]
        if not self.fused_read() or type(phi.data) is not torch.Tensor:
            return None
        return phi, self.eps, self.batch_invariant

    def write(self, state, sublayer_output, reader=None):
        """With the kernels and a ``reader`` that takes a read-ahead (same n and dim, phi on the state's device),
        the post also computes the reader's coefficient GEMM on the state it writes (one pass over the state less
        per sublayer) and returns it (:class:`~torch_mhc.ops.sublayer.ReadAhead`) for ``reader.pre``."""
        spec = None
        if state.link is not None and reader is not None and not torch.compiler.is_compiling():
            spec = reader.read_ahead_spec()
        if spec is None or (reader.n, reader.dim) != (self.n, self.dim) or spec[0].device != state.streams.device:
            return super().write(state, sublayer_output)
        phi, eps, batch_invariant = spec
        return Fm.stream_post(state.streams, state.h_post, state.h_res, sublayer_output, link=state.link,
                              read_ahead=(phi, eps), chain_backward=getattr(_chained, "depth", 0) > 0,
                              batch_invariant=batch_invariant)

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

    def unused_param_count(self) -> int:
        n, dim = self.n, self.dim
        sizes = {"pre": (n, dim), "post": (n, dim), "res": (n * n, dim * n)}  # static, dynamic projection
        return sum(sizes[m][0] + (sizes[m][1] + 1 if self.dynamic else 0) for m in MAPPINGS if m not in self.learn)

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
    state between two chained mHC sublayers (a post that computed its reader's read-ahead, the reader taking it:
    :meth:`StreamConnection.post_ahead`): the reader's backward leaves its terms to the backward of the post that
    wrote the state, which sums them in its own pass (one write and one read of ``[T, n, C]`` less per sublayer).
    The handoff travels inside the read-ahead value. The scope is read at forward time, by each post that computes
    a read-ahead (the trainer's forward passes through wrappers that take no extra argument); the backward may run
    anywhere. The
    trainer runs each micro-batch's forward inside it. The price: those states' gradients are never
    materialised, so do not ask for them: ``torch.autograd.grad`` with respect to a state between two sublayers
    together with anything that needs the post that wrote it (an earlier sublayer's parameters, the input) returns
    zeros for the state (alone it is exact: the read then keeps its own dx; so is ``backward(inputs=[state])``,
    which retains the state's gradient), and hooks on autograd graph nodes (``grad_fn.register_hook``,
    ``register_prehook``) around such a state see zeros and cannot change the deferred terms. Tensor hooks
    (``register_hook``) and ``retain_grad`` on the state are detected and turn the deferral off for it, and
    hooked connections get no read-ahead (:func:`forward_ahead_of`). Otherwise parameter and input gradients are the
    same function either way (summed in another order: rounding-level differences). n <= 4; no effect on the
    reference path."""
    _chained.depth = getattr(_chained, "depth", 0) + 1
    try:
        yield
    finally:
        _chained.depth -= 1


def called_plainly(module: nn.Module) -> bool:
    """Whether ``module(...)`` is just ``module.forward(...)``: no forward or backward hooks on it or global ones,
    not compiled (``module.compile()``). Only then may a loop call ``forward_ahead`` in its place."""
    from torch.nn.modules import module as m

    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._compiled_call_impl is not None
                or m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def forward_ahead_of(conn: nn.Module, streams: torch.Tensor, *args, read_ahead=None, reader=None, **kwargs):
    """``conn(streams, *args, **kwargs)`` with the read-ahead handed on: -> (new streams, read-ahead for
    ``reader`` or None). A connection called plainly (:func:`called_plainly`) runs ``forward_ahead``; anything
    else (a hooked or compiled connection, a module that is not a :class:`StreamConnection`) is called as a
    module, its hooks run, and the read-ahead is dropped on both sides of it (its reader and its writer compute
    their own GEMMs: the same results). A hooked or compiled ``reader`` gets no read-ahead either."""
    if not isinstance(conn, StreamConnection) or not called_plainly(conn):
        return conn(streams, *args, **kwargs), None
    if reader is not None and not (isinstance(reader, StreamConnection) and called_plainly(reader)):
        reader = None
    return conn.forward_ahead(streams, *args, read_ahead=read_ahead, reader=reader, **kwargs)


def run_chain(connections: list[nn.Module], streams: torch.Tensor) -> torch.Tensor:
    """streams ``[..., n, dim]`` through ``connections`` in order (each with its sublayer and no other argument),
    each post handing the next connection its read-ahead (:func:`forward_ahead_of`). The results are the same
    function of the inputs as ``conns[-1](...conns[0](streams))`` (the read-ahead GEMM sums in another order:
    rounding-level differences with the kernels; the reference path is unchanged)."""
    ahead = None
    for conn, reader in zip(connections, list(connections[1:]) + [None]):
        streams, ahead = forward_ahead_of(conn, streams, read_ahead=ahead, reader=reader)
    return streams
