"""Fused mHC coefficients: ``x [T, n*C] -> H_pre [T, n], H_post [T, n], H_res [T, n, n]`` (fp32).

phi has ``M = 2n + k`` columns: pre | post | the k res logits of the H_res map (Sinkhorn: k = n^2). Forward, two
kernels:
  1. ``_gemm_fwd``: one pass over x computes ``raw = x @ phi`` (fp32 products for fp32
     streams, tf32 tensor cores for bf16/fp16, fp32 accumulation; see :func:`dot_precision`)
     and the sum of squares, giving ``inv_rms`` (n = 9..16: 2-3 column tiles side by side, sharing x through L2);
  2. ``_epilogue_fwd``: ``h = raw * inv_rms * alpha + bias``, sigmoid / 2 sigmoid, and H_res on chip: Sinkhorn-Knopp
     on each token's n x n block in registers, I (identity map), or the closed form of a softmax-weighted mixture
     of fixed patterns (circulant, permutation mixture, Kronecker products of permutation mixtures: ``MIX``); for a
     map the kernels do not know (:class:`Epilogue`, ``RES_LOGITS``) the k res logits, on which the map's own
     PyTorch forward runs (its gradient comes back into ``_epilogue_bwd``).
Backward, two kernels:
  1. ``_epilogue_bwd``: sigmoid derivatives and the Sinkhorn backward in O(iters): the forward is
     recomputed once, keeping each step's n-vector of column/row sums in registers (the only thing a step
     needs to be undone: its input is its output times those sums), then swept back; it also applies the
     alpha/inv_rms chain rule (``draw``, the per-token RMS coefficient) and writes per-program partial
     sums for the bias and alpha gradients (reduced in a fixed order: deterministic, no atomics); a mixture's
     backward is its patterns' inner products with dH_res and the softmax VJP;
  2. ``_gemm_bwd``: one pass over x gives both ``dx = draw @ phi^T + c * x`` and partial ``dphi = x^T draw``
     (n = 9..16: ``_gemm_bwd_chunked``, in column chunks; two passes for fp32 streams).
No host syncs: every size is a Python int known from the shapes.
Same math as :func:`torch_mhc.nn.functional.mhc_coefficients`; tested against it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torch_mhc.numerics import COL, EXP_SAFE_MAX, ROW, sinkhorn_steps
from torch_mhc.ops.blocks import (
    load_vec,
    mat_offsets,
    on_tensors_device,
    padded,
    padded_entry,
    stream_index,
    token_block,
)


@triton.jit(do_not_specialize=["T"])  # K_PER: its 16-divisibility keeps the loads vectorised
def _gemm_fwd(x_ptr, phi_ptr, raw_ptr, inv_ptr, T, K, M, stride_pk, stride_pm, eps, K_PER,
              BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
              NUM_M: tl.constexpr):
    """raw = x @ phi [T, M] and inv_rms [T] for BT tokens over columns [pid_1 * K_PER, +K_PER) of x, columns
    [pid_m * BM, +BM) of phi: NUM_M programs side by side per token block (pid_0 = token block * NUM_M + pid_m, so
    the programs reading the same x run together and share it through L2); the first of them stores inv_rms.
    SPLIT (small token counts, several programs per token block): raw_ptr/inv_ptr take this slice's partial
    x @ phi [S, T, M] and sum of squares [S, T], reduced afterwards in a fixed order."""
    pid_m = tl.program_id(0) % NUM_M
    rows = (tl.program_id(0) // NUM_M) * BT + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    cols = pid_m * BM + tl.arange(0, BM)
    cmask = cols < M
    acc = tl.zeros((BT, BM), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    # K_PER is K, or (SPLIT) a multiple of BK: slice pid_1 covers [pid_1 * K_PER, +K_PER) and no other slice's
    # columns. The loop runs from 0 either way: runtime loop starts took the unsplit kernel from 95 to 251 registers.
    k_begin = tl.program_id(1) * K_PER if SPLIT else 0
    for k0 in range(0, K_PER, BK):
        ks = k_begin + k0 + tl.arange(0, BK)
        kmask = ks < K
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        x = x.to(tl.float32)
        p = tl.load(phi_ptr + ks[:, None] * stride_pk + cols[None, :] * stride_pm,
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, p, acc, input_precision=PREC)
        ss += tl.sum(x * x, axis=1)
    first = rmask & (tl.full((BT,), 0, tl.int32) + pid_m == 0)  # this token block's first tile stores inv_rms
    if SPLIT:
        part = tl.program_id(1).to(tl.int64) * T
        tl.store(raw_ptr + (part + rows64[:, None]) * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
        tl.store(inv_ptr + part + rows64, ss, mask=first)
    else:
        inv = 1.0 / tl.sqrt(ss / K + eps)
        tl.store(raw_ptr + rows64[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
        tl.store(inv_ptr + rows, inv, mask=first)


@triton.jit
def _pad_fill(t, real, fill, N: tl.constexpr):
    """t with its padded stream entries (where ``real`` is False) set to ``fill``; t itself when n is a power of
    two (nothing padded: the same arithmetic as without padding)."""
    if padded(N) != N:
        t = tl.where(real, t, fill)
    return t


@triton.jit
def _col_softmax(L, real, N: tl.constexpr):
    """[BT, NP, NP] logits (padded entries -inf; ``real`` [NP]: i < n) -> softmax over rows i for each column j of
    the real n x n block, padded entries 0 (padded columns: max 0 and sum 1 instead of -inf and 0, so no NaN)."""
    col_real = real[None, :]
    mx = _pad_fill(tl.max(L, axis=1), col_real, 0.0, N)
    e = tl.exp(L - mx[:, None, :])
    return e / _pad_fill(tl.sum(e, axis=1), col_real, 1.0, N)[:, None, :]


@triton.jit
def _sk_start(L, real, eps, N: tl.constexpr, SOFTMAX: tl.constexpr, SAFE_MAX: tl.constexpr):
    """[BT, NP, NP] logits (padded entries -inf; ``real`` [NP]: i < n) -> starting matrix (exp, or softmax over
    rows i for each column j, + eps), padded entries 0."""
    if SOFTMAX:
        m = _pad_fill(_col_softmax(L, real, N) + eps, (real[:, None] & real[None, :])[None, :, :], 0.0, N)
    else:
        m = tl.exp(L - _exp_shift(L, SAFE_MAX)[:, None, None])
    return m


@triton.jit
def _exp_shift(L, SAFE_MAX: tl.constexpr):
    """[BT]: how far each token's largest logit exceeds SAFE_MAX (0 if it does not)."""
    return tl.maximum(tl.max(tl.max(L, axis=2), axis=1) - SAFE_MAX, 0.0)


@triton.jit
def _col_sums(m, eps):
    """[BT, N] (indexed by column j): sum over rows i, + eps."""
    return tl.sum(m, axis=1) + eps


