"""DeepSeek-style mixture-of-experts FFN: shared experts plus fine-grained routed experts, top-k
routing on sigmoid affinities, and auxiliary-loss-free load balancing (a per-expert bias that only
affects which experts are chosen, nudged after each step towards equal load).

The routed experts run grouped, with no host synchronisation: the ``tokens x top_k`` assignments are
sorted by expert into one buffer (fixed shape ``[tokens * top_k, dim]``) with per-expert counts kept on
the device, and each projection (w1, w3, w2) is one grouped GEMM over all experts
(:func:`grouped_swiglu`): ``torch._grouped_mm`` where it runs (CUDA; the CPU in float32 and bfloat16),
or a padded batched matmul (:func:`padded_layout`, ``torch.bmm`` over expert-aligned blocks of rows)
elsewhere (float64, widths that break ``_grouped_mm``'s 16-byte alignment, other devices). No shape depends on
the routing, so nothing is read back to the host in forward or backward, for any number of experts.
:meth:`MoE.forward_reference` keeps the plain loop over experts (one ``nonzero`` per expert) as the
reference the grouped path is tested and benchmarked against.

:func:`grouped_swiglu` takes rows already grouped by expert and a device tensor of counts, which is
what an expert-parallel dispatch (all-to-all of per-expert token buckets) hands its local experts: with
``MoE.experts_fn`` set (``torch_mhc.distributed.expert_parallel``), the expert-sorted rows and counts go to it
in place of :func:`grouped_swiglu`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("auto", "grouped_mm", "padded", "reference")


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def padded_layout(counts: torch.Tensor, n_rows: int, capacity: int, block: int):
    """Where each row of an expert-sorted buffer goes in a padded one, with shapes fixed by the arguments.

    ``counts [E]`` (device) rows per expert, ``n_rows = counts.sum()`` (known without reading ``counts``:
    ``tokens * top_k``), ``capacity`` an upper bound of any one count. Each expert's rows are padded to
    whole blocks of ``block`` rows; the buffer has ``n_blocks = ceil(n_rows / block) + E`` blocks, enough
    for any counts. With ``block >= capacity`` the blocks are ``[E, capacity]`` buckets, block e holding
    expert e. Returns ``dest [n_rows]`` (row of the padded buffer each sorted row goes to),
    ``block_expert [n_blocks]`` (the expert of each block; trailing blocks hold zero rows) or None for
    buckets, and ``(n_blocks, block)``.
    """
    E = counts.numel()
    dev = counts.device
    ends = counts.cumsum(0)
    rows = torch.arange(n_rows, device=dev)
    expert = torch.searchsorted(ends, rows, right=True)  # expert of each sorted row
    within = rows - (ends - counts)[expert]
    if block >= capacity:
        return expert * capacity + within, None, (E, capacity)
    padded = (counts + block - 1) // block * block
    pends = padded.cumsum(0)
    n_blocks = -(-n_rows // block) + E
    starts = torch.arange(n_blocks, device=dev) * block
    block_expert = torch.searchsorted(pends, starts, right=True).clamp_(max=E - 1)
    return (pends - padded)[expert] + within, block_expert, (n_blocks, block)


class _BlockMM(torch.autograd.Function):
    """``x [nb, B, K] @ w[block_expert] [nb, K, N]``; saves ``w`` (not its per-block copy) for backward."""

    @staticmethod
    def forward(ctx, x, w, block_expert):
        ctx.save_for_backward(x, w, block_expert)
        return torch.bmm(x, w.index_select(0, block_expert))

    @staticmethod
    def backward(ctx, dy):
        x, w, block_expert = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(dy, w.index_select(0, block_expert).transpose(1, 2))
        if ctx.needs_input_grad[1]:  # per-block partial products summed per expert, in fp32 at least
            acc = torch.promote_types(w.dtype, torch.float32)
            partial = torch.bmm(x.transpose(1, 2), dy).to(acc)
            dw = torch.zeros(w.shape, dtype=acc, device=w.device).index_add_(0, block_expert, partial).to(w.dtype)
        return dx, dw, None


def _padded_swiglu(xs, counts, w1, w3, w2, capacity: int, block: int):
    n_rows, dim = xs.shape
    dest, block_expert, (nb, b) = padded_layout(counts, n_rows, capacity, block)
    xb = xs.new_zeros(nb * b, dim).index_copy(0, dest, xs).view(nb, b, dim)
    if block_expert is None:
        mm = torch.bmm
    else:
        def mm(a, w):
            return _BlockMM.apply(a, w, block_expert)
    h1, h3 = mm(xb, torch.cat([w1, w3], dim=2)).chunk(2, dim=2)  # w1 and w3 in one GEMM
    return mm(F.silu(h1) * h3, w2).view(nb * b, dim).index_select(0, dest)


def _grouped_mm_swiglu(xs, counts, w1, w3, w2):
    offs = counts.cumsum(0).to(torch.int32)
    h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
    return torch._grouped_mm(h, w2, offs=offs)


_GROUPED_MM_OK: dict = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward for ``dtype`` on ``device`` (eagerly), probed
    once per device and dtype on a tiny aligned problem. CUDA and CPU only (PyTorch 2.13 runs it on the CPU
    in float32 and bfloat16, not float64; there it beat the padded ``bmm`` and the loop, see
    bench/results/moe_cpu.md). Under ``torch.compile``: the answer of an eager call made earlier in the
    process (an eager forward, or this function called before compiling), else False."""
    if device.type not in ("cuda", "cpu") or not hasattr(torch, "_grouped_mm") or \
            dtype not in (torch.bfloat16, torch.float32):
        return False
    key = (str(device), dtype)
    if torch.compiler.is_compiling():  # no probing in a traced graph: an earlier eager answer, else no
        return _GROUPED_MM_OK.get(key, False)
    if key not in _GROUPED_MM_OK:
        # No random numbers: the probe leaves the generators alone. Gradients on also under no_grad; its own
        # saved-tensor hooks, so that outer ones (activation checkpointing, memory counting) never see it.
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            try:
                x = torch.linspace(-1, 1, 32 * 16, device=device, dtype=dtype).view(32, 16).requires_grad_()
                w = torch.linspace(-1, 1, 2 * 16 * 16, device=device, dtype=dtype).view(2, 16, 16).requires_grad_()
                offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
                y = torch._grouped_mm(x, w, offs=offs)
                y.backward(torch.ones_like(y))
                ok = torch.allclose(y[:16], x[:16] @ w[0], rtol=1e-2, atol=1e-2)
                _GROUPED_MM_OK[key] = bool(ok and torch.allclose(y[16:], x[16:] @ w[1], rtol=1e-2, atol=1e-2))
            except (RuntimeError, NotImplementedError):
                _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


