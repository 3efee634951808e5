"""H_res maps: how mHC turns a token's res logits ``[..., k]`` into its residual mixing ``H_res [..., n, n]``.

A map knows its logit count ``k`` (phi and bias then have ``2n + k`` columns: pre | post | res), the logits it
starts from (:meth:`HResMap.init_logits`), its reference forward (:meth:`HResMap.h_res`, differentiable; fp32
whatever the input, fp64 kept for references and gradcheck), and what the fused kernels do with it
(:meth:`HResMap.kernel_spec`). Built in:

- ``sinkhorn`` (k = n^2): Sinkhorn-Knopp of ``exp(L)`` (paper) or of V4's softmax start, read transposed for V4's
  ``comb`` layout; rows sum to 1, columns to 1 as the iterations converge.
- ``identity`` (k = 0): H_res = I.
- ``permutation-mixture`` (k = n!, mHC-lite): softmax weights over the n! permutation matrices; exactly doubly
  stochastic. n <= 5 (120 logits; n = 6 would take 720).
- ``circulant`` (k = n): softmax weights w over the n cyclic shifts, ``H_res[i, j] = w[(j - i) mod n]``; exactly
  doubly stochastic.
- ``kronecker`` (k = sum of the factors' k): ``H_1 (x) H_2 (x) ...`` of small doubly stochastic factors
  (permutation mixtures by default), for large n; a Kronecker product of doubly stochastic matrices is one.

A map of your own: subclass :class:`HResMap`, set ``logit_count`` and ``h_res`` (and ``init_logits`` if the zero
logits are not the start you want), and pass an instance as ``ManifoldHyperConnection(..., h_res=MyMap(n))``. The
fused kernels then compute the gates and the res logits, your ``h_res`` runs on those (small) logits in PyTorch, and
its gradient goes back into the kernels' backward. See docs/design.md ("H_res maps") for a worked example.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from torch_mhc.nn.sinkhorn import sinkhorn
from torch_mhc.numerics import H_RES_MAPS, SINKHORN_STARTS, compute_dtype

PERMUTATION_MAX_STREAMS = 5  # n! logits: 120 at n = 5, 720 at n = 6


class HResMap:
    """Base class: logits ``[..., k]`` -> H_res ``[..., n, n]`` (row i feeds output stream i).

    Subclasses set :meth:`logit_count` and :meth:`h_res`; :meth:`init_logits` defaults to zeros (the uniform
    start for the built-in maps)."""

    name = "custom"

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        self.n = n

    def logit_count(self) -> int:
        """k: how many res logits (columns of phi and bias) the map takes per token."""
        raise NotImplementedError

    def h_res(self, logits: torch.Tensor) -> torch.Tensor:
        """logits ``[..., k]`` (already scaled by alpha and biased) -> H_res ``[..., n, n]`` in the compute dtype."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        k = self.logit_count()
        if logits.shape[-1] != k:
            raise ValueError(f"{self!r} takes {k} logits per token, got shape {tuple(logits.shape)}")
        return self.h_res(logits.to(compute_dtype(logits.dtype)))

    def init_logits(self, bias_init: str, gap: float) -> torch.Tensor:
        """The res part of the bias at init ``[k]`` (fp32, CPU). ``bias_init="identity"``: an identity-like start
        whose logits favour the identity by ``gap`` (g); ``"zero"`` and ``"v4"``: zeros."""
        return torch.zeros(self.logit_count(), device="cpu")  # CPU even under a meta-device build

    def kernel_spec(self) -> tuple | None:
        """What the fused epilogue kernel computes on chip for this map (a hashable tuple), or None: the kernels
        then hand out the res logits and :meth:`h_res` runs on them in PyTorch. Built-in maps return their spec
        only when ``h_res`` is theirs: a subclass that overrides it gets its own ``h_res``."""
        return None

    def _owns_h_res(self, cls) -> bool:
        return type(self).h_res is cls.h_res

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class SinkhornMap(HResMap):
    """Sinkhorn-Knopp of the ``[n, n]`` logits (k = n^2, row-major: ``H_res[i, j]`` from logit ``i*n + j``).

    ``iters``, ``eps``: rounds and the epsilon in each denominator. ``start="exp"`` (paper) or ``"softmax"``
    (DeepSeek-V4: softmax over each column + eps, then rows first). ``transpose``: the logits are V4's ``comb``
    (``H_res = comb^T``: logit ``i*n + j`` feeds ``H_res[j, i]``)."""

    name = "sinkhorn"

    def __init__(self, n: int, iters: int = 20, eps: float = 1e-6, start: str = "exp", transpose: bool = False):
        super().__init__(n)
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"sinkhorn iters must be an integer >= 1, got {iters!r}")
        if start not in SINKHORN_STARTS:
            raise ValueError(f"sinkhorn start must be one of {SINKHORN_STARTS}, got {start!r}")
        if not eps >= 0:
            raise ValueError(f"sinkhorn eps must be >= 0, got {eps!r}")
        self.iters, self.eps, self.start, self.transpose = iters, float(eps), start, bool(transpose)

    def logit_count(self) -> int:
        return self.n * self.n

    def h_res(self, logits):
        L = logits.unflatten(-1, (self.n, self.n))
        if self.transpose:
            L = L.transpose(-1, -2)
        return sinkhorn(L, iters=self.iters, eps=self.eps, start=self.start)

    def init_logits(self, bias_init, gap):
        if bias_init != "identity":
            return super().init_logits(bias_init, gap)
        eye = torch.eye(self.n, device="cpu")  # symmetric: the same in either orientation
        return (gap * (2.0 * eye - 1.0) / 2.0).flatten()

    def kernel_spec(self):
        if not self._owns_h_res(SinkhornMap):
            return None
        return ("sinkhorn", self.iters, self.start == "softmax", self.transpose)

    def __repr__(self):
        return (f"SinkhornMap(n={self.n}, iters={self.iters}, eps={self.eps:g}, start={self.start!r}, "
                f"transpose={self.transpose})")


