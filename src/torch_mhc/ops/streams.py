"""Fused stream read and write, each one pass over the state with fp32 arithmetic.

- pre:  ``y = sum_i H_pre[i] x_i``; x ``[T, n, C]``, h_pre ``[T, n]`` -> y ``[T, C]``.
- post: ``out = H_res x + H_post^T f``; reads (n+1)C, writes nC per token.
Backwards are single passes too; the per-token reductions over C (dH_pre, dH_post, dH_res) are
accumulated in registers because each program owns whole tokens.
Tiles are 2-D (tokens x channels of one stream) with static loops over the n streams (tuples of
tiles and of per-token coefficients); the post backward uses [tokens, n, channels] tiles with a static
loop over output streams. No [BT, n, n, BC] broadcasts.
Same math as :func:`torch_mhc.nn.functional.stream_pre` / ``stream_post``; tested against them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch_mhc.ops.blocks import on_tensors_device, padded, stream_index
from torch_mhc.ops.blocks import token_block as _token_block
from torch_mhc.ops.coefficients import FILL, dot_precision


@triton.jit
def _coefs(ptr, rows64, rmask, COUNT: tl.constexpr):
    """Per-token coefficients [T, COUNT] (fp32) as a tuple of COUNT [BT] vectors, one per entry."""
    out = ()
    for k in tl.static_range(COUNT):
        out = out + (tl.load(ptr + rows64 * COUNT + k, mask=rmask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _coef(ptr, rows64, rmask, COUNT: tl.constexpr, k):
    """Entry k of per-token coefficients [T, COUNT] as [BT] fp32. H_res entries are loaded where they are
    used (each chunk; L1 hits) rather than held: n^2 fewer live registers."""
    return tl.load(ptr + rows64 * COUNT + k, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def _zeros(BT: tl.constexpr, COUNT: tl.constexpr):
    out = ()
    for k in tl.static_range(COUNT):
        out = out + (tl.zeros((BT,), dtype=tl.float32),)
    return out


@triton.jit
def _store_coefs(ptr, vals, rows64, rmask, COUNT: tl.constexpr):
    for k in tl.static_range(COUNT):
        tl.store(ptr + rows64 * COUNT + k, vals[k], mask=rmask)


@triton.jit
def _tile(rows64, rmask, c0, C, N: tl.constexpr, BC: tl.constexpr):
    """Channel chunk c0..c0+BC of BT tokens: offsets of stream 0 of the state [BT, BC] (stream i at
    + i * C), offsets of a [T, C] row, and the mask."""
    cs = c0 + tl.arange(0, BC)
    mask = rmask[:, None] & (cs < C)[None, :]
    return rows64[:, None] * (N * C) + cs[None, :], rows64[:, None] * C + cs[None, :], mask


@triton.jit
def _load_streams(ptr, offs, mask, C, N: tl.constexpr):
    """The N streams of a chunk as a tuple of [BT, BC] fp32 tiles."""
    out = ()
    for i in tl.static_range(N):
        out = out + (tl.load(ptr + offs + i * C, mask=mask, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _state_stream(hp_i, f, hr_ptr, rows64, rmask, x, ROW: tl.constexpr, N: tl.constexpr):
    """Stream ROW of the new state, H_post[ROW] f + sum_j H_res[ROW, j] x_j, fp32 [BT, BC] (before rounding): one
    function for the forward post and the chained backward's recomputation, so both do the same arithmetic."""
    out = hp_i[:, None] * f
    for j in tl.static_range(N):
        out += _coef(hr_ptr, rows64, rmask, N * N, ROW * N + j)[:, None] * x[j]
    return out


