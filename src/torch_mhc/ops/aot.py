"""Compile every kernel configuration the fused ops launch, ahead of time, for GPUs this machine lacks.

The fused ops run on CPU tensors with Triton's launch intercepted: ``JITFunction.run`` is replaced by
a recorder that binds the arguments exactly as the JIT does (the same binder, so the same argument
types, constexprs and divisibility-by-16 specialisation) and returns without running anything. The
recorded configurations are deduplicated and compiled with ``triton.compile`` for sm_90 and sm_80;
``cuobjdump --dump-resource-usage`` (shipped with the triton wheel) gives registers and spills.

    python -m torch_mhc.ops.aot            # table of kernels x targets: registers, spills, errors
    python -m torch_mhc.ops.aot --check    # exit 1 on a compile error, a spill or a register budget miss

Needs the kernels compiled by ``triton.jit`` (not the interpreter): run with ``TRITON_INTERPRET`` unset.
CPU tensors suffice: the outputs of intercepted launches stay uninitialised, and only their shapes,
dtypes and the launch code's block choices matter here.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from torch_mhc.ops.blocks import padded_entry

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
# Register budget (per thread) of the bandwidth-bound stream kernels, per padded n (n = 3 takes 4's, 5-7 take 8's:
# ops.blocks.padded): above it an H100 SM holds too few warps to keep enough loads in flight (128: 4 programs of 4
# warps per SM). n = 8's post backward holds [BT, 8, 8] dH_res sums and 8 streams of x and dout per chunk: 192.
# Every kernel, GEMMs and epilogues included, must compile without spills: no local-memory load or store inside a
# loop, and at most SAVED_STACK_BYTES of stack (a register or two ptxas saves around a loop, once per program; see
# local_accesses_in_loops).
STREAM_KERNELS = ("_pre_fwd", "_pre_bwd", "_post_fwd", "_post_bwd", "_post_bwd_chain")
STREAM_REG_BUDGET = {1: 128, 2: 128, 4: 128, 8: 192, 16: 192}
# Every other kernel's budget (the gate fails a kernel without one). The forward GEMM runs 63-180 registers; a split-K
# draft whose loop started at a runtime offset (and whose slice width was not specialised on 16-divisibility)
# compiled to 236-255 without spilling: 192 catches that. The forward epilogue is elementwise on O(n^2) values per
# token (19-67): 96. The chunked backward GEMM of n = 9..16 runs 64-200: 224. The one-tile backward GEMM (fp32's
# tf32x3 holds split operands: 255 on sm_80) and the backward epilogue (Sinkhorn's steps kept per token: up to 245)
# are budgeted at the hardware's 255, so for them the gate's check is the spill rule alone; both are compute- or
# latency-bound on O(n^2) values per token, not on the state's bytes.
KERNEL_REG_BUDGET = {"_gemm_fwd": 192, "_epilogue_fwd": 96, "_gemm_bwd_chunked": 224, "_gemm_bwd": 255,
                     "_epilogue_bwd": 255}
SAVED_STACK_BYTES = 16
# Stream counts that are not powers of two (padded inside the kernels): the gate traces each of them.
PADDED_STREAMS = (3, 5, 6, 7)
# Stream counts padded to 16 (ops.MAP_STREAMS stops at 8: their coefficient kernels take Sinkhorn only), and those
# the gate traces by default: 9 (the forward GEMM in one tile, K not 16-aligned), 12 and 16 (n = 9..15 share 16's
# tiles; each traced n costs about 80 configurations of several CPU-seconds). `--streams 9 10 ...` traces any.
WIDE_STREAMS = tuple(range(9, 17))
GATE_WIDE_STREAMS = (9, 12, 16)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Launch:
    """One kernel configuration as the JIT would specialise it."""

    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list = field(default_factory=list)  # the traced cases that launch it

    @property
    def name(self) -> str:
        return self.fn.__name__

    def key(self) -> tuple:
        consts = tuple(sorted((k, str(v)) for k, v in self.constexprs.items()))
        attrs = tuple(sorted((k, str(v)) for k, v in self.attrs.items()))
        return self.name, tuple(self.signature.items()), consts, attrs, tuple(sorted(self.options.items()))

    def describe(self) -> str:
        names = self.fn.arg_names
        consts = ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constexprs.items())
                           if k[0] in self.fn.constexprs)
        ints = ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constexprs.items())
                         if k[0] not in self.fn.constexprs)
        aligned = ",".join(names[k[0]] for k in sorted(self.attrs))
        dtypes = sorted({v for k, v in self.signature.items() if v.startswith("*")})
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}[{consts}{'; ' + opts if opts else ''}] {'/'.join(dtypes)} div16({aligned})" + (
            f" ints==1({ints})" if ints else "")


class LaunchRecorder:
    """Context manager: while active, ``kernel[grid](...)`` records a :class:`Launch` instead of running."""

    def __init__(self, target: GPUTarget = TARGETS["sm90"]):
        self.backend = make_backend(target)
        self.launches: dict[tuple, Launch] = {}
        self.calls: list[str] = []  # kernel names in launch order
        self.case = None
        self._binders = {}

    def _run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = self._binders[fn](*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        attrs = {k: v for k, v in attrs.items() if v}  # parameters without a specialisation come back empty
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}  # num_warps, num_stages
        launch = Launch(fn, signature, constexprs, attrs, options)
        launch = self.launches.setdefault(launch.key(), launch)
        self.calls.append(fn.__name__)
        if self.case not in launch.cases:
            launch.cases.append(self.case)

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise RuntimeError("torch_mhc.ops.aot needs compiled kernels: unset TRITON_INTERPRET")
        recorder = self
        self._saved = JITFunction.run

        def run(fn, *args, grid, warmup=False, **kwargs):
            return recorder._run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._saved


class GateMap:
    """A stand-in H_res map with k res logits. ``spec`` None: the kernels do not compute it on chip, the epilogue
    hands out the logits and this runs on them (a circulant of their softmax, k >= 1; I for k = 0); otherwise the
    on-chip spec of a built-in map (:data:`MAP_SPECS`), computed by the epilogue. The kernels see only k and the
    spec (ops/ may not import nn/maps.py): the gate traces each k and each spec a built-in map takes."""

    def __init__(self, n: int, k: int, spec: tuple | None = None):
        self.n, self.k, self.spec = n, k, spec

    def kernel_spec(self):
        return self.spec

    def logit_count(self) -> int:
        return self.k

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        n, lead = self.n, logits.shape[:-1]
        if self.k == 0:
            return torch.eye(n, dtype=logits.dtype).expand(*lead, n, n)
        w = torch.softmax(logits, dim=-1)[..., torch.arange(n) % self.k]
        i = torch.arange(n)
        return w[..., (i[None, :] - i[:, None]) % n]


# k traced through the logits path (a user's map; Kronecker of Sinkhorn factors: 2^2 + 2^2 = 8 at n = 4, 4^2 + 2^2 = 20
# at n = 8, 3^2 + 2^2 = 13 at n = 6, n^2 at prime n), per n: 0, n, 24 and 26 as the on-chip maps' widths, and the
# Sinkhorn-factor Kronecker's.
MAP_LOGITS = {1: (0, 1), 2: (0, 2, 4), 3: (0, 3, 9), 4: (0, 4, 8, 24), 5: (0, 5, 25), 6: (0, 6, 13), 7: (0, 7, 49),
              8: (0, 8, 20, 26)}
# The on-chip spec of every fused built-in map other than Sinkhorn (ops.kernel_spec), per n: identity, circulant,
# permutation-mixture (n <= 4; at n = 1, 2, 3 also the default Kronecker; n = 5's 120 logits are wider than
# ops.MAX_GEMM_WIDTH and run the reference path), the default Kronecker (n = 4: 2 x 2, n = 6: 3 x 2, n = 8: 4 x 2)
# and n = 8 as 2 x 2 x 2 (three factors). n = 7 has no Kronecker (7 > 5).
MAP_SPECS = {
    n: (("identity",), ("mixture", (("shift", n),)))
    + ((("mixture", (("permutation", n),)),) if n <= 4 else ())
    + {4: (("mixture", (("permutation", 2), ("permutation", 2))),),
       6: (("mixture", (("permutation", 3), ("permutation", 2))),),
       8: (("mixture", (("permutation", 4), ("permutation", 2))),
           ("mixture", (("permutation", 2),) * 3))}.get(n, ())
    for n in range(1, 9)
}


def sublayer_inputs(n: int, C: int, T: int, dtype: torch.dtype, k: int | None = None) -> list[torch.Tensor]:
    """Fresh CPU leaves of one mHC sublayer: x [T, n, C], phi [n*C, 2n+k], bias [2n+k], alpha [3] (k res logits;
    None: Sinkhorn's n^2)."""
    M = 2 * n + (n * n if k is None else k)
    return [torch.randn(T, n, C, dtype=dtype, requires_grad=True), torch.randn(n * C, M, requires_grad=True),
            torch.randn(M, requires_grad=True), torch.rand(3, requires_grad=True)]


def sublayer_forward(x, phi, bias, alpha, variant: str, iters: int, fused: bool = True, f_dtype=None,
                     h_res=None) -> torch.Tensor:
    """One mHC sublayer (F = identity) through the fused ops: the new state [T, n, C]. ``fused``: the two
    sublayer Functions with one dx buffer (what connections run), the post reading ahead for a next sublayer
    with the same phi (:func:`chain` of one); False: the separate ops (coefficients, pre, post: what code calling
    them directly, and recompute's rebuild, run). ``f_dtype``: the sublayer's output in another dtype than the streams
    (the trainer: fp32 streams, bf16 outputs of a sublayer under autocast). ``h_res``: the H_res map (None:
    Sinkhorn)."""
    from torch_mhc.ops import (
        fused_mhc_coefficients,
        fused_stream_post,
        fused_stream_pre,
    )

    if fused:
        return chain(x, [(phi, bias, alpha)], variant, iters, chain_backward=False, f_dtype=f_dtype, h_res=h_res)
    h_pre, h_post, res = fused_mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=1e-6, variant=variant,
                                                h_res=h_res)
    y = fused_stream_pre(x, h_pre)
    return fused_stream_post(x, h_post, res, y if f_dtype is None else y.to(f_dtype))


