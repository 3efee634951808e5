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

Read-ahead (across sublayers): a post given the next sublayer's (phi, eps) also computes that sublayer's
coefficient GEMM and inverse RMS on the state it writes, in the same kernel (each chunk read back from L2
right after it is stored, not from DRAM), and returns them as a :class:`ReadAhead`; the next
:class:`FusedSublayerPre` takes them instead of reading the state again for its GEMM, when they were computed
from that very state and phi (same storage, shape, strides and version). They are plain values (no gradient
path): the next sublayer's backward treats raw as ``x @ phi`` as before.

Chained backward (under ``torch_mhc.nn.chained_backward()``, when the read took the read-ahead of the post
that wrote its state): the read's backward (sublayer m) computes dphi, dbias, dalpha and its coefficient
gradients but not the state's gradient dx_m; it leaves the terms of dx_m (post's, pre's H_pre dy, the GEMM's
draw @ phi^T, the RMS term) in a :class:`Handoff` and returns a stride-0 zero for the state. The post that
wrote the state (sublayer l) runs next and sums those terms into its dout inside its own kernel
(``_post_bwd_chain``), recomputing the state from its inputs: dx_m is never written to memory nor read back,
and m's GEMM backward reads x only for dphi. The state's gradient is then not materialised anywhere, hence
the explicit scope; tensor hooks and ``retain_grad`` on the state the model saw, a second read of it, or a
backward that will not run the writing post make the read fall back (docs/design.md lists what it cannot
see). n <= 4 only (n = 8's chained kernel does not fit the register budget).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from torch_mhc.ops import unfused_reason
from torch_mhc.ops.coefficients import (
    coefficients_backward,
    coefficients_forward,
    epilogue_backward,
    gemm_backward,
    make_epilogue,
)
from torch_mhc.ops.streams import (
    CHAIN_MAX_STREAMS,
    READ_AHEAD_STREAMS,
    FusedStreamPost,
    post_backward_chain,
    post_forward,
    pre_backward,
    pre_forward,
)


def _owned_buffer(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The link gradient as a buffer the GEMM backward may overwrite: the tensor post's backward (or
    autograd's sum of several) returned; a copy when it is not a plain contiguous buffer of x's layout."""
    if g is None:
        return None
    if g.dtype != like.dtype or g.shape != like.shape or not g.is_contiguous() or g.requires_grad:
        return g.to(like.dtype).contiguous().clone()
    return g


def _identity(t: torch.Tensor) -> tuple:
    """What makes two tensors the same values for the read-ahead: storage, layout, dtype and version."""
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t._version


class Handoff:
    """From the read of sublayer m to the post of sublayer l that wrote m's state (chained backward): m's
    terms of the state's gradient, kept per backward (graph task), so that backward passes over one graph
    that run at the same time (threads, ``retain_graph``) each find their own. Terms, per task: (g [T, n, C]
    (m's post term, or None), dy [T, C], H_pre [T, n], draw [T, M], coef [T], phi), all without autograd
    history (no reference back to m's node), and the stride-0 zero m returned as the state's gradient."""

    def __init__(self):
        self.visible: weakref.ref | None = None  # the state tensor the model code got
        self.hooks: dict | None = None  # its ``_backward_hooks``, which outlive it (they sit on its grad_fn)
        self.claimed = False  # one read per handoff: a second read of the same state keeps its own dx
        self.pending: dict[int, tuple] = {}  # graph task id -> (terms, zero)

    def watch(self, state: torch.Tensor) -> None:
        """Remember the state the model code gets, and its hook dict: created here as ``register_hook`` would,
        so hooks registered later land in this dict even if the tensor is gone by the backward."""
        self.visible = weakref.ref(state)
        if state._backward_hooks is None:
            state._backward_hooks = OrderedDict()
            state.grad_fn._register_hook_dict(state)
        self.hooks = state._backward_hooks

    def claim(self, x: torch.Tensor) -> bool:
        """Whether the read of ``x`` takes this handoff: x must be the very tensor the post returned, and no other
        read may have taken it."""
        if self.claimed or self.visible is None or self.visible() is not x:
            return False
        self.claimed = True
        return True

    def observed(self) -> bool:
        """Whether someone asked to see the state's gradient (a tensor hook, ``retain_grad``): then no deferral."""
        v = None if self.visible is None else self.visible()
        return bool(self.hooks) or (v is not None and v.retains_grad)

    def leave(self, terms: tuple, like: torch.Tensor) -> torch.Tensor:
        """Keep m's terms for this backward; -> the stride-0 zero to return as the state's gradient."""
        zero = torch.zeros(1, dtype=like.dtype, device=like.device).expand(like.shape)
        terms = tuple(None if t is None else t.detach() for t in terms)
        self.pending[torch._C._current_graph_task_id()] = (terms, zero)
        return zero

    def take(self, dout: torch.Tensor | None):
        """In l's post backward: -> (m's terms of this backward or None, the rest of dout or None)."""
        entry = self.pending.pop(torch._C._current_graph_task_id(), None)
        if entry is None:
            return None, dout
        terms, zero = entry
        if dout is not None and dout.stride() == (0,) * dout.dim() and dout.data_ptr() == zero.data_ptr():
            dout = None  # only m's zero: nothing else used the state
        return terms, dout


@dataclass
class ReadAhead:
    """The next sublayer's GEMM on a state, computed by the post that wrote it: raw = state @ phi [T, M] and
    inv_rms [T] (fp32). ``state`` keeps the state's storage alive, so its identity cannot be reused.
    ``handoff``: set under chained backward (the first read of exactly the tensor the model got from the post
    claims it)."""

    state: torch.Tensor
    state_id: tuple
    phi_id: tuple
    eps: float
    raw: torch.Tensor
    inv: torch.Tensor
    handoff: Handoff | None = None

    def matches(self, x3: torch.Tensor, phi: torch.Tensor, eps: float) -> bool:
        return _identity(x3) == self.state_id and _identity(phi) == self.phi_id and eps == self.eps


class FusedSublayerPre(torch.autograd.Function):
    """x [T, n, C], phi, bias, alpha -> (y [T, C], H_pre [T, n], H_post [T, n], res, link [T, n, C]); res is
    H_res [T, n, n] (on chip) or the res logits [T, k] of a map that runs outside (``epi.on_chip``)."""

    @staticmethod
    def forward(ctx, x, phi, bias, alpha, epi, eps: float, raw_inv=None, chain=None, batch_invariant: bool = False):
        T, n, C = x.shape
        x2d = x.view(T, n * C)
        pre, post, res, saved = coefficients_forward(x2d, phi, bias, alpha, epi, eps, raw_inv, batch_invariant)
        y = pre_forward(x, pre)
        link = x.new_empty(1).expand(T, n, C)
        ctx.save_for_backward(x, phi, pre, *saved)
        ctx.config = (epi, eps, alpha.dtype, bias.dtype)
        ctx.chain = chain  # (Handoff, the writing post's autograd node) or None
        ctx.set_materialize_grads(False)
        return y, pre, post, res, link

    @staticmethod
    def backward(ctx, dy, dpre_out, dpost, dres, dlink):
        x, phi, pre, *saved = ctx.saved_tensors
        epi, eps, alpha_dtype, bias_dtype = ctx.config
        T, n, C = x.shape
        dpre, pre_term = dpre_out, None
        if dy is not None:
            dy = dy.contiguous()
            _, dpre = pre_backward(x, pre, dy, write_dx=False)
            dpre = dpre if dpre_out is None else dpre + dpre_out
            pre_term = (pre, dy)
        dx = _owned_buffer(dlink, x)
        x2d = x.view(T, n * C)
        handoff, node = ctx.chain or (None, None)
        # defer only if the writing post runs in this backward (not, e.g., in an autograd.grad of our phi alone, or
        # of the state alone: its gradient is then captured before the post, and must be the whole one)
        if (handoff is not None and ctx.needs_input_grad[0] and not handoff.observed()
                and torch._C._will_engine_execute_node(node)):
            draw, coef, dbias, dalpha = epilogue_backward(saved, epi, eps, n * C, dpre, dpost, dres)
            _, dphi = gemm_backward(x2d, phi, draw, coef, n, write_dx=False)
            dy = dy if dy is not None else x.new_zeros(T, C)
            dx = handoff.leave((dx, dy, pre, draw, coef, phi), x)
        else:
            dx, dphi, dbias, dalpha = coefficients_backward(
                x2d, phi, saved, epi, eps, dpre, dpost, dres,
                dx=None if dx is None else dx.view(T, n * C), pre_term=pre_term)
        return (dx.view(T, n, C), dphi.to(phi.dtype), dbias.to(bias_dtype), dalpha.to(alpha_dtype),
                None, None, None, None, None)


class FusedSublayerPost(torch.autograd.Function):
    """(x [T, n, C], link [T, n, C], H_post [T, n], H_res [T, n, n], f [T, C]) -> H_res x + H_post^T f [T, n, C].
    x's gradient leaves through ``link`` (to :class:`FusedSublayerPre`), none through ``x``. With
    ``read_ahead`` = (phi, eps) of the next sublayer, also (raw [T, M], inv_rms [T]): no gradient."""

    @staticmethod
    def forward(ctx, x, link, h_post, h_res, f, read_ahead=None, handoff=None, batch_invariant: bool = False):
        ctx.save_for_backward(x, h_post, h_res, f)
        ctx.handoff = handoff
        ctx.batch_invariant = batch_invariant
        ctx.set_materialize_grads(False)
        result = post_forward(x, h_post, h_res, f, read_ahead, batch_invariant)
        if read_ahead is None:
            return result
        out, (raw, inv) = result
        ctx.mark_non_differentiable(raw, inv)
        return out, raw, inv

    @staticmethod
    def backward(ctx, dout, *_):
        terms = None
        if ctx.handoff is not None:
            terms, dout = ctx.handoff.take(dout)
        if terms is None:
            if dout is None:
                return None, None, None, None, None, None, None, None
            dx, dhp, dhr, df = FusedStreamPost.backward(ctx, dout)  # the plain post's backward, dx to the link
            return None, dx, dhp, dhr, df, None, None, None
        x, h_post, h_res, f = ctx.saved_tensors  # chained: the next sublayer's terms of dout summed in here
        g, *nxt = terms
        if dout is not None:
            g = dout if g is None else g + dout
        if g is None:
            g = torch.zeros_like(x)
        dx, dhp, dhr, df = post_backward_chain(x, h_post, h_res, f, g.contiguous(), nxt, ctx.batch_invariant)
        return None, dx, dhp.to(h_post.dtype), dhr.to(h_res.dtype), df, None, None, None


def _writer_node(state: torch.Tensor):
    """The autograd node of the post that wrote ``state`` (the tensor its ``fused_sublayer_post`` returned, a view
    of the Function's output): the node whose execution the read checks, not the view's own node, which a
    backward that only captures the state's gradient marks as to be executed without running it."""
    node = state.grad_fn
    return node.next_functions[0][0] if node.next_functions and node.next_functions[0][0] is not None else node


def fused_sublayer_pre(x, phi, bias, alpha, *, eps: float, variant: str, spec: tuple, read_ahead=None, h_res=None,
                       batch_invariant: bool = False):
    """x ``[..., n, C]`` -> (y ``[..., C]``, (H_pre, H_post, H_res) fp32 ``[..., n]``/``[..., n, n]``, link).

    ``link`` = (x as ``[T, n, C]`` contiguous, the link tensor): pass it to :func:`fused_sublayer_post`.
    ``read_ahead``: a :class:`ReadAhead` from the post that wrote x; used only if it matches x and phi.
    ``spec``: what the epilogue computes (``ops.kernel_spec``); for ("logits", k) the map ``h_res`` runs on the
    logits between the kernels (autograd takes its gradient back into the pre half's backward).
    ``batch_invariant``: no token-count-dependent split of the GEMM (``coefficients_forward``)."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x3 = x.reshape(-1, n, C).contiguous()
    raw_inv = chain = None
    if read_ahead is not None and read_ahead.matches(x3, phi, eps):
        raw_inv = (read_ahead.raw, read_ahead.inv)
        h = read_ahead.handoff
        if h is not None and torch.is_grad_enabled() and h.claim(x):
            chain = (h, _writer_node(x))
    epi = make_epilogue(n, spec, variant == "deepseek-v4")
    y, pre, post, res, link = FusedSublayerPre.apply(x3, phi, bias, alpha, epi, eps, raw_inv, chain, batch_invariant)
    res = res.view(*lead, n, n) if epi.on_chip else h_res(res.view(*lead, epi.k))
    return y.view(*lead, C), (pre.view(*lead, n), post.view(*lead, n), res), (x3, link)


def fused_sublayer_post(link, h_post, h_res, f_out, read_ahead=None, chain_backward: bool = False,
                        batch_invariant: bool = False):
    """(link from :func:`fused_sublayer_pre`, H_post ``[..., n]``, H_res ``[..., n, n]``, f ``[..., C]``) ->
    new state ``[..., n, C]``; with ``read_ahead`` = (phi, eps) of the next sublayer, (new state, ReadAhead), or
    (new state, None) where the read-ahead has no checked tiles (n not in ``READ_AHEAD_STREAMS``, a GEMM wider than
    ``MAX_GEMM_WIDTH``). ``chain_backward``: the ReadAhead carries a :class:`Handoff` (see the module docstring).
    ``batch_invariant``: the read-ahead GEMM's tiles do not depend on the token count (``streams.post_forward``)."""
    x3, link_t = link
    _, n, C = x3.shape
    lead = f_out.shape[:-1]
    args = (x3, link_t, h_post.float().reshape(-1, n).contiguous(), h_res.float().reshape(-1, n, n).contiguous(),
            f_out.reshape(-1, C).contiguous())
    if read_ahead is None:
        return FusedSublayerPost.apply(*args).view(*lead, n, C)
    phi, eps = read_ahead
    if n not in READ_AHEAD_STREAMS or unfused_reason(n, phi.shape[1]) is not None:  # no checked tiles: reader runs GEMM
        return FusedSublayerPost.apply(*args).view(*lead, n, C), None
    handoff = Handoff() if chain_backward and n <= CHAIN_MAX_STREAMS and torch.is_grad_enabled() else None
    out, raw, inv = FusedSublayerPost.apply(*args, (phi, eps), handoff, batch_invariant)
    state = out.view(*lead, n, C)
    if handoff is not None and state.grad_fn is None:  # nothing requires grad (e.g. a frozen trunk): no backward
        handoff = None
    if handoff is not None:
        handoff.watch(state)
    return state, ReadAhead(out, _identity(out), _identity(phi), eps, raw, inv, handoff)