def default_block(n_rows: int, n_experts: int) -> int:
    """Rows per block of the padded path: the power of two at most a quarter of the mean rows per expert,
    between 16 and 128. The padded buffer always holds ``n_rows + E * block`` rows (its shape may not
    depend on the counts), so this bounds the extra GEMM rows to about a quarter; smaller blocks make
    ``bmm`` slow on the CPU (measured: blocks of 8 take 3-4x the time of 64)."""
    target = max(1, n_rows // (4 * n_experts))
    return max(16, min(128, 1 << (target.bit_length() - 1)))


def grouped_swiglu(xs: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                   capacity: int | None = None, impl: str = "auto", block: int | None = None) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert: ``xs [N, dim]`` holds expert 0's ``counts[0]`` rows,
    then expert 1's, ...; ``counts [E]`` stays on the device; ``w1, w3 [E, dim, H]``, ``w2 [E, H, dim]``.
    Returns ``[N, dim]`` in the same order. One grouped GEMM per projection, no host sync: ``impl``
    ``"grouped_mm"`` (``torch._grouped_mm``), ``"padded"`` (:func:`padded_layout` and ``bmm``; ``capacity``
    bounds one expert's rows, N if not given) or ``"auto"`` (the first where available)."""
    n_rows = xs.shape[0]
    if impl == "auto":
        ok = grouped_mm_available(xs.device, xs.dtype) and all(s * xs.element_size() % 16 == 0 for s in w2.shape[1:])
        # under torch.compile: _grouped_mm's fake-tensor rule takes bfloat16 only (PyTorch 2.13)
        ok = ok and (xs.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
        ok = ok and n_rows > 0  # _grouped_mm's backward fails on no rows (CPU, 2.13): an EP rank may receive none
        impl = "grouped_mm" if ok else "padded"
    if impl == "grouped_mm":
        return _grouped_mm_swiglu(xs, counts, w1, w3, w2)
    if impl != "padded":
        raise ValueError(f"grouped_swiglu: impl must be auto, grouped_mm or padded (got {impl!r})")
    capacity = n_rows if capacity is None else min(capacity, n_rows)
    return _padded_swiglu(xs, counts, w1, w3, w2, max(1, capacity), block or default_block(n_rows, counts.numel()))


class MoE(nn.Module):
    """Routed + shared SwiGLU experts. ``[..., dim] -> [..., dim]``.

    Router: ``s = sigmoid(x W_r)`` ``[tokens, E]``; experts chosen by top-k of ``s + bias``; gates are
    the chosen ``s`` normalised to sum 1. ``bias`` is a buffer, updated by :meth:`update_bias` from the
    expert loads counted in the forward passes since the last update.

    ``impl`` (an attribute, not saved): ``"auto"`` (grouped: ``torch._grouped_mm`` where it runs, else the
    padded batched matmul), ``"grouped_mm"``, ``"padded"``, or ``"reference"`` (the loop over
    experts, :meth:`forward_reference`). ``block``: rows per block of the padded path (None: by shape).
    The grouped forward and backward make no host sync (no ``.item()``, ``nonzero``, boolean indexing or
    other data-dependent shape), for any number of experts: the routing only changes values (sort
    order, counts on the device), never a shape, so no layer needs even one. The only read-back is
    ``grouped_mm_available``'s probe, once per process, device and dtype (tests/test_moe.py counts them).
    """

    def __init__(self, dim: int, n_routed: int, n_shared: int, top_k: int, expert_hidden: int, bias_rate: float = 1e-3):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"MoE needs 1 <= top_k <= n_routed_experts, got top_k={top_k}, n_routed={n_routed}")
        self.n_routed, self.top_k, self.bias_rate = n_routed, top_k, bias_rate
        self.impl, self.block = "auto", None
        # None: every expert here (grouped_swiglu). Expert parallel sets a callable with grouped_swiglu's
        # arguments that sends the rows to the ranks holding their experts and back (distributed.expert_parallel)
        self.experts_fn = None
        self.router = nn.Linear(dim, n_routed, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_routed, dim, expert_hidden))
        self.w3 = nn.Parameter(torch.empty(n_routed, dim, expert_hidden))
        self.w2 = nn.Parameter(torch.empty(n_routed, expert_hidden, dim))
        self.shared = SwiGLU(dim, n_shared * expert_hidden) if n_shared > 0 else None
        self.register_buffer("bias", torch.zeros(n_routed), persistent=True)
        self.register_buffer("load", torch.zeros(n_routed), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[tokens, dim]`` -> (expert ids ``[tokens, k]``, gates ``[tokens, k]`` fp32)."""
        scores = torch.sigmoid(self.router(x).float())
        idx = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        gates = scores.gather(-1, idx)
        return idx, gates / gates.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return self.forward_reference(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        tokens, k = x.shape[0], self.top_k
        idx, gates = self.route(x)
        flat = idx.flatten()  # assignment a = token * k + slot
        counts = torch.zeros(self.n_routed, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # (bincount would read its maximum back on CUDA)
        if self.training:
            self.load += counts.to(self.load.dtype)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within each
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        w1, w3, w2 = self.w1, self.w3, self.w2
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:  # the expert GEMMs in the autocast dtype, as autocast runs the reference's matmuls
            dtype = torch.get_autocast_dtype(x.device.type)
            xs, w1, w3, w2 = x.to(dtype), w1.to(dtype), w3.to(dtype), w2.to(dtype)
        else:
            xs = x.to(w1.dtype)
        experts = self.experts_fn or grouped_swiglu
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            ys = experts(xs.index_select(0, order // k), counts, w1, w3, w2, capacity=tokens, impl=self.impl,
                         block=self.block)
        y = (ys.index_select(0, inverse).view(tokens, k, -1) * gates.unsqueeze(-1)).sum(1)
        out = y.to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The loop over experts (the implementation before the grouped path): one ``nonzero`` per expert
        and a ``bincount`` per call read data-dependent shapes. Kept for tests and ``bench/bench_moe.py``."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, gates = self.route(x)
        if self.training:
            self.load += torch.bincount(idx.flatten(), minlength=self.n_routed).to(self.load.dtype)
        out = torch.zeros_like(x)
        for e in range(self.n_routed):
            token, slot = torch.where(idx == e)
            if token.numel() == 0:
                continue
            h = x[token]
            h = (F.silu(h @ self.w1[e]) * (h @ self.w3[e])) @ self.w2[e]
            out.index_add_(0, token, (h * gates[token, slot, None]).to(out.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def reset_balance(self) -> None:
        """Clear the balancing state (routing bias and counted loads), as at construction."""
        self.bias.zero_()
        self.load.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded.

        On the device, no host sync: with no load counted (all zero) ``sign(mean - load)`` is 0 and the
        bias stays as it is. Under data parallelism the caller sums ``load`` over the ranks that routed other
        tokens through this layer first (``torch_mhc.distributed.parallelize.sync_moe_load``), so every rank
        makes the one-process update."""
        self.bias += self.bias_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()