def chain(x, layers: list, variant: str, iters: int, chain_backward: bool = True, f_dtype=None,
          h_res=None) -> torch.Tensor:
    """Fused sublayers in a row (F = identity), ``layers`` = [(phi, bias, alpha)] one per sublayer: each post reads
    ahead for the next sublayer's phi, each read takes the previous post's read-ahead and, with ``chain_backward``,
    leaves its state gradient to that post's backward. -> the last state."""
    from torch_mhc.ops import fused_sublayer_post, fused_sublayer_pre

    ahead = None
    for i, (phi, bias, alpha) in enumerate(layers):
        nxt = layers[i + 1][0] if i + 1 < len(layers) else phi
        y, (_, h_post, res), link = fused_sublayer_pre(x, phi, bias, alpha, iters=iters, eps=1e-6, variant=variant,
                                                       read_ahead=ahead, h_res=h_res)
        f = y if f_dtype is None else y.to(f_dtype)
        x, ahead = fused_sublayer_post(link, h_post, res, f, read_ahead=(nxt, 1e-6), chain_backward=chain_backward)
    return x


def run_sublayer(n: int, C: int, T: int, dtype: torch.dtype, variant: str, iters: int, fused: bool = True,
                 f_dtype=None, res_logits: int | None = None, res_spec: tuple | None = None) -> None:
    """Forward and backward of :func:`sublayer_forward` on fresh inputs; fused: also two chained sublayers (the
    first runs the coefficient GEMM; the second's read takes the first post's read-ahead and leaves its state
    gradient to the first post's chained backward). ``res_logits``: k of a map run outside the kernels
    (:class:`GateMap`); ``res_spec``: a built-in map's on-chip spec (:data:`MAP_SPECS`); neither: Sinkhorn on
    chip."""
    from torch_mhc.ops.coefficients import make_epilogue

    k = make_epilogue(n, res_spec, False).k if res_spec is not None else res_logits
    h_res = None if k is None else GateMap(n, k, res_spec)
    x, phi, bias, alpha = sublayer_inputs(n, C, T, dtype, k)
    out = sublayer_forward(x, phi, bias, alpha, variant, iters, fused, f_dtype, h_res)
    out.backward(torch.ones_like(out))
    if fused:
        out = chain(x, [(phi, bias, alpha), sublayer_inputs(n, C, T, dtype, k)[1:]], variant, iters, f_dtype=f_dtype,
                    h_res=h_res)
        out.backward(torch.ones_like(out))