@triton.jit(do_not_specialize=["T"])
def _pre_fwd(x_ptr, h_ptr, y_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    rows64, rmask = _token_block(T, BT)
    h = _coefs(h_ptr, rows64, rmask, N)
    for c0 in range(0, C, BC):
        offs, offs_row, mask = _tile(rows64, rmask, c0, C, N, BC)
        y = tl.zeros((BT, BC), dtype=tl.float32)
        for i in tl.static_range(N):
            y += h[i][:, None] * tl.load(x_ptr + offs + i * C, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_row, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _pre_bwd(x_ptr, h_ptr, dy_ptr, dx_ptr, dh_ptr, T, C, N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
             WRITE_DX: tl.constexpr):
    """dH_pre (per-token sums over C of x_i dy) and, with WRITE_DX, dx_i = H_pre[i] dy. The fused sublayer
    leaves dx to the coefficient GEMM's backward (one pass over x instead of two)."""
    rows64, rmask = _token_block(T, BT)
    h = _coefs(h_ptr, rows64, rmask, N)
    dh = _zeros(BT, N)
    for c0 in range(0, C, BC):
        offs, offs_row, mask = _tile(rows64, rmask, c0, C, N, BC)
        dy = tl.load(dy_ptr + offs_row, mask=mask, other=0.0).to(tl.float32)
        new_dh = ()
        for i in tl.static_range(N):
            x = tl.load(x_ptr + offs + i * C, mask=mask, other=0.0).to(tl.float32)
            if WRITE_DX:
                tl.store(dx_ptr + offs + i * C, (h[i][:, None] * dy).to(dx_ptr.dtype.element_ty), mask=mask)
            new_dh = new_dh + (dh[i] + tl.sum(x * dy, axis=1),)
        dh = new_dh
    _store_coefs(dh_ptr, dh, rows64, rmask, N)


@triton.jit(do_not_specialize=["T"])
def _post_fwd(x_ptr, f_ptr, hp_ptr, hr_ptr, out_ptr, phi_ptr, raw_ptr, inv_ptr, T, C, M, stride_pk, stride_pm, eps,
              N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PROJ: tl.constexpr, BM: tl.constexpr,
              PREC: tl.constexpr):
    """New state out = H_res x + H_post^T f. PROJ (read-ahead): also the next sublayer's coefficient GEMM on the
    state just written, raw = out @ phi [T, M] and inv_rms [T] (from the stored, rounded values, as ``_gemm_fwd``
    computes them), each chunk read back from L2 right after it is stored: the next sublayer does not read the
    state from DRAM for its GEMM."""
    rows64, rmask = _token_block(T, BT)
    hp = _coefs(hp_ptr, rows64, rmask, N)
    if PROJ:
        ms = tl.arange(0, BM)
        acc = tl.zeros((BT, BM), dtype=tl.float32)
        ss = tl.zeros((BT,), dtype=tl.float32)
    for c0 in range(0, C, BC):
        offs, offs_row, mask = _tile(rows64, rmask, c0, C, N, BC)
        x = _load_streams(x_ptr, offs, mask, C, N)
        f = tl.load(f_ptr + offs_row, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(N):
            out = _state_stream(hp[i], f, hr_ptr, rows64, rmask, x, i, N)
            tl.store(out_ptr + offs + i * C, out.to(out_ptr.dtype.element_ty), mask=mask)
        if PROJ:  # read the chunk just stored back (L2, not DRAM): the GEMM's tile layout stays its own
            tl.debug_barrier()
            for i in tl.static_range(N):
                s = tl.load(out_ptr + offs + i * C, mask=mask, other=0.0).to(tl.float32)
                ks = i * C + c0 + tl.arange(0, BC)  # rows of phi: stream i, this chunk's channels
                p = tl.load(phi_ptr + ks[:, None] * stride_pk + ms[None, :] * stride_pm,
                            mask=((c0 + tl.arange(0, BC)) < C)[:, None] & (ms < M)[None, :], other=0.0)
                acc = tl.dot(s, p.to(tl.float32), acc, input_precision=PREC)
                ss += tl.sum(s * s, axis=1)
    if PROJ:
        tl.store(raw_ptr + rows64[:, None] * M + ms[None, :], acc, mask=rmask[:, None] & (ms < M)[None, :])
        tl.store(inv_ptr + rows64, 1.0 / tl.sqrt(ss / (N * C) + eps), mask=rmask)


@triton.jit(do_not_specialize=["T"])
def _post_bwd(x_ptr, f_ptr, hp_ptr, hr_ptr, dout_ptr, dx_ptr, df_ptr, dhp_ptr, dhr_ptr, T, C,
              N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """3-D tiles [BT, NP, BC] of x and dout (all streams of a chunk; NP = padded(N), padded streams masked), a
    static loop over output streams i: dH_res accumulates in one [BT, NP, NP] tensor (a row per i) instead of n^2
    separate per-token sums, which is what kept the 2-D version at 160-250 registers for n = 8."""
    rows64, rmask = _token_block(T, BT)
    s1, real = stream_index(N)
    r3, m3r, s3 = rows64[:, None, None], rmask[:, None, None], s1[None, :, None]
    m3s = m3r & real[None, :, None]  # [BT, NP, 1]: real tokens and streams
    hp = tl.load(hp_ptr + rows64[:, None] * N + s1[None, :], mask=rmask[:, None] & real[None, :], other=0.0)
    dhp = tl.zeros((BT, padded(N)), dtype=tl.float32)
    dhr = tl.zeros((BT, padded(N), padded(N)), dtype=tl.float32)  # [BT, i, j]
    for c0 in range(0, C, BC):
        cs = c0 + tl.arange(0, BC)
        cs3 = cs[None, None, :]
        m1 = m3r & (cs3 < C)  # [BT, 1, BC]
        m3 = m1 & (s3 < N)
        offs3 = r3 * (N * C) + s3 * C + cs3  # [BT, N, BC]: stream s, channel c
        x = tl.load(x_ptr + offs3, mask=m3, other=0.0).to(tl.float32)  # [BT, j, BC]
        g = tl.load(dout_ptr + offs3, mask=m3, other=0.0).to(tl.float32)  # [BT, i, BC]
        f = tl.load(f_ptr + r3 * C + cs3, mask=m1, other=0.0).to(tl.float32)  # [BT, 1, BC]
        df = tl.sum(hp[:, :, None] * g, axis=1)  # [BT, BC]
        tl.store(df_ptr + rows64[:, None] * C + cs[None, :], df.to(df_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cs < C)[None, :])
        dhp += tl.sum(g * f, axis=2)
        dx = tl.zeros((BT, padded(N), BC), dtype=tl.float32)  # [BT, j, BC]
        for i in tl.static_range(N):
            g_i = tl.load(dout_ptr + r3 * (N * C) + i * C + cs3, mask=m1, other=0.0).to(tl.float32)  # L1 hit
            h_i = tl.load(hr_ptr + r3 * (N * N) + i * N + s3, mask=m3s, other=0.0)  # [BT, j, 1]: row i of H_res
            dx += h_i * g_i
            dhr += tl.where(s3 == i, tl.sum(g_i * x, axis=2)[:, None, :], 0.0)
        tl.store(dx_ptr + offs3, dx.to(dx_ptr.dtype.element_ty), mask=m3)
    tl.store(dhp_ptr + rows64[:, None] * N + s1[None, :], dhp, mask=rmask[:, None] & real[None, :])
    tl.store(dhr_ptr + r3 * (N * N) + s3 * N + s1[None, None, :], dhr, mask=m3s & real[None, None, :])


@triton.jit(do_not_specialize=["T"])
def _post_bwd_chain(x_ptr, f_ptr, hp_ptr, hr_ptr, g_ptr, dy_ptr, hq_ptr, draw_ptr, coef_ptr, phi_ptr,
                    dx_ptr, df_ptr, dhp_ptr, dhr_ptr, sc_ptr, T, C, M, stride_pk, stride_pm,
                    N: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """Post backward of sublayer l with the gradient of its output state s summed in the same pass, instead of
    read from a buffer the next sublayer (m) wrote: dout_i = g_i + H_pre_m[i] dy_m + (draw_m @ phi_m^T)_i
    + coef_m s_i, where g holds the rest (m's post term, other consumers of s), and s_i is recomputed from
    x and f exactly as the forward post stored it. Then dx_j = sum_i H_res[i, j] dout_i, df = sum_i H_post[i]
    dout_i, dH_post[i] = sum_c dout_i f, dH_res[i, j] = sum_c dout_i x_j (per token, over all C)."""
    rows64, rmask = _token_block(T, BT)
    hp = _coefs(hp_ptr, rows64, rmask, N)
    hq = _coefs(hq_ptr, rows64, rmask, N)
    ms = tl.arange(0, BM)
    d = tl.load(draw_ptr + rows64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    coef = tl.load(coef_ptr + rows64, mask=rmask, other=0.0)
    dhp = _zeros(BT, N)
    dhr = _zeros(BT, N * N)
    sc = sc_ptr + tl.program_id(0).to(tl.int64) * (N * BT * BC)
    for c0 in range(0, C, BC):
        offs, offs_row, mask = _tile(rows64, rmask, c0, C, N, BC)
        cs = c0 + tl.arange(0, BC)
        sc_offs = tl.arange(0, BT)[:, None] * BC + tl.arange(0, BC)[None, :]
        # The GEMM term goes through a per-program scratch (L1/L2), as the read-ahead post re-reads its chunk: adding
        # the dot's result to the elementwise terms directly pulled its layout into them (n = 4: 255 registers).
        for i in tl.static_range(N):
            p = tl.load(phi_ptr + (i * C + cs)[None, :] * stride_pk + ms[:, None] * stride_pm,
                        mask=(ms < M)[:, None] & (cs < C)[None, :], other=0.0)  # [BM, BC]: phi_m^T, stream i
            tl.store(sc + i * BT * BC + sc_offs, tl.dot(d, p.to(tl.float32), input_precision=PREC))
        tl.debug_barrier()
        x = _load_streams(x_ptr, offs, mask, C, N)
        f = tl.load(f_ptr + offs_row, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs_row, mask=mask, other=0.0).to(tl.float32)
        g = ()
        for i in tl.static_range(N):
            s = _state_stream(hp[i], f, hr_ptr, rows64, rmask, x, i, N).to(x_ptr.dtype.element_ty).to(tl.float32)
            gi = tl.load(sc + i * BT * BC + sc_offs) + coef[:, None] * s + hq[i][:, None] * dy
            g = g + (gi + tl.load(g_ptr + offs + i * C, mask=mask, other=0.0).to(tl.float32),)
        tl.debug_barrier()
        df = hp[0][:, None] * g[0]
        for i in tl.static_range(1, N):
            df += hp[i][:, None] * g[i]
        tl.store(df_ptr + offs_row, df.to(df_ptr.dtype.element_ty), mask=mask)
        new_dhp = ()
        new_dhr = ()
        for i in tl.static_range(N):
            new_dhp = new_dhp + (dhp[i] + tl.sum(g[i] * f, axis=1),)
            for j in tl.static_range(N):
                new_dhr = new_dhr + (dhr[i * N + j] + tl.sum(g[i] * x[j], axis=1),)
        dhp = new_dhp
        dhr = new_dhr
        for j in tl.static_range(N):
            dx = _coef(hr_ptr, rows64, rmask, N * N, j)[:, None] * g[0]
            for i in tl.static_range(1, N):
                dx += _coef(hr_ptr, rows64, rmask, N * N, i * N + j)[:, None] * g[i]
            tl.store(dx_ptr + offs + j * C, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    _store_coefs(dhp_ptr, dhp, rows64, rmask, N)
    _store_coefs(dhr_ptr, dhr, rows64, rmask, N * N)


# Tile per (n, C): BT tokens x BC channels per stream, `warps` warps. Pre and post forward and pre
# backward: 1024 elements per stream (n = 8: 512, n = 16: 128), 8 per thread at 4 warps (16-byte bf16 loads). Post
# backward: [BT, n, BC] tiles of 256 channels (one token when C >= 256). Small C packs more tokens per
# program, up to a cap per n. Chosen from the compiled register counts (`python -m torch_mhc.ops.aot`,
# budget in torch_mhc.ops.aot): see docs/design.md. Other n take their padded count's tiles (the post backward's
# [BT, NP, BC] tiles are that size; the other kernels loop over the n real streams, so they hold fewer), except the
# post backward's channels at n = 5, 6, 7: 64 (compile gate: 256 spilled 8 bytes at n = 6 on sm_80 with bf16
# streams, 128 at n = 7). n = 16: 32 channels in the post backward ([1, 16, 64] tiles ran 255 registers on sm_90)
# and 128-element tiles in the others (the pre backward's [4, 64] spilled 8 bytes on sm_80); n = 9..15: the same,
# but [1, 16, 16] tiles on 2 warps in the post backward (the gate: with 4 warps, at 16 or 32 channels, ptxas kept
# one register on the stack across the channel loop, 8-16 bytes, at 6 to 13 of the 9..15 configurations; with
# 2 warps at 32 channels at 4 of them); so does n = 16 when C <= 16 (its tile is then [1, 16, C <= 16] too).
def _blocks(n: int, C: int, post_bwd: bool = False) -> tuple[int, int, int]:
    n_pad = padded(n)
    if post_bwd:
        tile = 256 if n_pad <= 4 or n == 8 else 64 if n_pad == 8 else 32 if n == 16 else 16
        bc, cap = min(triton.next_power_of_2(C), tile), max(1, min(8, 16 // n_pad))
        if n_pad == 16 and bc <= 16:
            return 1, bc, 2
    else:
        tile = 1024 if n_pad <= 4 else 512 if n_pad == 8 else 128
        bc, cap = min(triton.next_power_of_2(C), tile // 4), 16 if n_pad <= 2 else 8 if n_pad == 4 else 4
    return max(1, min(cap, tile // bc)), bc, 4


# Read-ahead post (the next GEMM fused in): tl.dot needs tiles of at least 16 x 16, and every program reads
# all of phi (from L2) once per BT tokens, so more tokens and fewer channels per chunk than the plain post,
# and 8 warps. The GEMM re-loads the chunk it just stored (an L2 hit) rather than taking the stored values
# from registers: sharing one tile between the stores and tl.dot pulled the dot's layout into the elementwise
# code (216-255 registers and spills at n = 4 and 8). Tokens per program: 64 (n = 8: 32) while that still
# gives FILL programs (two per SM of an H100), fewer for fewer tokens (down to 16), so small batches still
# fill the GPU; 16 when C is not a multiple of 16 (scalar loads, an address each). Compile gate, sm_90 /
# sm_80, bf16: n = 4 at 86 / 100 registers, n = 8 at 103 / 128.
# The chained post backward holds n^2 dH_res sums and 2n tiles per chunk: n = 8 compiles to 226-255 registers
# (spills with 32 or 64 tokens), so n = 8 keeps the plain backward (the read writes its own dx).
CHAIN_MAX_STREAMS = 4
# Stream counts whose read-ahead post compiles within budget: at n = 5, 6, 7 (padded to 8, every stream access
# masked) the [BT, BM] GEMM tile beside the masked state tiles spills 8-56 bytes on sm_90 at every token tile tried
# (16 and 32; compile gate), so those n run the plain post and the reader its own GEMM. (A coefficient GEMM wider
# than ops.MAX_GEMM_WIDTH is never read ahead: its reader runs the reference path.)
READ_AHEAD_STREAMS = (1, 2, 3, 4, 8)
# The read-ahead post and the chained post backward store a chunk, pass tl.debug_barrier() and load it back in the
# same loop iteration. Their launches take num_stages=1: the software pipeliner (default 3 stages on sm_80/sm_90)
# then leaves the loop alone, so it cannot issue the next iteration's loads ahead of this iteration's stores and
# barrier. (Each of the two kernels has this one loop.)
STORE_RELOAD_STAGES = 1


def _read_ahead_blocks(n: int, C: int, T: int, batch_invariant: bool = False) -> tuple[int, int, int]:
    """(tokens, channels per chunk, warps); ``batch_invariant``: the token count's choice is left out (16 tokens,
    the small-batch tile), so the GEMM's tiles, and with them each token's sums, do not change with T."""
    bt = 16
    if C % 16 == 0 and not batch_invariant:
        for cand in ((64, 32) if n <= 4 else (32,)):
            if triton.cdiv(T, cand) >= FILL:
                bt = cand
                break
    return bt, 16, 8


@on_tensors_device
def pre_forward(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """x [T, n, C], h_pre [T, n] fp32 -> y [T, C] (x's dtype)."""
    T, n, C = x.shape
    y = torch.empty(T, C, device=x.device, dtype=x.dtype)
    if T == 0:
        return y
    bt, bc, warps = _blocks(n, C)
    _pre_fwd[(triton.cdiv(T, bt),)](x, h_pre, y, T, C, N=n, BT=bt, BC=bc, num_warps=warps)
    return y


@on_tensors_device
def pre_backward(x: torch.Tensor, h_pre: torch.Tensor, dy: torch.Tensor, write_dx: bool = True):
    """-> (dx [T, n, C] or None without ``write_dx``, dH_pre [T, n] fp32)."""
    T, n, C = x.shape
    dx = torch.empty_like(x) if write_dx else None
    dh = torch.empty(T, n, device=x.device, dtype=torch.float32)
    if T == 0:
        return dx, dh
    bt, bc, warps = _blocks(n, C)
    _pre_bwd[(triton.cdiv(T, bt),)](x, h_pre, dy.contiguous(), x if dx is None else dx, dh, T, C, N=n, BT=bt, BC=bc,
                                    WRITE_DX=write_dx, num_warps=warps)
    return dx, dh


@on_tensors_device
def post_forward(x, h_post, h_res, f, read_ahead=None, batch_invariant: bool = False):
    """x [T, n, C], h_post [T, n], h_res [T, n, n] (fp32), f [T, C] -> H_res x + H_post^T f [T, n, C].
    ``read_ahead`` = (phi [n*C, M], eps) of the next sublayer: also return its GEMM on the new state,
    (raw [T, M], inv_rms [T]) fp32, computed from the stored values in the same pass; ``batch_invariant``: with
    tiles that do not depend on T (:func:`_read_ahead_blocks`)."""
    T, n, C = x.shape
    out = torch.empty_like(x)
    if T == 0:  # an empty batch: nothing to launch
        return out if read_ahead is None else (out, (x.new_empty(0, read_ahead[0].shape[1], dtype=torch.float32),
                                                     x.new_empty(0, dtype=torch.float32)))
    if read_ahead is None:
        bt, bc, warps = _blocks(n, C)
        _post_fwd[(triton.cdiv(T, bt),)](x, f, h_post, h_res, out, out, out, out, T, C, 1, 1, 1, 0.0,
                                         N=n, BT=bt, BC=bc, PROJ=False, BM=16, PREC=dot_precision(x.dtype),
                                         num_warps=warps)
        return out
    phi, eps = read_ahead
    M = phi.shape[1]
    raw = torch.empty(T, M, device=x.device, dtype=torch.float32)
    inv = torch.empty(T, device=x.device, dtype=torch.float32)
    bt, bc, warps = _read_ahead_blocks(n, C, T, batch_invariant)
    if x.dtype == torch.float32 and n == 4 and bt == 32:  # fp32 (tf32x3 dot) at n = 4: 32 tokens spill 16 bytes on
        bt = 16  # sm_90; 16 and 64 do not (compile gate)
    bm = max(16, triton.next_power_of_2(M))
    # n = 8 with the narrower GEMM tiles of H_res maps other than Sinkhorn (M = 2n + k: 24 circulant, 42 kronecker):
    # two tiles spill 16 bytes on sm_90 (compile gate); the other token count compiles within budget.
    if n == 8 and x.dtype == torch.float32 and (bt, bm) == (32, 32):
        bt = 16  # 128 / 99 registers (sm_90 / sm_80)
    elif n == 8 and x.dtype != torch.float32 and (bt, bm) == (16, 64) and C % 16:
        bt = 32  # 178 / 177 registers
    _post_fwd[(triton.cdiv(T, bt),)](x, f, h_post, h_res, out, phi, raw, inv, T, C, M, phi.stride(0), phi.stride(1),
                                     eps, N=n, BT=bt, BC=bc, PROJ=True, BM=bm,
                                     PREC=dot_precision(x.dtype), num_warps=warps, num_stages=STORE_RELOAD_STAGES)
    return out, (raw, inv)


@on_tensors_device
def post_backward(x, h_post, h_res, f, dout):
    """-> (dx [T, n, C], dH_post [T, n], dH_res [T, n, n] (fp32), df [T, C])."""
    T, n, C = x.shape
    dx, df = torch.empty_like(x), torch.empty_like(f)
    dhp = torch.empty(T, n, device=x.device, dtype=torch.float32)
    dhr = torch.empty(T, n, n, device=x.device, dtype=torch.float32)
    if T == 0:
        return dx, dhp, dhr, df
    bt, bc, warps = _blocks(n, C, post_bwd=True)
    _post_bwd[(triton.cdiv(T, bt),)](x, f, h_post, h_res, dout.contiguous(), dx, df, dhp, dhr, T, C,
                                     N=n, BT=bt, BC=bc, num_warps=warps)
    return dx, dhp, dhr, df


@on_tensors_device
def post_backward_chain(x, h_post, h_res, f, g, nxt, batch_invariant: bool = False):
    """Post backward with the next sublayer's terms of dout summed in (:func:`_post_bwd_chain`): x [T, n, C],
    h_post [T, n], h_res [T, n, n] (fp32), f [T, C], g [T, n, C] (the rest of dout), ``nxt`` = (dy [T, C],
    H_pre [T, n], draw [T, M], coef [T], phi [n*C, M]) of the next sublayer -> as :func:`post_backward`.
    ``batch_invariant``: tiles that do not depend on T (:func:`_read_ahead_blocks`)."""
    T, n, C = x.shape
    dy, h_pre, draw, coef, phi = nxt
    M = draw.shape[1]
    dx, df = torch.empty_like(x), torch.empty_like(f)
    dhp = torch.empty(T, n, device=x.device, dtype=torch.float32)
    dhr = torch.empty(T, n, n, device=x.device, dtype=torch.float32)
    if T == 0:
        return dx, dhp, dhr, df
    # tl.dot tiles again: compile gate, n = 4: 102-128 registers, except fp32 streams with 64 tokens: 153 on sm_90
    bt, bc, warps = _read_ahead_blocks(n, C, T, batch_invariant)
    if x.dtype == torch.float32:
        bt = min(bt, 32)
    grid = triton.cdiv(T, bt)
    scratch = torch.empty(grid, n, bt, bc, device=x.device, dtype=torch.float32)
    _post_bwd_chain[(grid,)](
        x, f, h_post, h_res, g, dy, h_pre, draw, coef, phi, dx, df, dhp, dhr, scratch, T, C, M, phi.stride(0),
        phi.stride(1),
        N=n, BT=bt, BC=bc, BM=max(16, triton.next_power_of_2(M)), PREC=dot_precision(x.dtype), num_warps=warps,
        num_stages=STORE_RELOAD_STAGES)
    return dx, dhp, dhr, df


class FusedStreamPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre):
        ctx.save_for_backward(x, h_pre)
        return pre_forward(x, h_pre)

    @staticmethod
    def backward(ctx, dy):
        x, h_pre = ctx.saved_tensors
        dx, dh = pre_backward(x, h_pre, dy)
        return dx, dh.to(h_pre.dtype)


class FusedStreamPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_post, h_res, f):
        ctx.save_for_backward(x, h_post, h_res, f)
        return post_forward(x, h_post, h_res, f)

    @staticmethod
    def backward(ctx, dout):
        x, h_post, h_res, f = ctx.saved_tensors
        dx, dhp, dhr, df = post_backward(x, h_post, h_res, f, dout)
        return dx, dhp.to(h_post.dtype), dhr.to(h_res.dtype), df


def fused_stream_pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """x ``[..., n, C]``, h_pre ``[..., n]`` -> ``[..., C]`` in x's dtype."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    y = FusedStreamPre.apply(x.reshape(-1, n, C).contiguous(), h_pre.float().reshape(-1, n).contiguous())
    return y.view(*lead, C)


def fused_stream_post(x, h_post, h_res, f_out):
    """x ``[..., n, C]``, h_post ``[..., n]``, h_res ``[..., n, n]``, f ``[..., C]`` -> ``[..., n, C]`` (x's dtype)."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    out = FusedStreamPost.apply(x.reshape(-1, n, C).contiguous(), h_post.float().reshape(-1, n).contiguous(),
                                h_res.float().reshape(-1, n, n).contiguous(), f_out.reshape(-1, C).contiguous())
    return out.view(*lead, n, C)
