"""Fused mHC coefficients: ``x [T, n*C] -> H_pre [T, n], H_post [T, n], H_res [T, n, n]`` (fp32).

Forward, two kernels:
  1. ``_gemm_fwd``: one pass over x computes ``raw = x @ phi`` (tensor cores, tf32, fp32 accumulate)
     and the sum of squares, giving ``inv_rms``;
  2. ``_epilogue_fwd``: ``h = raw * inv_rms * alpha + bias``, sigmoid / 2 sigmoid, and Sinkhorn-Knopp
     on each token's n x n block in registers.
Backward, two kernels:
  1. ``_epilogue_bwd``: sigmoid derivatives and the Sinkhorn backward, recomputing the iterations
     on-chip (nothing per iteration is stored: step k is recomputed from the logits);
  2. ``_gemm_bwd``: one pass over x gives both ``dx = draw @ phi^T + c * x`` and partial ``dphi = x^T draw``.
The small per-token ``[T, 2n + n^2]`` algebra between them (bias/alpha gradients) runs in PyTorch.
Same math as :func:`torch_mhc.nn.functional.mhc_coefficients`; tested against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_mhc.numerics import EXP_SAFE_MAX, sinkhorn_steps
from torch_mhc.ops.blocks import load_vec, mat_offsets, token_block


@triton.jit
def _gemm_fwd(x_ptr, phi_ptr, raw_ptr, inv_ptr, T, K, M, stride_pk, stride_pm, eps,
              BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BM)
    cmask = cols < M
    acc = tl.zeros((BT, BM), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        x = x.to(tl.float32)
        p = tl.load(phi_ptr + ks[:, None] * stride_pk + cols[None, :] * stride_pm,
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, p, acc, input_precision=PREC)
        ss += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.sqrt(ss / K + eps)
    tl.store(raw_ptr + rows64[:, None] * M + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])
    tl.store(inv_ptr + rows, inv, mask=rmask)


@triton.jit
def _sk_start(L, eps, SOFTMAX: tl.constexpr, SAFE_MAX: tl.constexpr):
    """[BT, N, N] logits -> starting matrix (exp, or softmax over rows i for each column j, + eps)."""
    if SOFTMAX:
        e = tl.exp(L - tl.max(L, axis=1)[:, None, :])
        m = e / tl.sum(e, axis=1)[:, None, :] + eps
    else:
        shift = tl.maximum(tl.max(tl.max(L, axis=2), axis=1) - SAFE_MAX, 0.0)
        m = tl.exp(L - shift[:, None, None])
    return m


@triton.jit
def _sk_step(m, eps, is_col):
    """One normalisation: columns (sum over i) if is_col else rows (sum over j)."""
    if is_col:
        m = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    else:
        m = m / (tl.sum(m, axis=2)[:, :, None] + eps)
    return m


@triton.jit
def _load_epilogue_inputs(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M,
                          N: tl.constexpr, V4: tl.constexpr):
    """Per-token logits: pre [BT, N], post [BT, N], res [BT, N, N] (paper orientation), and the
    columns of raw that res came from."""
    i = tl.arange(0, N)
    inv = tl.load(inv_ptr + rows64, mask=rmask, other=1.0)
    base = raw_ptr + rows64[:, None] * M
    h_pre = tl.load(base + i[None, :], mask=rmask[:, None], other=0.0) * inv[:, None] * tl.load(alpha_ptr) \
        + tl.load(bias_ptr + i)[None, :]
    h_post = tl.load(base + N + i[None, :], mask=rmask[:, None], other=0.0) * inv[:, None] * tl.load(alpha_ptr + 1) \
        + tl.load(bias_ptr + N + i)[None, :]
    r = i[None, :, None]
    c = i[None, None, :]
    if V4:  # V4's comb[j, i] = H_res[i, j]
        col = 2 * N + c * N + r
    else:
        col = 2 * N + r * N + c
    raw_res = tl.load(raw_ptr + rows64[:, None, None] * M + col, mask=rmask[:, None, None], other=0.0)
    res = raw_res * inv[:, None, None] * tl.load(alpha_ptr + 2) + tl.load(bias_ptr + col)
    return h_pre, h_post, res, col


@triton.jit
def _epilogue_fwd(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, T, M, eps,
                  N: tl.constexpr, NSTEPS: tl.constexpr, V4: tl.constexpr, BT: tl.constexpr,
                  SAFE_MAX: tl.constexpr):
    rows64, rmask = token_block(T, BT)
    i = tl.arange(0, N)
    h_pre, h_post, L, col = _load_epilogue_inputs(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M, N, V4)
    pre = tl.sigmoid(h_pre)
    if V4:
        pre += eps
    tl.store(pre_ptr + rows64[:, None] * N + i[None, :], pre, mask=rmask[:, None])
    tl.store(post_ptr + rows64[:, None] * N + i[None, :], 2.0 * tl.sigmoid(h_post), mask=rmask[:, None])
    m = _sk_start(L, eps, V4, SAFE_MAX)
    parity: tl.constexpr = 1 if V4 else 0  # paper: step 0 normalises columns; V4 (transposed): rows
    for s in range(NSTEPS):
        m = _sk_step(m, eps, (s % 2) == parity)
    tl.store(res_ptr + mat_offsets(rows64, N), m, mask=rmask[:, None, None])


@triton.jit
def _epilogue_bwd(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, dpre_ptr, dpost_ptr, dres_ptr, dh_ptr, T, M, eps,
                  N: tl.constexpr, NSTEPS: tl.constexpr, V4: tl.constexpr, BT: tl.constexpr,
                  SAFE_MAX: tl.constexpr):
    """dh [T, M]: gradient w.r.t. h = raw * inv * alpha + bias, in the columns of phi."""
    rows64, rmask = token_block(T, BT)
    i = tl.arange(0, N)
    h_pre, h_post, L, col = _load_epilogue_inputs(raw_ptr, inv_ptr, alpha_ptr, bias_ptr, rows64, rmask, M, N, V4)
    s_pre = tl.sigmoid(h_pre)
    s_post = tl.sigmoid(h_post)
    g_pre = load_vec(dpre_ptr, rows64, rmask, N)
    g_post = load_vec(dpost_ptr, rows64, rmask, N)
    tl.store(dh_ptr + rows64[:, None] * M + i[None, :], g_pre * s_pre * (1 - s_pre), mask=rmask[:, None])
    tl.store(dh_ptr + rows64[:, None] * M + N + i[None, :], 2.0 * g_post * s_post * (1 - s_post), mask=rmask[:, None])
    g = tl.load(dres_ptr + mat_offsets(rows64, N), mask=rmask[:, None, None], other=0.0)
    parity: tl.constexpr = 1 if V4 else 0
    for kk in range(NSTEPS):
        k = NSTEPS - 1 - kk
        m = _sk_start(L, eps, V4, SAFE_MAX)  # recompute the input of step k
        for s in range(k):
            m = _sk_step(m, eps, (s % 2) == parity)
        if (k % 2) == parity:
            den = tl.sum(m, axis=1)[:, None, :] + eps
            g = g / den - tl.sum(g * m, axis=1)[:, None, :] / (den * den)
        else:
            den = tl.sum(m, axis=2)[:, :, None] + eps
            g = g / den - tl.sum(g * m, axis=2)[:, :, None] / (den * den)
    if V4:
        e = tl.exp(L - tl.max(L, axis=1)[:, None, :])
        sm = e / tl.sum(e, axis=1)[:, None, :]
        g = sm * (g - tl.sum(g * sm, axis=1)[:, None, :])
    else:
        shift = tl.maximum(tl.max(tl.max(L, axis=2), axis=1) - SAFE_MAX, 0.0)
        g = g * tl.exp(L - shift[:, None, None])
    tl.store(dh_ptr + rows64[:, None, None] * M + col, g, mask=rmask[:, None, None])


@triton.jit
def _gemm_bwd(x_ptr, phi_ptr, draw_ptr, coef_ptr, dx_ptr, dphi_ptr, T, K, M, stride_pk, stride_pm, T_PER,
              BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """One pass over x: dx = draw @ phi^T + coef * x, and dphi partial sums over this program's tokens."""
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
        rows = t0 + tl.arange(0, BT)
        rmask = rows < T
        rows64 = rows.to(tl.int64)
        xmask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=xmask, other=0.0).to(tl.float32)
        d = tl.load(draw_ptr + rows64[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        c = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        dx = tl.dot(d, tl.trans(p), input_precision=PREC) + c[:, None] * x
        tl.store(dx_ptr + rows64[:, None] * K + ks[None, :], dx.to(dx_ptr.dtype.element_ty), mask=xmask)
        acc = tl.dot(tl.trans(x), d, acc, input_precision=PREC)
    out = dphi_ptr + pid_t.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :]
    tl.store(out, acc, mask=kmask[:, None] & cmask[None, :])


BT_GEMM, BK_GEMM, BT_EPI = 32, 64, 16


def _precision(x: torch.Tensor) -> str:
    return "tf32"  # the interpreter ignores it (exact fp32): CPU tests and GPU compile alike


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _alpha_columns(alpha: torch.Tensor, n: int) -> torch.Tensor:
    return torch.repeat_interleave(alpha.float(), torch.tensor([n, n, n * n], device=alpha.device))


class FusedCoefficients(torch.autograd.Function):
    """x2d [T, n*C], phi [n*C, M], bias [M], alpha [3] -> (H_pre [T, n], H_post [T, n], H_res [T, n, n])."""

    @staticmethod
    def forward(ctx, x2d, phi, bias, alpha, n: int, iters: int, eps: float, v4: bool):
        T, K = x2d.shape
        M = 2 * n + n * n
        dev = x2d.device
        raw = torch.empty(T, M, device=dev, dtype=torch.float32)
        inv = torch.empty(T, device=dev, dtype=torch.float32)
        _gemm_fwd[(triton.cdiv(T, BT_GEMM),)](
            x2d, phi, raw, inv, T, K, M, phi.stride(0), phi.stride(1), eps,
            BT=BT_GEMM, BK=BK_GEMM, BM=_block_m(M), PREC=_precision(x2d))
        bias32, alpha32 = bias.float().contiguous(), alpha.float().contiguous()
        pre = torch.empty(T, n, device=dev, dtype=torch.float32)
        post = torch.empty(T, n, device=dev, dtype=torch.float32)
        res = torch.empty(T, n, n, device=dev, dtype=torch.float32)
        nsteps = len(sinkhorn_steps(iters, "softmax" if v4 else "exp"))
        _epilogue_fwd[(triton.cdiv(T, BT_EPI),)](
            raw, inv, alpha32, bias32, pre, post, res, T, M, eps,
            N=n, NSTEPS=nsteps, V4=v4, BT=BT_EPI, SAFE_MAX=EXP_SAFE_MAX)
        ctx.save_for_backward(x2d, phi, bias32, alpha32, raw, inv)
        ctx.config = (n, nsteps, eps, v4, alpha.dtype, bias.dtype)
        return pre, post, res

    @staticmethod
    def backward(ctx, dpre, dpost, dres):
        x2d, phi, bias32, alpha32, raw, inv = ctx.saved_tensors
        n, nsteps, eps, v4, alpha_dtype, bias_dtype = ctx.config
        T, K = x2d.shape
        M = 2 * n + n * n
        dev = x2d.device
        dpre = torch.zeros(T, n, device=dev) if dpre is None else dpre.float().contiguous()
        dpost = torch.zeros(T, n, device=dev) if dpost is None else dpost.float().contiguous()
        dres = torch.zeros(T, n, n, device=dev) if dres is None else dres.float().contiguous()
        dh = torch.empty(T, M, device=dev, dtype=torch.float32)
        _epilogue_bwd[(triton.cdiv(T, BT_EPI),)](
            raw, inv, alpha32, bias32, dpre, dpost, dres, dh, T, M, eps,
            N=n, NSTEPS=nsteps, V4=v4, BT=BT_EPI, SAFE_MAX=EXP_SAFE_MAX)
        scale = _alpha_columns(alpha32, n)
        draw = dh * scale * inv[:, None]
        coef = -(dh * raw * scale).sum(1) * inv.pow(3) / K
        dalpha_cols = (dh * raw * inv[:, None]).sum(0)
        dalpha = torch.stack([dalpha_cols[:n].sum(), dalpha_cols[n : 2 * n].sum(), dalpha_cols[2 * n :].sum()])
        dx = torch.empty_like(x2d)
        n_k = triton.cdiv(K, BK_GEMM)
        n_tblocks = triton.cdiv(T, BT_GEMM)
        split_t = max(1, min(n_tblocks, triton.cdiv(264, n_k)))  # ~2 programs per SM on an H100
        t_per = triton.cdiv(n_tblocks, split_t) * BT_GEMM
        split_t = triton.cdiv(T, t_per)
        dphi_part = torch.empty(split_t, K, M, device=dev, dtype=torch.float32)
        _gemm_bwd[(n_k, split_t)](
            x2d, phi, draw, coef, dx, dphi_part, T, K, M, phi.stride(0), phi.stride(1), t_per,
            BT=BT_GEMM, BK=BK_GEMM, BM=_block_m(M), PREC=_precision(x2d))
        dphi = dphi_part.sum(0).to(phi.dtype)
        return dx, dphi, dh.sum(0).to(bias_dtype), dalpha.to(alpha_dtype), None, None, None, None


def fused_mhc_coefficients(x, phi, bias, alpha, *, iters: int, eps: float, variant: str):
    """x ``[..., n, C]`` -> fp32 (H_pre ``[..., n]``, H_post ``[..., n]``, H_res ``[..., n, n]``)."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    x2d = x.reshape(-1, n * C)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    pre, post, res = FusedCoefficients.apply(x2d, phi, bias, alpha, n, iters, eps, variant == "deepseek-v4")
    return pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)