def run_streams(n: int, C: int, T: int, dtype: torch.dtype, f_dtype=None) -> None:
    """Forward and backward of pre and post alone (the stream kernels) on fresh inputs: what n beyond
    ``ops.MAP_STREAMS`` runs fused under a map other than Sinkhorn (its coefficients take the reference path)."""
    from torch_mhc.ops import fused_stream_post, fused_stream_pre

    x = torch.randn(T, n, C, dtype=dtype, requires_grad=True)
    h_pre, h_post, h_res = (torch.rand(T, *shape, requires_grad=True) for shape in ((n,), (n,), (n, n)))
    y = fused_stream_pre(x, h_pre)
    out = fused_stream_post(x, h_post, h_res, y if f_dtype is None else y.to(f_dtype))
    out.backward(torch.ones_like(out))


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "as_strided", "detach", "alias", "expand", "t", "transpose",
             "unsqueeze", "squeeze", "permute", "slice", "select", "split", "unbind", "empty_like", "empty",
             "new_empty", "empty_strided", "new_empty_strided"}


def count_sublayer_ops(n: int = 4, C: int = 64, T: int = 32, dtype=torch.bfloat16, variant: str = "paper",
                       iters: int = 20, fused: bool = True) -> dict:
    """Kernel launches and ATen ops of one sublayer, forward and backward separately:
    ``{"fwd"|"bwd": {"launches": [...], "state_ops": [...], "other_ops": [...], "syncs": [...]}}``. Fused: a
    sublayer inside a stack of connections under chained backward, measured as what a third chained sublayer
    adds to two (:func:`chain`; lists sorted); otherwise one sublayer of the separate ops. ``state_ops`` are the
    ATen ops that read or write the state (``[T, n, C]`` or ``[T, n*C]``; views and allocations excluded): full
    passes over the state outside the kernels; ``other_ops`` the remaining PyTorch glue; ``syncs`` are ops that
    copy a value to the host or a Python list to the device (``_local_scalar_dense``, ``lift_fresh``, ``item``)."""
    if not fused:
        return _count_ops(lambda x, *p: sublayer_forward(x, *p, variant, iters, False), n, C, T, dtype, 1)
    two, three = (_count_ops(lambda x, *layers: chain(x, list(layers), variant, iters), n, C, T, dtype, k)
                  for k in (2, 3))
    return {phase: {key: sorted((Counter(three[phase][key]) - Counter(two[phase][key])).elements())
                    for key in three[phase]} for phase in three}