class IdentityMap(HResMap):
    """H_res = I (k = 0): the streams are only read and written through H_pre and H_post."""

    name = "identity"

    def logit_count(self):
        return 0

    def h_res(self, logits):
        eye = torch.eye(self.n, dtype=logits.dtype, device=logits.device)
        return eye.expand(*logits.shape[:-1], self.n, self.n)

    def kernel_spec(self):
        return ("identity",) if self._owns_h_res(IdentityMap) else None


def _one_hot_logits(k: int, hot: int, gap: float) -> torch.Tensor:
    """``[k]``: +g/2 at ``hot``, -g/2 elsewhere (the identity-like start of a softmax over k choices)."""
    out = torch.full((k,), -gap / 2.0, device="cpu")
    out[hot] = gap / 2.0
    return out


@functools.cache
def permutation_matrices(n: int) -> torch.Tensor:
    """The n! permutation matrices ``[n!, n, n]`` (float64, CPU), in lexicographic order: the identity first.
    Matrix p has ``P[p, i, perm_p[i]] = 1``."""
    perms = list(itertools.permutations(range(n)))
    with torch.inference_mode(False):  # cached: a normal CPU tensor, whatever mode or default device asks first
        out = torch.zeros(len(perms), n, n, dtype=torch.float64, device="cpu")
        for p, perm in enumerate(perms):
            out[p, torch.arange(n, device="cpu"), torch.tensor(perm, device="cpu")] = 1.0
    return out