@triton.jit
def _row_sums(m, eps):
    """[BT, N] (indexed by row i): sum over columns j, + eps."""
    return tl.sum(m, axis=2) + eps


@triton.jit
def _load_gates(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M, N: tl.constexpr):
    """Per-token inputs of the gates: raw pre/post [BT, NP], inv_rms [BT] and the logits h = raw * inv * alpha + bias
    (padded streams 0)."""
    i, real = stream_index(N)
    inv = tl.load(inv_ptr + rows64, mask=rmask, other=1.0)
    base = raw_ptr + rows64[:, None] * M
    mask = rmask[:, None] & real[None, :]
    raw_pre = tl.load(base + i[None, :], mask=mask, other=0.0)
    raw_post = tl.load(base + N + i[None, :], mask=mask, other=0.0)
    h_pre = raw_pre * inv[:, None] * tl.load(alpha_ptr) + tl.load(bias_ptr + i, mask=real, other=0.0)[None, :]
    h_post = raw_post * inv[:, None] * tl.load(alpha_ptr + 1) + tl.load(bias_ptr + N + i, mask=real, other=0.0)[None, :]
    return raw_pre, raw_post, inv, h_pre, h_post


@triton.jit
def _load_res_block(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Sinkhorn's res logits as [BT, NP, NP] in the orientation Sinkhorn sees: raw, L = raw * inv * alpha + bias
    (padded entries -inf), the columns they came from (TRANSPOSE: V4's comb[j, i] = H_res[i, j]) and the real
    n x n block [1, NP, NP]."""
    i, real = stream_index(N)
    r = i[None, :, None]
    c = i[None, None, :]
    block = real[None, :, None] & real[None, None, :]
    if TRANSPOSE:
        col = 2 * N + c * N + r
    else:
        col = 2 * N + r * N + c
    raw_res = tl.load(raw_ptr + rows64[:, None, None] * M + col, mask=rmask[:, None, None] & block, other=0.0)
    L = raw_res * inv[:, None, None] * tl.load(alpha_ptr + 2) + tl.load(bias_ptr + col, mask=block, other=0.0)
    return raw_res, _pad_fill(L, block, -float("inf"), N), col, block


@triton.jit
def _load_res_logits(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N: tl.constexpr, KR: tl.constexpr,
                     BKR: tl.constexpr):
    """A map's KR res logits as [BT, BKR] (columns 2N + j, padded to BKR with zeros): raw, L, the column mask."""
    j = tl.arange(0, BKR)
    jm = j < KR
    raw_res = tl.load(raw_ptr + rows64[:, None] * M + 2 * N + j[None, :], mask=rmask[:, None] & jm[None, :], other=0.0)
    L = raw_res * inv[:, None] * tl.load(alpha_ptr + 2) + tl.load(bias_ptr + 2 * N + j, mask=jm, other=0.0)[None, :]
    return raw_res, L, j, jm


# What the epilogue computes for the res part (constexpr RES): Sinkhorn on chip; the k res logits handed out (a map
# the kernels do not know runs on them in PyTorch); H_res = I; a softmax-weighted mixture of fixed 0/1 patterns in
# closed form (circulant, permutation mixture, Kronecker products of permutation mixtures; MIX below).
RES_SINKHORN = tl.constexpr(0)
RES_LOGITS = tl.constexpr(1)
RES_IDENTITY = tl.constexpr(2)
RES_MIXTURE = tl.constexpr(3)
# Pattern kinds of a mixture factor of size f: "shift" (the f cyclic shifts, pattern s: row r -> column (r + s) mod f;
# the circulant) and "permutation" (the f! permutations in lexicographic order, identity first: the permutation
# mixture). A mixture is the Kronecker product of its factors (H = H_1 (x) H_2 (x) ...), each factor the softmax
# of its own slice of the logits weighting its patterns: H_f = sum_p softmax(L_f)_p P_p.
MIX_KINDS = ("shift", "permutation")


def pattern_count(kind: str, f: int) -> int:
    """How many patterns (logits) a mixture factor of ``kind`` and size f has: f shifts or f! permutations."""
    return f if kind == "shift" else math.factorial(f)


@triton.constexpr_function
def _pattern_column(kind, f, p, r):
    """The column (0..f-1) that row r of pattern p of a factor sends to (at compile time; the JIT's dependency
    hashing takes no cached helper here)."""
    return (r + p) % f if kind == "shift" else list(itertools.permutations(range(f)))[p][r]


@triton.jit
def _pattern(i, KIND: tl.constexpr, F: tl.constexpr, STRIDE: tl.constexpr, P: tl.constexpr):
    """[NP, NP] bool: where pattern P of a factor of size F is 1 in the full n x n layout (rows and columns i =
    0..NP-1; the factor's own index of i is (i // STRIDE) mod F: the Kronecker layout; padded rows and columns hold
    pattern entries too, never stored and multiplied by a zero gradient in the backward)."""
    a = (i // STRIDE) % F
    target = tl.zeros_like(a)
    for r in tl.static_range(F):
        target = tl.where(a == r, _pattern_column(KIND, F, P, r), target)
    return target[:, None] == a[None, :]


@triton.jit
def _logit_column(t, j, c: tl.constexpr):
    """Column c of a [BT, BKR] tile as [BT] (exact: a sum of zeros and that entry)."""
    return tl.sum(tl.where(j[None, :] == c, t, 0.0), axis=1)


@triton.jit
def _factor_softmax(L, j, OFF: tl.constexpr, COUNT: tl.constexpr):
    """[BT, BKR]: softmax over the logit columns [OFF, OFF + COUNT) of L (one factor's), 0 elsewhere."""
    inside = (j >= OFF) & (j < OFF + COUNT)
    Lf = tl.where(inside[None, :], L, -float("inf"))
    e = tl.exp(Lf - tl.max(Lf, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _factor_matrix(w, j, i, FACTOR: tl.constexpr, BT: tl.constexpr, N: tl.constexpr):
    """One factor's H_f [BT, NP, NP] in the full layout: sum_p w_p P_p over its patterns (w: its softmax weights, in
    columns FACTOR[4] + p of the [BT, BKR] tile). FACTOR = (kind, size, patterns, stride, first logit column)."""
    h = tl.zeros((BT, padded(N), padded(N)), dtype=tl.float32)
    for p in tl.static_range(FACTOR[2]):
        h += tl.where(_pattern(i, FACTOR[0], FACTOR[1], FACTOR[3], p)[None, :, :],
                      _logit_column(w, j, FACTOR[4] + p)[:, None, None], 0.0)
    return h


@triton.jit
def _mixture_factors(L, j, MIX: tl.constexpr, BT: tl.constexpr, N: tl.constexpr):
    """Each factor's softmax weights [BT, BKR] and matrix H_f [BT, NP, NP] (two tuples, one entry per factor)."""
    i, _ = stream_index(N)
    ws = ()
    hs = ()
    for f in tl.static_range(len(MIX)):
        w = _factor_softmax(L, j, MIX[f][4], MIX[f][2])
        ws = ws + (w,)
        hs = hs + (_factor_matrix(w, j, i, MIX[f], BT, N),)
    return ws, hs


@triton.jit
def _mixture_fwd(L, j, MIX: tl.constexpr, BT: tl.constexpr, N: tl.constexpr):
    """H_res [BT, NP, NP] of a mixture from its logits L [BT, BKR]: the product of its factors in the full layout."""
    _, hs = _mixture_factors(L, j, MIX, BT, N)
    h = hs[0]
    for f in tl.static_range(1, len(MIX)):
        h = h * hs[f]
    return h


@triton.jit
def _mixture_bwd(L, j, dh, MIX: tl.constexpr, BT: tl.constexpr, N: tl.constexpr):
    """dL [BT, BKR] from dH_res [BT, NP, NP] (padded entries 0): for each factor, G = dH * (the other factors), c_p =
    <G, P_p> (dH_f summed over the other factors' indices, read through pattern p), and softmax's VJP
    w * (c - <w, c>)."""
    i, _ = stream_index(N)
    ws, hs = _mixture_factors(L, j, MIX, BT, N)
    dL = tl.zeros_like(L)
    for f in tl.static_range(len(MIX)):
        g = dh
        for q in tl.static_range(len(MIX)):
            if q != f:
                g = g * hs[q]
        c = tl.zeros_like(L)
        for p in tl.static_range(MIX[f][2]):
            on = _pattern(i, MIX[f][0], MIX[f][1], MIX[f][3], p)[None, :, :]
            cp = tl.sum(tl.sum(tl.where(on, g, 0.0), axis=2), axis=1)
            c += tl.where(j[None, :] == MIX[f][4] + p, cp[:, None], 0.0)
        w = ws[f]
        dL += w * (c - tl.sum(w * c, axis=1)[:, None])
    return dL


@triton.jit(do_not_specialize=["T", "PAIRS"])
def _epilogue_fwd(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, T, M, PAIRS, eps,
                  N: tl.constexpr, PRE_EPS: tl.constexpr, RES: tl.constexpr, SOFTMAX: tl.constexpr,
                  TRANSPOSE: tl.constexpr, KR: tl.constexpr, BKR: tl.constexpr, BT: tl.constexpr,
                  SAFE_MAX: tl.constexpr, MIX: tl.constexpr):
    """Gates (sigmoid, 2 sigmoid; PRE_EPS: + eps on H_pre, V4) and the res part. RES_SINKHORN: Sinkhorn on chip,
    H_res [T, N, N] (SOFTMAX: V4's start, then one row normalisation; then PAIRS x (columns, rows)); RES_LOGITS: the
    KR res logits [T, KR] for a map that runs outside the kernels (nothing for KR = 0); RES_IDENTITY: H_res = I;
    RES_MIXTURE: H_res [T, N, N] of the mixture MIX (see :func:`_mixture_fwd`) from the KR logits."""
    rows64, rmask = token_block(T, BT)
    i, real = stream_index(N)
    _, _, inv, h_pre, h_post = _load_gates(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M, N)
    pre = tl.sigmoid(h_pre)
    if PRE_EPS:
        pre += eps
    gate_mask = rmask[:, None] & real[None, :]
    tl.store(pre_ptr + rows64[:, None] * N + i[None, :], pre, mask=gate_mask)
    tl.store(post_ptr + rows64[:, None] * N + i[None, :], 2.0 * tl.sigmoid(h_post), mask=gate_mask)
    res_offs, res_mask = mat_offsets(rows64, rmask, N)
    if RES == RES_SINKHORN:
        _, L, _, _ = _load_res_block(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N, TRANSPOSE)
        m = _sk_start(L, real, eps, N, SOFTMAX, SAFE_MAX)
        if SOFTMAX:
            m = m / _row_sums(m, eps)[:, :, None]
        for _ in range(PAIRS):
            m = m / _col_sums(m, eps)[:, None, :]
            m = m / _row_sums(m, eps)[:, :, None]
        tl.store(res_ptr + res_offs, m, mask=res_mask)
    elif RES == RES_IDENTITY:
        eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
        tl.store(res_ptr + res_offs, tl.broadcast_to(eye[None, :, :], (BT, padded(N), padded(N))), mask=res_mask)
    elif KR > 0:
        _, L, j, jm = _load_res_logits(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N, KR, BKR)
        if RES == RES_MIXTURE:
            tl.store(res_ptr + res_offs, _mixture_fwd(L, j, MIX, BT, N), mask=res_mask)
        else:
            tl.store(res_ptr + rows64[:, None] * KR + j[None, :], L, mask=rmask[:, None] & jm[None, :])


@triton.jit
def _step_bwd_col(h, y, den):
    """Undo y = m / den[j] (den [BT, N]) for h = gradient * value: h_in = h_out - y * sum_i h_out (no division),
    and the step's input m = y * den."""
    return h - y * tl.sum(h, axis=1)[:, None, :], y * den[:, None, :]


@triton.jit
def _step_bwd_row(h, y, den):
    return h - y * tl.sum(h, axis=2)[:, :, None], y * den[:, :, None]


@triton.jit
def _sinkhorn_bwd(L, dres_ptr, rows64, rmask, eps, PAIRS: tl.constexpr, N: tl.constexpr, SOFTMAX: tl.constexpr,
                  SAFE_MAX: tl.constexpr):
    """dL [BT, NP, NP] (padded entries 0) from the gradient of H_res: one recomputation of the forward keeps each
    step's sums (an n-vector per token and step) in registers (a tuple: PAIRS is a compile-time constant, one
    compilation per iteration count), then each step is undone from its output: input = output * sums. The gradient
    travels as h = gradient * value (``nn.sinkhorn.sinkhorn_backward``): no division, so a row or column whose sum is
    below eps (padded ones; exp underflowing to 0 when logits spread by about 100) cannot grow it to inf, and
    padded entries, whose values are 0, keep h = 0."""
    i, real = stream_index(N)
    NP: tl.constexpr = padded(N)
    LEAD: tl.constexpr = 1 if SOFTMAX else 0
    m0 = _sk_start(L, real, eps, N, SOFTMAX, SAFE_MAX)
    m = m0
    sums = ()
    if SOFTMAX:
        den = _row_sums(m, eps)
        sums = sums + (den,)
        m = m / den[:, :, None]
    for p in tl.static_range(PAIRS):
        den = _col_sums(m, eps)
        sums = sums + (den,)
        m = m / den[:, None, :]
        den = _row_sums(m, eps)
        sums = sums + (den,)
        m = m / den[:, :, None]
    res_offs, res_mask = mat_offsets(rows64, rmask, N)
    h = tl.load(dres_ptr + res_offs, mask=res_mask, other=0.0) * m
    for q in tl.static_range(PAIRS):
        h, m = _step_bwd_row(h, m, sums[LEAD + 2 * (PAIRS - 1 - q) + 1])
        h, m = _step_bwd_col(h, m, sums[LEAD + 2 * (PAIRS - 1 - q)])
    if SOFTMAX:  # m0 = softmax + eps: softmax * (gradient of m0) = h * (softmax / m0), the ratio in [0, 1]
        h, m = _step_bwd_row(h, m, sums[0])
        sm = _col_softmax(L, real, N)
        q = tl.where(m0 > 0, h * (sm / tl.where(m0 > 0, m0, 1.0)), 0.0)
        dL = q - sm * tl.sum(q, axis=1)[:, None, :]
    else:
        dL = h
        # exp(L - shift): where the shift is on, it follows the (first) largest logit and takes minus
        # the total gradient there, as the reference's shifted exp does.
        shift = _exp_shift(L, SAFE_MAX)
        flat = i[None, :, None] * NP + i[None, None, :]  # padded entries (L = -inf) are never the largest
        top = tl.max(tl.max(L, axis=2), axis=1)
        first = tl.min(tl.min(tl.where(L == top[:, None, None], flat, NP * NP), axis=2), axis=1)
        total = tl.sum(tl.sum(dL, axis=2), axis=1)
        dL -= tl.where((flat == first[:, None, None]) & (shift > 0)[:, None, None], total[:, None, None], 0.0)
    return dL


@triton.jit(do_not_specialize=["T"])
def _epilogue_bwd(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, dpre_ptr, dpost_ptr, dres_ptr, draw_ptr, coef_ptr,
                  dbias_ptr, dalpha_ptr, T, M, K, eps, PAIRS: tl.constexpr,
                  N: tl.constexpr, RES: tl.constexpr, SOFTMAX: tl.constexpr, TRANSPOSE: tl.constexpr,
                  KR: tl.constexpr, BKR: tl.constexpr, BT: tl.constexpr, SAFE_MAX: tl.constexpr,
                  MIX: tl.constexpr):
    """From the gradients of (H_pre, H_post, and H_res [T, N, N] (on chip: RES_SINKHORN, RES_IDENTITY, RES_MIXTURE)
    or the res logits [T, KR] (RES_LOGITS)): draw [T, M] = dL/draw, coef [T] (the RMS term of dx, per element of
    x), and this program's partial sums of dbias [M] and dalpha [3]. Sinkhorn backward in O(steps), on chip
    (:func:`_sinkhorn_bwd`); a mixture's in closed form (:func:`_mixture_bwd`); H_res = I has no logits."""
    rows64, rmask = token_block(T, BT)
    i, real = stream_index(N)
    raw_pre, raw_post, inv, h_pre, h_post = _load_gates(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M, N)
    s_pre = tl.sigmoid(h_pre)
    s_post = tl.sigmoid(h_post)
    dh_pre = load_vec(dpre_ptr, rows64, rmask, N) * s_pre * (1 - s_pre)
    dh_post = 2.0 * load_vec(dpost_ptr, rows64, rmask, N) * s_post * (1 - s_post)

    # h = raw * inv * alpha + bias: dL/draw = dh * alpha * inv; the RMS term for dx; bias and alpha partials.
    a_pre, a_post, a_res = tl.load(alpha_ptr), tl.load(alpha_ptr + 1), tl.load(alpha_ptr + 2)
    out = draw_ptr + rows64[:, None] * M
    gate_mask = rmask[:, None] & real[None, :]
    tl.store(out + i[None, :], dh_pre * a_pre * inv[:, None], mask=gate_mask)
    tl.store(out + N + i[None, :], dh_post * a_post * inv[:, None], mask=gate_mask)
    d_pre = tl.sum(dh_pre * raw_pre, axis=1)  # [BT]: sum over the group's columns of dh * raw
    d_post = tl.sum(dh_post * raw_post, axis=1)
    pid = tl.program_id(0).to(tl.int64)
    if RES == RES_SINKHORN:
        raw_res, L, col, block = _load_res_block(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N, TRANSPOSE)
        dL = _sinkhorn_bwd(L, dres_ptr, rows64, rmask, eps, PAIRS, N, SOFTMAX, SAFE_MAX)
        tl.store(draw_ptr + rows64[:, None, None] * M + col, dL * a_res * inv[:, None, None],
                 mask=rmask[:, None, None] & block)
        d_res = tl.sum(tl.sum(dL * raw_res, axis=2), axis=1)
        if TRANSPOSE:
            col2 = 2 * N + i[None, :] * N + i[:, None]
        else:
            col2 = 2 * N + i[:, None] * N + i[None, :]
        tl.store(dbias_ptr + pid * M + col2, tl.sum(dL, axis=0), mask=real[:, None] & real[None, :])
    elif KR > 0:  # the logits path or a mixture: dL [BT, BKR], then as for any logits
        raw_res, L, j, jm = _load_res_logits(raw_ptr, alpha_ptr, bias_ptr, rows64, rmask, inv, M, N, KR, BKR)
        if RES == RES_MIXTURE:
            res_offs, res_mask = mat_offsets(rows64, rmask, N)
            dL = _mixture_bwd(L, j, tl.load(dres_ptr + res_offs, mask=res_mask, other=0.0), MIX, BT, N)
        else:
            dL = tl.load(dres_ptr + rows64[:, None] * KR + j[None, :], mask=rmask[:, None] & jm[None, :], other=0.0)
        tl.store(draw_ptr + rows64[:, None] * M + 2 * N + j[None, :], dL * a_res * inv[:, None],
                 mask=rmask[:, None] & jm[None, :])
        d_res = tl.sum(dL * raw_res, axis=1)
        tl.store(dbias_ptr + pid * M + 2 * N + j, tl.sum(dL, axis=0), mask=jm)
    else:  # no res logits (H_res = I, on chip or from the map)
        d_res = tl.zeros((BT,), dtype=tl.float32)
    coef = -(a_pre * d_pre + a_post * d_post + a_res * d_res) * inv * inv * inv / K
    tl.store(coef_ptr + rows64, coef, mask=rmask)
    tl.store(dbias_ptr + pid * M + i, tl.sum(dh_pre, axis=0), mask=real)
    tl.store(dbias_ptr + pid * M + N + i, tl.sum(dh_post, axis=0), mask=real)
    tl.store(dalpha_ptr + pid * 3, tl.sum(d_pre * inv, axis=0))
    tl.store(dalpha_ptr + pid * 3 + 1, tl.sum(d_post * inv, axis=0))
    tl.store(dalpha_ptr + pid * 3 + 2, tl.sum(d_res * inv, axis=0))


@triton.jit
def _x_block(x_ptr, t0, T, ks, kmask, K, BT: tl.constexpr):
    """Tokens [t0, t0 + BT) of x's columns ks, in fp32: (rows, their mask, rows as int64, the [BT, BK] mask, x)."""
    rows = t0 + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    xmask = rmask[:, None] & kmask[None, :]
    return rows, rmask, rows64, xmask, tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=xmask,
                                               other=0.0).to(tl.float32)


@triton.jit
def _store_dx(dx, dx_ptr, hpre_ptr, dy_ptr, rows64, ks, xmask, K, C, N: tl.constexpr, FOLD_PRE: tl.constexpr,
              ACCUM: tl.constexpr):
    """Store a [BT, BK] block of dx (x columns ks) in dx's dtype: with FOLD_PRE plus pre's term H_pre[t, i] dy[t, c]
    (column k = i * C + c; hpre [T, N], dy [T, C]), with ACCUM plus the dx already there (post's term), summed in
    fp32 and rounded once."""
    if FOLD_PRE:
        stream = ks // C
        hp = tl.load(hpre_ptr + rows64[:, None] * N + stream[None, :], mask=xmask, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * C + (ks - stream * C)[None, :], mask=xmask, other=0.0)
        dx += hp * dy.to(tl.float32)
    if ACCUM:
        dx += tl.load(dx_ptr + rows64[:, None] * K + ks[None, :], mask=xmask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows64[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=xmask)


@triton.jit(do_not_specialize=["T", "T_PER"])
def _gemm_bwd(x_ptr, phi_ptr, draw_ptr, coef_ptr, dx_ptr, dphi_ptr, hpre_ptr, dy_ptr, T, K, M, C, stride_pk,
              stride_pm, T_PER, N: tl.constexpr, ACCUM: tl.constexpr, FOLD_PRE: tl.constexpr, DX: tl.constexpr,
              BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """One pass over x: dx = draw @ phi^T + coef * x, and dphi partial sums over this program's tokens.
    Without DX only dphi (the previous sublayer's chained post backward computes this dx, see ops/sublayer.py).

    FOLD_PRE adds pre's term H_pre[t, i] dy[t, c] (x column k = i * C + c; hpre [T, N], dy [T, C]); ACCUM adds
    the dx already in dx_ptr (post's term) and writes the sum back in place: each element is read and written
    by this program only, once, so the one rounding to dx's dtype happens after all terms are summed in fp32."""
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < K
    cols = tl.arange(0, BM)
    cmask = cols < M
    p = tl.load(phi_ptr + ks[:, None] * stride_pk + cols[None, :] * stride_pm,
                mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BK, BM), dtype=tl.float32)
    t_begin = pid_t * T_PER
    for t0 in range(t_begin, t_begin + T_PER, BT):
        rows, rmask, rows64, xmask, x = _x_block(x_ptr, t0, T, ks, kmask, K, BT)
        d = tl.load(draw_ptr + rows64[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if DX:
            c = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
            dx = tl.dot(d, tl.trans(p), input_precision=PREC) + c[:, None] * x
            _store_dx(dx, dx_ptr, hpre_ptr, dy_ptr, rows64, ks, xmask, K, C, N, FOLD_PRE, ACCUM)
        acc = tl.dot(tl.trans(x), d, acc, input_precision=PREC)
    out = dphi_ptr + pid_t.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :]
    tl.store(out, acc, mask=kmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["T", "T_PER"])
def _gemm_bwd_chunked(x_ptr, phi_ptr, draw_ptr, coef_ptr, dx_ptr, dphi_ptr, hpre_ptr, dy_ptr, T, K, M, C, stride_pk,
                      stride_pm, T_PER, N: tl.constexpr, ACCUM: tl.constexpr, FOLD_PRE: tl.constexpr,
                      DX: tl.constexpr, DPHI: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                      NUM_M: tl.constexpr, PREC: tl.constexpr):
    """:func:`_gemm_bwd` for a GEMM wider than one tile (Sinkhorn at n = 9..16: M = 2n + n^2 = 99..288) in NUM_M
    column chunks of BM: each token step reloads phi's [BK, BM] chunks (L1/L2), dx sums the chunks' products in
    chunk order, dphi is held per chunk (a tuple). Without DPHI only dx, without DX only dphi (fp32 streams run the
    two as separate passes: one pass spilled)."""
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    ks = pid_k * BK + tl.arange(0, BK)
    kmask = ks < K
    acc = ()
    if DPHI:
        for mc in tl.static_range(NUM_M):
            acc = acc + (tl.zeros((BK, BM), dtype=tl.float32),)
    t_begin = pid_t * T_PER
    for t0 in range(t_begin, t_begin + T_PER, BT):
        rows, rmask, rows64, xmask, x = _x_block(x_ptr, t0, T, ks, kmask, K, BT)
        new_acc = ()
        for mc in tl.static_range(NUM_M):
            cols = mc * BM + tl.arange(0, BM)
            cmask = cols < M
            d = tl.load(draw_ptr + rows64[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            if DX:
                p = tl.load(phi_ptr + ks[:, None] * stride_pk + cols[None, :] * stride_pm,
                            mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                if mc == 0:
                    dx = tl.dot(d, tl.trans(p), input_precision=PREC)
                else:
                    dx = tl.dot(d, tl.trans(p), dx, input_precision=PREC)
            if DPHI:
                new_acc = new_acc + (tl.dot(tl.trans(x), d, acc[mc], input_precision=PREC),)
        if DPHI:
            acc = new_acc
        if DX:
            c = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
            _store_dx(dx + c[:, None] * x, dx_ptr, hpre_ptr, dy_ptr, rows64, ks, xmask, K, C, N, FOLD_PRE, ACCUM)
    if DPHI:
        for mc in tl.static_range(NUM_M):
            cols = mc * BM + tl.arange(0, BM)
            out = dphi_ptr + pid_t.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :]
            tl.store(out, acc[mc], mask=kmask[:, None] & (cols < M)[None, :])


# Block sizes per n, checked by the compile gate (tests/test_kernel_compile.py, `python -m torch_mhc.ops.aot`):
# (tokens, K per step, warps) of the coefficient GEMMs; tokens per program of the epilogues. The forward
# GEMM takes 64 tokens per program: every program reads all of phi (from L2), so per token half the
# phi traffic of 32; the backward holds a [K, M] slice of phi and of dphi per program, so n = 8 (M = 80,
# padded to 128) takes K slices of 32 to stay clear of spills.
# n = 9..16 (Sinkhorn's M = 2n + n^2 = 99..288 columns): the forward in GEMM_TILE_M-column tiles (programs side by
# side per token block, sharing x through L2), 32 tokens (64 ran 240 registers on sm_80 at n = 9, 10: M not
# 16-aligned); the backward in BWD_CHUNK_M-column chunks (_gemm_bwd_chunked; 64-column chunks, and one 128-column
# tile, spilled), 8 warps.
GEMM_FWD_BLOCKS = {1: (64, 64, 4), 2: (64, 64, 4), 4: (64, 64, 4), 8: (64, 32, 4), 16: (32, 32, 4)}
GEMM_BWD_BLOCKS = {1: (32, 64, 4), 2: (32, 64, 4), 4: (32, 64, 4), 8: (32, 32, 4), 16: (32, 16, 8)}
# fp32 streams (FP32_DOT = tf32x3: three tf32 products per dot, each operand split in a high and a low part, twice
# the operand registers): 8 warps, 16 tokens per backward step, 32 tokens at n = 8 forward. With the bf16 table the
# forward ran 195-255 registers (n = 8 spilled 112 bytes on sm_80) and the backward spilled at n = 4 (sm_80) and
# n = 8; with these: forward 125-180, backward 58-255 (sm_80's mma.sync holds the split operands in registers), no
# spills (compile gate; docs/design.md).
GEMM_FWD_BLOCKS_FP32 = {1: (64, 64, 8), 2: (64, 64, 8), 4: (64, 64, 8), 8: (32, 32, 8), 16: (32, 32, 8)}
GEMM_BWD_BLOCKS_FP32 = {1: (16, 64, 8), 2: (16, 64, 8), 4: (16, 64, 8), 8: (16, 32, 8), 16: (16, 16, 8)}
GEMM_TILE_M, BWD_CHUNK_M = 128, 32
# n = 9..16: the Sinkhorn epilogue on one token per program (the backward keeps every step's row or column sums;
# with 2 tokens it ran 162-197 registers, with 4 it spilled 24-248 bytes).
EPI_BLOCK = {1: 16, 2: 16, 4: 16, 8: 8, 16: 1}
FILL = 264  # programs that fill an H100 (2 per SM)
# Input precision of every tl.dot (the coefficient GEMMs here; the read-ahead post and the chained post backward in
# streams.py), by the streams' dtype. fp32 streams: FP32_DOT, products of the fp32 values (tf32 would truncate x and
# phi to 10 mantissa bits: 1-5x the fp32 tests' tolerances, see docs/design.md for the register cost of each
# choice); bf16/fp16 streams: tf32 tensor cores with fp32 accumulation (their x is exact in tf32; phi and the fp32
# gradient rows lose bits below the streams' own rounding). The interpreter ignores it (exact fp32).
FP32_DOT = "tf32x3"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' tl.dot for streams of ``dtype``."""
    return FP32_DOT if dtype == torch.float32 else "tf32"


def gemm_fwd_split(n_t: int, K: int, bk: int, batch_invariant: bool = False) -> tuple[int, int]:
    """(K slices, columns per slice) of the forward coefficient GEMM: with fewer than half of FILL token blocks
    (e.g. 2048 tokens: 32 blocks for 132 SMs of an H100), K is split so that about FILL programs run, each over at
    least 4 K steps; otherwise (1, K). ``batch_invariant``: always (1, K), so a token's sum over K runs in one order
    (BK columns a step, 0 to K) whatever the token count (small batches then run fewer programs)."""
    if batch_invariant or 2 * n_t >= FILL:
        return 1, K
    split = min(triton.cdiv(FILL, n_t), K // (4 * bk))
    if split < 2:
        return 1, K
    k_per = triton.cdiv(triton.cdiv(K, split), bk) * bk
    return triton.cdiv(K, k_per), k_per


def block_m(m: int) -> int:
    """Columns of the one tile covering a GEMM M columns wide (n <= 8): the next power of two, at least 16 (tl.dot's
    minimum)."""
    return max(16, triton.next_power_of_2(m))


def gemm_fwd_tiles(n: int, m: int) -> tuple[int, int]:
    """(columns per tile, tiles side by side) of the forward GEMM: one tile at n <= 8, GEMM_TILE_M-column tiles at
    n = 9..16."""
    return (block_m(m), 1) if n <= 8 else (GEMM_TILE_M, triton.cdiv(m, GEMM_TILE_M))


def _sinkhorn_pairs(iters: int, v4: bool) -> int:
    """The kernels run an optional leading row step (V4's softmax start) then (col, row) pairs: check that against
    the rule."""
    steps = sinkhorn_steps(iters, "softmax" if v4 else "exp")
    lead = [ROW] if v4 else []
    pairs = (len(steps) - len(lead)) // 2
    if steps != lead + [COL, ROW] * pairs:
        raise NotImplementedError(f"fused Sinkhorn: unsupported step order {steps}")
    return pairs


@dataclass(frozen=True)
class Epilogue:
    """What the epilogue kernels compute for n streams besides the GEMM: the gates (``pre_eps``: H_pre + eps, V4)
    and the res part (``res``): ``"sinkhorn"`` on chip (``pairs`` (col, row) pairs after V4's ``softmax`` start and
    its row step; ``transpose``: the logits are V4's comb), ``"identity"`` (H_res = I, k = 0), ``"mixture"`` (the
    closed form of ``mix``, ((kind, size), ...) factors: see ``MIX_KINDS``), or ``"logits"``: the k res logits
    handed out (a map the kernels do not know runs in PyTorch between the two kernels). ``M = 2n + k`` columns of
    phi."""

    n: int
    k: int
    pre_eps: bool = False
    res: str = "logits"
    pairs: int = 0
    softmax: bool = False
    transpose: bool = False
    mix: tuple = ()

    @property
    def M(self) -> int:
        return 2 * self.n + self.k

    @property
    def on_chip(self) -> bool:
        """Whether the kernels hand out H_res [T, n, n] (else the res logits [T, k])."""
        return self.res != "logits"

    def constexprs(self) -> dict:
        res = {"sinkhorn": RES_SINKHORN, "logits": RES_LOGITS, "identity": RES_IDENTITY, "mixture": RES_MIXTURE}
        return dict(N=self.n, RES=res[self.res].value, SOFTMAX=self.softmax, TRANSPOSE=self.transpose, KR=self.k,
                    BKR=triton.next_power_of_2(max(1, self.k)), SAFE_MAX=EXP_SAFE_MAX, MIX=self._mix_layout())

    def _mix_layout(self) -> tuple:
        """The kernels' MIX: (kind, size, patterns, stride, first logit column) per factor; the stride is the
        product of the later factors' sizes (Kronecker layout: the first factor varies slowest)."""
        out, stride, offset = [], self.n, 0
        for kind, f in self.mix:
            stride //= f
            out.append((kind, f, pattern_count(kind, f), stride, offset))
            offset += pattern_count(kind, f)
        return tuple(out)


def make_epilogue(n: int, spec: tuple, pre_eps: bool) -> Epilogue:
    """``spec`` (see ``ops.kernel_spec``): ("sinkhorn", iters, softmax start, transposed), ("identity",),
    ("mixture", ((kind, size), ...)) (the factors' sizes multiply to n) or ("logits", k)."""
    if spec[0] == "sinkhorn":
        _, iters, softmax, transpose = spec
        return Epilogue(n, n * n, pre_eps, "sinkhorn", _sinkhorn_pairs(iters, softmax), softmax, transpose)
    if spec[0] == "logits":
        return Epilogue(n, spec[1], pre_eps)
    if spec == ("identity",):
        return Epilogue(n, 0, pre_eps, "identity")
    if spec[0] == "mixture" and len(spec) == 2:
        factors = tuple(tuple(f) for f in spec[1])
        if (not factors or any(len(f) != 2 or f[0] not in MIX_KINDS or not isinstance(f[1], int) or f[1] < 1
                               for f in factors) or math.prod(f[1] for f in factors) != n):
            raise ValueError(f"epilogue spec {spec!r}: a mixture takes ((kind, size), ...) factors with kind in "
                             f"{MIX_KINDS} and sizes >= 1 whose product is n = {n}")
        return Epilogue(n, sum(pattern_count(*f) for f in factors), pre_eps, "mixture", mix=factors)
    raise ValueError(f"unknown epilogue spec {spec!r}")


@on_tensors_device
def coefficients_forward(x2d, phi, bias, alpha, epi: Epilogue, eps: float, raw_inv=None, batch_invariant: bool = False):
    """x2d [T, n*C] -> (H_pre [T, n], H_post [T, n], res, saved): fp32; res is H_res [T, n, n] (on chip) or the
    res logits [T, k] (``epi.on_chip``); ``saved`` is what :func:`coefficients_backward` needs besides x2d and phi
    (fp32 bias and alpha, raw GEMM output, inv_rms). ``raw_inv``: (x2d @ phi [T, M], inv_rms [T]) already computed
    (by the previous sublayer's read-ahead post). ``batch_invariant``: no token-count-dependent split of K (see
    :func:`gemm_fwd_split`): each token's results are the same bits alone or in any batch."""
    T, K = x2d.shape
    n, M = epi.n, epi.M
    dev = x2d.device
    bias32, alpha32 = bias.float().contiguous(), alpha.float().contiguous()
    res_shape = (n, n) if epi.on_chip else (epi.k,)
    if T == 0:  # an empty batch: nothing to launch (the grids below would be empty, the split choice divides by 0)
        raw, inv = raw_inv if raw_inv is not None else (x2d.new_empty(0, M, dtype=torch.float32),
                                                          x2d.new_empty(0, dtype=torch.float32))
        empty = x2d.new_empty(0, n, dtype=torch.float32)
        return empty, empty.clone(), x2d.new_empty(0, *res_shape, dtype=torch.float32), (bias32, alpha32, raw, inv)
    if raw_inv is not None:
        raw, inv = raw_inv
    else:
        raw = torch.empty(T, M, device=dev, dtype=torch.float32)
        inv = torch.empty(T, device=dev, dtype=torch.float32)
        bt, bk, warps = padded_entry(GEMM_FWD_BLOCKS_FP32 if x2d.dtype == torch.float32 else GEMM_FWD_BLOCKS, n)
        if K % 16:  # rows of x not 16-aligned: scalar loads, one address register each; halve the tile
            bt = 32
        n_t = triton.cdiv(T, bt)
        bm, num_m = gemm_fwd_tiles(n, M)
        split, k_per = gemm_fwd_split(n_t * num_m, K, bk, batch_invariant)
        if split == 1:
            _gemm_fwd[(n_t * num_m, 1)](
                x2d, phi, raw, inv, T, K, M, phi.stride(0), phi.stride(1), eps, K,
                BT=bt, BK=bk, BM=bm, PREC=dot_precision(x2d.dtype), SPLIT=False, NUM_M=num_m, num_warps=warps)
        else:  # few token blocks: K slices side by side fill the GPU; partials summed in a fixed order
            raw_part = torch.empty(split, T, M, device=dev, dtype=torch.float32)
            ss_part = torch.empty(split, T, device=dev, dtype=torch.float32)
            _gemm_fwd[(n_t * num_m, split)](
                x2d, phi, raw_part, ss_part, T, K, M, phi.stride(0), phi.stride(1), eps, k_per,
                BT=bt, BK=bk, BM=bm, PREC=dot_precision(x2d.dtype), SPLIT=True, NUM_M=num_m, num_warps=warps)
            torch.sum(raw_part, 0, out=raw)
            torch.sum(ss_part, 0, out=inv).div_(K).add_(eps).sqrt_().reciprocal_()
    pre = torch.empty(T, n, device=dev, dtype=torch.float32)
    post = torch.empty(T, n, device=dev, dtype=torch.float32)
    res = torch.empty(T, *res_shape, device=dev, dtype=torch.float32)
    bt_epi = padded_entry(EPI_BLOCK, n)
    _epilogue_fwd[(triton.cdiv(T, bt_epi),)](
        raw, inv, alpha32, bias32, pre, post, res, T, M, epi.pairs, eps,
        PRE_EPS=epi.pre_eps, BT=bt_epi, **epi.constexprs())
    return pre, post, res, (bias32, alpha32, raw, inv)


@on_tensors_device
def epilogue_backward(saved, epi: Epilogue, eps: float, K: int, dpre, dpost, dres):
    """Gradients of (H_pre [T, n], H_post [T, n], res (H_res [T, n, n] or the res logits [T, k], as
    :func:`coefficients_forward` returned it); fp32, any may be None) -> (draw [T, M], coef [T], dbias [M],
    dalpha [3]), fp32: dL/draw, the RMS term of dx per element of x (dx = draw @ phi^T + coef * x), and the bias
    and alpha gradients. K = n * C."""
    bias32, alpha32, raw, inv = saved
    T, M = raw.shape
    n = epi.n
    dev = raw.device
    dpre = torch.zeros(T, n, device=dev) if dpre is None else dpre.float().contiguous()
    dpost = torch.zeros(T, n, device=dev) if dpost is None else dpost.float().contiguous()
    res_shape = (n, n) if epi.on_chip else (epi.k,)
    dres = torch.zeros(T, *res_shape, device=dev) if dres is None else dres.float().contiguous()
    bt_epi = padded_entry(EPI_BLOCK, n)
    n_epi = triton.cdiv(T, bt_epi)
    draw = torch.empty(T, M, device=dev, dtype=torch.float32)
    coef = torch.empty(T, device=dev, dtype=torch.float32)
    if T == 0:
        return draw, coef, torch.zeros(M, device=dev), torch.zeros(3, device=dev)
    dbias_part = torch.empty(n_epi, M, device=dev, dtype=torch.float32)
    dalpha_part = torch.empty(n_epi, 3, device=dev, dtype=torch.float32)
    _epilogue_bwd[(n_epi,)](
        raw, inv, alpha32, bias32, dpre, dpost, dres, draw, coef, dbias_part, dalpha_part, T, M, K, eps,
        PAIRS=epi.pairs, BT=bt_epi, **epi.constexprs())
    return draw, coef, dbias_part.sum(0), dalpha_part.sum(0)


@on_tensors_device
def gemm_backward(x2d, phi, draw, coef, n: int, dx=None, pre_term=None, write_dx: bool = True):
    """x2d [T, n*C], draw [T, M], coef [T] -> (dx [T, n*C] in x's dtype or None without ``write_dx``, dphi
    [n*C, M] fp32), one pass over x (two for fp32 streams at n > 8). ``dx``: a buffer already holding another term
    of x's gradient, added to in place (and returned). ``pre_term``: (H_pre [T, n], dy [T, C]), pre's term
    H_pre[i] dy, added too."""
    T, K = x2d.shape
    M = draw.shape[1]
    accum = dx is not None
    if write_dx and not accum:
        dx = torch.empty_like(x2d)
    if T == 0:  # an empty batch: no tokens, a zero dphi (the token split below would divide by 0)
        return dx, torch.zeros(K, M, device=x2d.device, dtype=torch.float32)
    h_pre, dy = pre_term if pre_term is not None else (draw, draw)  # unused pointers without FOLD_PRE
    bt, bk, warps = padded_entry(GEMM_BWD_BLOCKS_FP32 if x2d.dtype == torch.float32 else GEMM_BWD_BLOCKS, n)
    if write_dx and pre_term is not None and (n > 1 or K % 16):  # the fold's gathers of H_pre and dy: 16 tokens
        bt = max(16, bt // 2)  # (compile gate: 32 spill at n = 1 with unaligned rows and at n = 4 on sm_80; 16 at
        # n = 1 on sm_80); tl.dot needs 16
    n_k = triton.cdiv(K, bk)
    n_tblocks = triton.cdiv(T, bt)
    split_t = max(1, min(n_tblocks, triton.cdiv(FILL, n_k)))  # ~2 programs per SM on an H100
    t_per = triton.cdiv(n_tblocks, split_t) * bt
    split_t = triton.cdiv(T, t_per)
    dphi_part = torch.empty(split_t, K, M, device=x2d.device, dtype=torch.float32)
    args = (x2d, phi, draw, coef, x2d if dx is None else dx, dphi_part, h_pre, dy, T, K, M, K // n, phi.stride(0),
            phi.stride(1), t_per)
    if n <= 8:  # one tile of M (at most 128 columns), phi's slice held
        _gemm_bwd[(n_k, split_t)](
            *args, N=n, ACCUM=accum and write_dx, FOLD_PRE=write_dx and pre_term is not None, DX=write_dx, BT=bt,
            BK=bk, BM=block_m(M), PREC=dot_precision(x2d.dtype), num_warps=warps)
        return dx, dphi_part.sum(0)
    # n = 9..16: chunks of M; fp32 streams run dx and dphi as two passes (one spilled 48-64 bytes on sm_90 with
    # tf32x3), each reading x and draw
    fp32 = x2d.dtype == torch.float32
    passes = [(True, False), (False, True)] if write_dx and fp32 else [(write_dx, True)]
    for with_dx, with_dphi in passes:
        _gemm_bwd_chunked[(n_k, split_t)](
            *args, N=n, ACCUM=accum and with_dx, FOLD_PRE=with_dx and pre_term is not None, DX=with_dx,
            DPHI=with_dphi, BT=bt, BK=bk, BM=BWD_CHUNK_M, NUM_M=triton.cdiv(M, BWD_CHUNK_M),
            PREC=dot_precision(x2d.dtype), num_warps=warps)
    return dx, dphi_part.sum(0)


def coefficients_backward(x2d, phi, saved, epi: Epilogue, eps: float, dpre, dpost, dres, dx=None, pre_term=None):
    """Gradients (fp32 [T, n], [T, n], res as returned, any may be None) -> (dx [T, n*C] in x's dtype, dphi, dbias,
    dalpha in fp32): :func:`epilogue_backward` then :func:`gemm_backward` (``dx``, ``pre_term``: see there)."""
    draw, coef, dbias, dalpha = epilogue_backward(saved, epi, eps, x2d.shape[1], dpre, dpost, dres)
    dx, dphi = gemm_backward(x2d, phi, draw, coef, epi.n, dx=dx, pre_term=pre_term)
    return dx, dphi, dbias, dalpha


class FusedCoefficients(torch.autograd.Function):
    """x2d [T, n*C], phi [n*C, M], bias [M], alpha [3] -> (H_pre [T, n], H_post [T, n], res): res is H_res
    [T, n, n] (on chip) or the res logits [T, k] (see :class:`Epilogue`)."""

    @staticmethod
    def forward(ctx, x2d, phi, bias, alpha, epi: Epilogue, eps: float, batch_invariant: bool = False):
        pre, post, res, saved = coefficients_forward(x2d, phi, bias, alpha, epi, eps, batch_invariant=batch_invariant)
        ctx.save_for_backward(x2d, phi, *saved)
        ctx.config = (epi, eps, alpha.dtype, bias.dtype)
        return pre, post, res

    @staticmethod
    def backward(ctx, dpre, dpost, dres):
        x2d, phi, *saved = ctx.saved_tensors
        epi, eps, alpha_dtype, bias_dtype = ctx.config
        dx, dphi, dbias, dalpha = coefficients_backward(x2d, phi, saved, epi, eps, dpre, dpost, dres)
        return dx, dphi.to(phi.dtype), dbias.to(bias_dtype), dalpha.to(alpha_dtype), None, None, None


def fused_mhc_coefficients(x, phi, bias, alpha, *, eps: float, variant: str, spec: tuple, h_res=None,
                           batch_invariant: bool = False):
    """x ``[..., n, C]`` -> fp32 (H_pre ``[..., n]``, H_post ``[..., n]``, H_res ``[..., n, n]``). ``spec``: what the
    epilogue computes (``ops.kernel_spec``); for ("logits", k) ``h_res`` (the map) runs on the logits here.
    ``batch_invariant``: see :func:`coefficients_forward`."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x2d = x.reshape(-1, n * C).contiguous()
    epi = make_epilogue(n, spec, variant == "deepseek-v4")
    pre, post, res = FusedCoefficients.apply(x2d, phi, bias, alpha, epi, eps, batch_invariant)
    res = res.view(*lead, n, n) if epi.on_chip else h_res(res.view(*lead, epi.k))
    return pre.view(*lead, n), post.view(*lead, n), res