def _count_ops(forward, n: int, C: int, T: int, dtype, k: int) -> dict:
    """Counts of ``forward(x, *params)`` and its backward; params: one (phi, bias, alpha) (k = 1, unpacked) or
    k of them (one tuple per sublayer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    state = T * n * C

    class Count(TorchDispatchMode):
        def __init__(self, phase):
            super().__init__()
            self.phase = phase

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if name in ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "item"):
                self.phase["syncs"].append(name)
            elif name not in _VIEW_OPS and any(t.numel() == state and t.shape[-1] in (C, n * C) for t in tensors):
                self.phase["state_ops"].append(name)
            elif name not in _VIEW_OPS:
                self.phase["other_ops"].append(name)
            return out

    result = {p: {"launches": [], "state_ops": [], "other_ops": [], "syncs": []} for p in ("fwd", "bwd")}
    x, *params = sublayer_inputs(n, C, T, dtype)
    inputs = [x, *params] if k == 1 else [x, tuple(params)] + [tuple(sublayer_inputs(n, C, T, dtype)[1:])
                                                                  for _ in range(k - 1)]
    grad = torch.ones(T, n, C, dtype=dtype)
    with LaunchRecorder() as rec:
        with Count(result["fwd"]):
            out = forward(*inputs)
        result["fwd"]["launches"] = list(rec.calls)
        start = len(rec.calls)
        with Count(result["bwd"]):
            out.backward(grad)
        result["bwd"]["launches"] = rec.calls[start:]
    return result


# The built-in maps computed on chip (MAP_SPECS): each spec for its n, fp32 and bf16 streams, fused and separate, with
# both gate layouts (V4: H_pre + eps) at C = 24 and the read-ahead's large token count for the paper's.
MAP_SPEC_CASES = [
    dict(n=n, C=C, T=T, dtype=dtype, variant=variant, iters=20, fused=fused, res_spec=spec)
    for n, specs in MAP_SPECS.items()
    for spec in specs
    for variant, C, T in (("paper", 24, 48), ("deepseek-v4", 24, 48), ("paper", 1024, 48), ("paper", 16, 8448))
    for dtype in (torch.float32, torch.bfloat16)
    for fused in (True, False)
    if fused or T == 48
]

# What the gate covers: every n, C small/large and 16-aligned or not (C and n*C specialise the
# loads), every stream dtype, both variants, Sinkhorn with one and with many iterations, and token
# counts of 1 (specialised by the JIT as a constant) and more.
GATE_CASES = [
    dict(n=n, C=C, T=T, dtype=dtype, variant=variant, iters=iters, fused=fused)
    for fused in (True, False)
    for n in (1, 2, 4, 8)
    for C in (24, 1000, 1024, 7168)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for variant in ("paper", "deepseek-v4")
    for iters, T in ((20, 48), (1, 1))
    if not (variant == "deepseek-v4" and iters == 1 and C != 1024)  # the V4 start with 1 iteration: one C suffices
] + [  # token counts large enough for the read-ahead post's larger token blocks (C = 16: aligned, and cheap)
    dict(n=n, C=16, T=T, dtype=dtype, variant="paper", iters=20, fused=True)
    for n in (1, 2, 4, 8)
    for T in (8448, 16896)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
] + [  # the trainer's setting: fp32 streams, the sublayer's output in bf16 (autocast); its gradient dy stays fp32
    dict(n=n, C=C, T=T, dtype=torch.float32, variant="paper", iters=20, fused=fused, f_dtype=torch.bfloat16)
    for n in (1, 2, 4, 8)
    for C, T in ((24, 48), (1024, 48), (16, 8448))
    for fused in (True, False)
    if fused or T == 48
] + [  # maps on the logits path (the epilogue hands out their k res logits; GEMM widths 2n + k)
    dict(n=n, C=C, T=T, dtype=dtype, variant="paper", iters=20, fused=fused, res_logits=k)
    for n, ks in MAP_LOGITS.items()
    for k in ks
    for C, T in ((24, 48), (1024, 48), (16, 8448))
    for dtype in (torch.float32, torch.bfloat16)
    for fused in (True, False)
    if fused or T == 48
] + [  # n padded inside the kernels (PADDED_STREAMS): C aligned or not, both stream dtypes, both variants, fused and
    # separate; one token with one iteration; the read-ahead's large token counts; the trainer's mixed dtypes
    dict(n=n, C=C, T=48, dtype=dtype, variant=variant, iters=20, fused=fused)
    for n in PADDED_STREAMS
    for C in (24, 1024)
    for dtype in (torch.float32, torch.bfloat16)
    for variant in ("paper", "deepseek-v4")
    for fused in (True, False)
] + [  # and n = 9..16: one token with one iteration
    dict(n=n, C=1000, T=1, dtype=torch.bfloat16, variant=variant, iters=1, fused=True)
    for n in PADDED_STREAMS + WIDE_STREAMS for variant in ("paper", "deepseek-v4")
] + [
    dict(n=n, C=16, T=T, dtype=dtype, variant="paper", iters=20, fused=True)
    for n in PADDED_STREAMS for T in (8448, 16896) for dtype in (torch.float32, torch.bfloat16)
] + [  # and n = 9..16: the trainer's mixed dtypes
    dict(n=n, C=C, T=T, dtype=torch.float32, variant="paper", iters=20, fused=fused, f_dtype=torch.bfloat16)
    for n in PADDED_STREAMS + WIDE_STREAMS
    for C, T in ((24, 48), (1024, 48), (16, 8448))
    for fused in (True, False)
    if fused or T == 48
] + MAP_SPEC_CASES + [
    # n = 9..16 (WIDE_STREAMS; their one-token and mixed-dtype cases are with PADDED_STREAMS' above): Sinkhorn on
    # chip, the forward GEMM in column tiles; C aligned or not, both stream dtypes and variants, fused and separate,
    # split K (48 tokens) and not (8448)
    dict(n=n, C=C, T=T, dtype=dtype, variant=variant, iters=20, fused=fused)
    for n in WIDE_STREAMS
    for C, T in ((24, 48), (1024, 48), (16, 8448))
    for dtype in (torch.float32, torch.bfloat16)
    for variant in ("paper", "deepseek-v4")
    for fused in (True, False)
    if fused or T == 48
] + [  # a map of one's own with n^2 logits has Sinkhorn's width there, so it fuses: the logits epilogue
    dict(n=n, C=24, T=48, dtype=dtype, variant="paper", iters=20, fused=fused, res_logits=n * n)
    for n in WIDE_STREAMS for dtype in (torch.float32, torch.bfloat16) for fused in (True, False)
]
# n = 9..16 (WIDE_STREAMS): pre and post alone (run_streams, what those n run under a map other than Sinkhorn), C
# aligned or not, small and large, every stream dtype, one token and many, and the trainer's mixed dtypes.
STREAM_CASES = [
    dict(n=n, C=C, T=T, dtype=dtype)
    for n in WIDE_STREAMS
    for C in (24, 1000, 1024, 7168)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for T in (1, 48)
] + [dict(n=n, C=C, T=48, dtype=torch.float32, f_dtype=torch.bfloat16) for n in WIDE_STREAMS for C in (24, 1024)]


def trace(cases=GATE_CASES + STREAM_CASES) -> list[Launch]:
    """Distinct kernel configurations launched by ``cases`` (forward and backward): a sublayer's
    (:func:`run_sublayer`), or pre and post alone for a case without a variant (:func:`run_streams`)."""
    with LaunchRecorder() as rec:
        for case in cases:
            rec.case = {k: str(v).replace("torch.", "") for k, v in case.items()}
            (run_sublayer if "variant" in case else run_streams)(**case)
    return list(rec.launches.values())


_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local bytes of the (single) kernel in a cubin, from cuobjdump; with a stack frame, also
    how many local loads and stores sit inside a loop (:func:`local_accesses_in_loops`)."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    m = _RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    usage = {"regs": int(m[2]), "stack": int(m[3]), "shared": int(m[4]), "local": int(m[5])}
    if usage["stack"] or usage["local"]:
        usage["local_in_loops"] = local_accesses_in_loops(_cuobjdump(cubin, "-sass"))
    return usage


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BACK_BRANCH = re.compile(r"\b(?:BRA|JMP|BRX)\b[^;]*?0x([0-9a-f]+)\s*$")  # the target: the last address


def local_accesses_in_loops(sass: str) -> int:
    """How many local-memory loads and stores (LDL/STL: spill traffic) lie inside a loop of the SASS, a loop being
    the address range of a backward branch. ptxas sometimes saves one register around a loop (an STL before it,
    an LDL after; seen as 8-16 bytes of stack at 40-128 registers, with the loop's exit as CALL.REL.NOINC): that is
    one store and one load per program, not a spill that costs in the loop."""
    code = [(int(a, 16), text.strip()) for a, text in _SASS.findall(sass)]
    loops = [(int(m[1], 16), a) for a, text in code for m in [_BACK_BRANCH.search(text)] if m and int(m[1], 16) <= a]
    return sum(1 for a, text in code if re.search(r"\b(LDL|STL)\b", text) and any(lo <= a <= hi for lo, hi in loops))


def compile_launch(launch: Launch, target: GPUTarget) -> dict:
    """Compile one configuration for ``target``: resource usage, or the error."""
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    try:
        kernel = triton.compile(src, target=target, options=launch.options)
    except Exception as e:  # noqa: BLE001 - a compile error is a result here
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"}
    usage = resource_usage(kernel.asm["cubin"])
    usage["num_warps"] = kernel.metadata.num_warps
    return usage


_LAUNCHES: list[Launch] = []


def _compile_one(job: tuple[int, str]) -> tuple[int, str, dict]:
    i, target = job
    return i, target, compile_launch(_LAUNCHES[i], TARGETS[target])


def compile_all(launches: list[Launch], targets=tuple(TARGETS), workers: int | None = None) -> dict:
    """{(index, target): usage or error}, compiled in parallel (forked workers share the traced kernels)."""
    global _LAUNCHES
    _LAUNCHES = launches
    jobs = [(i, t) for i in range(len(launches)) for t in targets]
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 8))
    if workers == 1:
        return {(i, t): u for i, t, u in map(_compile_one, jobs)}
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return {(i, t): u for i, t, u in pool.map(_compile_one, jobs, chunksize=4)}


def problems(launch: Launch, usage: dict) -> list[str]:
    """Why a compiled configuration fails the gate (empty when it passes)."""
    if "error" in usage:
        return [f"compile error: {usage['error']}"]
    out = []
    if usage.get("local_in_loops") or usage["stack"] > SAVED_STACK_BYTES or usage["local"]:
        out.append(f"spills ({usage['stack']} bytes of stack, {usage['local']} local, "
                   f"{usage.get('local_in_loops', 0)} local accesses in loops)")
    if launch.name in STREAM_KERNELS:
        budget = padded_entry(STREAM_REG_BUDGET, launch.constexprs[(launch.fn.arg_names.index("N"),)])
    elif launch.name in KERNEL_REG_BUDGET:
        budget = KERNEL_REG_BUDGET[launch.name]
    else:
        return out + [f"no register budget for {launch.name} (aot.KERNEL_REG_BUDGET)"]
    if usage["regs"] > budget:
        out.append(f"{usage['regs']} registers > budget {budget}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if any configuration fails the gate")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--maps", action="store_true", help="only the cases of the maps computed on chip (MAP_SPEC_CASES)")
    p.add_argument("--streams", type=int, nargs="+", default=None, metavar="N",
                   help="only the cases of these stream counts")
    args = p.parse_args(argv)
    cases = MAP_SPEC_CASES if args.maps else GATE_CASES + STREAM_CASES
    streams = args.streams or [n for n in range(1, 17) if n not in WIDE_STREAMS or n in GATE_WIDE_STREAMS]
    cases = [c for c in cases if c["n"] in streams]
    t0 = time.time()
    launches = trace(cases)
    t1 = time.time()
    results = compile_all(launches, tuple(args.targets), args.workers)
    t2 = time.time()
    failures = 0
    for i, launch in sorted(enumerate(launches), key=lambda il: il[1].describe()):
        cells = []
        for t in args.targets:
            u = results[(i, t)]
            bad = problems(launch, u)
            failures += bool(bad)
            saved = f", {u['stack']} B saved outside loops" if not bad and u["stack"] else ""
            cells.append(f"{t}: " + ("; ".join(bad) if bad else f"{u['regs']} regs{saved}"))
        print(f"{launch.describe():<90} {' | '.join(cells)}")
    print(f"{len(launches)} configurations from {len(cases)} traced cases ({t1 - t0:.1f} s), "
          f"{len(results)} compiles ({t2 - t1:.1f} s), {failures} failing")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