@functools.cache
def _permutation_table(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n!, n*n]`` on ``device``: copied there once, not in every forward (a host-to-device copy each time); a
    normal tensor even when first asked for under ``inference_mode`` (autograd saves it later)."""
    with torch.inference_mode(False):
        return permutation_matrices(n).to(device=device, dtype=dtype).flatten(1)


class PermutationMixtureMap(HResMap):
    """mHC-lite: softmax weights over the n! permutation matrices, ``H_res = sum_p w_p P_p`` (k = n!): exactly
    doubly stochastic, no iterations. n <= 5 (k = 120 at n = 5)."""

    name = "permutation-mixture"

    def __init__(self, n: int):
        super().__init__(n)
        if n > PERMUTATION_MAX_STREAMS:
            raise ValueError(f"h_res='permutation-mixture' takes n <= {PERMUTATION_MAX_STREAMS} streams (n! logits: "
                             f"{math.factorial(n)} at n = {n}); use 'kronecker' (permutation-mixture factors) or "
                             "'circulant' for larger n")

    def logit_count(self):
        return math.factorial(self.n)

    def h_res(self, logits):
        w = torch.softmax(logits, dim=-1)
        return (w @ _permutation_table(self.n, logits.device, logits.dtype)).unflatten(-1, (self.n, self.n))

    def kernel_spec(self):  # on chip: the softmax and the n! permutations in the epilogue kernels
        return ("mixture", (("permutation", self.n),)) if self._owns_h_res(PermutationMixtureMap) else None

    def init_logits(self, bias_init, gap):
        if bias_init != "identity":
            return super().init_logits(bias_init, gap)
        return _one_hot_logits(self.logit_count(), 0, gap)  # permutation 0 is the identity


class CirculantMap(HResMap):
    """Softmax weights w over the n cyclic shifts, ``H_res[i, j] = w[(j - i) mod n]`` (k = n): a circulant,
    exactly doubly stochastic matrix (each row and column holds every weight once). Logit 0 is the identity."""

    name = "circulant"

    def logit_count(self):               # k: phi and bias get 2n + k columns
        return self.n

    def h_res(self, logits):             # [..., k] (fp32, or fp64 in references) -> [..., n, n], differentiable
        w = torch.softmax(logits, dim=-1)
        i = torch.arange(self.n, device=logits.device)
        return w[..., (i[None, :] - i[:, None]) % self.n]

    def kernel_spec(self):               # on chip: a softmax over the n cyclic shifts (None: run h_res on the logits)
        return ("mixture", (("shift", self.n),)) if self._owns_h_res(CirculantMap) else None

    def init_logits(self, bias_init, gap):  # the res bias at init [k]; default zeros (uniform start)
        return _one_hot_logits(self.n, 0, gap) if bias_init == "identity" else super().init_logits(bias_init, gap)


def default_factors(n: int) -> tuple[int, ...]:
    """n as a product of factors of at most 4 where it can be (largest first: 16 -> (4, 4), 8 -> (4, 2),
    6 -> (3, 2), 4 -> (2, 2): one factor of 4 would make the map the permutation mixture itself); a prime n stays
    whole (5 -> (5,): that is the permutation mixture), and so does a prime factor above 4."""
    out, rest = [], n
    for f in (4, 3, 2):
        while rest % f == 0 and rest > 1:
            out.append(f)
            rest //= f
    if rest > 1:
        out.append(rest)
    if out == [4]:
        out = [2, 2]
    return tuple(sorted(out, reverse=True)) or (1,)


class KroneckerMap(HResMap):
    """``H_res = H_1 (x) H_2 (x) ...`` of small maps (n = n_1 n_2 ...), each on its own slice of the logits
    (k = the sum of theirs): doubly stochastic whenever the factors are. ``factors``: the n_f (default
    :func:`default_factors`); ``factor``: the factors' map, ``"permutation-mixture"`` (default, n_f <= 5) or
    ``"sinkhorn"`` (``iters``, ``eps`` as there)."""

    name = "kronecker"

    def __init__(self, n: int, factors: tuple[int, ...] | None = None, factor: str = "permutation-mixture",
                 iters: int = 20, eps: float = 1e-6):
        super().__init__(n)
        factors = tuple(factors) if factors is not None else default_factors(n)
        if any(not isinstance(f, int) or f < 1 for f in factors) or math.prod(factors) != n:
            raise ValueError(f"kronecker factors must be integers >= 1 whose product is n = {n}, got {factors}")
        if factor == "permutation-mixture":
            if max(factors) > PERMUTATION_MAX_STREAMS:
                raise ValueError(f"kronecker: factors {factors} of n = {n} include one above "
                                 f"{PERMUTATION_MAX_STREAMS}, too large for a permutation mixture; pass "
                                 "factor='sinkhorn' or other factors")
            self.maps = [PermutationMixtureMap(f) for f in factors]
        elif factor == "sinkhorn":
            self.maps = [SinkhornMap(f, iters=iters, eps=eps) for f in factors]
        else:
            raise ValueError(f"kronecker factor must be 'permutation-mixture' or 'sinkhorn', got {factor!r}")
        self.factors, self.factor = factors, factor

    def logit_count(self):
        return sum(m.logit_count() for m in self.maps)

    def h_res(self, logits):
        out, start = None, 0
        for m in self.maps:
            k = m.logit_count()
            h = m(logits[..., start:start + k])
            start += k
            if out is None:
                out = h
            else:  # [.., a, a] (x) [.., b, b] -> [.., a*b, a*b]: entry (i1 b + i2, j1 b + j2) = A[i1, j1] B[i2, j2]
                a, b = out.shape[-1], h.shape[-1]
                out = (out[..., :, None, :, None] * h[..., None, :, None, :]).reshape(*h.shape[:-2], a * b, a * b)
        return out

    def init_logits(self, bias_init, gap):
        return torch.cat([m.init_logits(bias_init, gap) for m in self.maps])

    def kernel_spec(self):
        """Permutation-mixture factors: on chip (each factor's softmax and permutations, their product in the
        Kronecker layout). Sinkhorn factors run through the logits path: the kernels' Sinkhorn normalises whole
        n x n blocks, not a factor's sub-blocks."""
        if self.factor != "permutation-mixture" or not self._owns_h_res(KroneckerMap):
            return None
        return ("mixture", tuple(("permutation", f) for f in self.factors))

    def __repr__(self):
        return f"KroneckerMap(n={self.n}, factors={self.factors}, factor={self.factor!r})"


_BUILT_IN = {"sinkhorn": SinkhornMap, "identity": IdentityMap, "permutation-mixture": PermutationMixtureMap,
             "circulant": CirculantMap, "kronecker": KroneckerMap}
assert tuple(_BUILT_IN) == H_RES_MAPS


def make_h_res(spec, n: int, **options) -> HResMap:
    """A map from a name in ``H_RES_MAPS`` (``options`` go to its constructor) or an :class:`HResMap` instance
    (checked against n)."""
    if isinstance(spec, HResMap):
        if spec.n != n:
            raise ValueError(f"h_res map {spec!r} is built for n = {spec.n}, the connection has n = {n}")
        return spec
    if spec not in _BUILT_IN:
        raise ValueError(f"h_res must be one of {', '.join(H_RES_MAPS)} or an HResMap instance, got {spec!r}")
    return _BUILT_IN[spec](n, **options)


__all__ = ["CirculantMap", "HResMap", "IdentityMap", "KroneckerMap", "PermutationMixtureMap",
           "SinkhornMap", "default_factors", "make_h_res", "permutation_matrices"]
