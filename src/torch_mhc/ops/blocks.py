"""Triton helpers shared by the kernels: per-token row blocks and their offsets; launches under the tensors'
device."""

import contextlib
import functools

import torch
import triton
import triton.language as tl


def device_guard(t: torch.Tensor | None):
    """A context that makes ``t``'s CUDA device the current one. Triton (3.9) launches on the current device
    (``driver.active.get_current_device()`` in ``JITFunction.run``), not on the tensors': without this, tensors on
    ``cuda:1`` with ``cuda:0`` current would be handed to a kernel running on the wrong GPU."""
    if t is None or t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (tuple, list)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def on_tensors_device(fn):
    """Decorator for a host function that launches kernels: run it under :func:`device_guard` of its first tensor
    argument (looked into tuples), so every launch inside goes to the device its tensors live on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with device_guard(_first_tensor(args)):
            return fn(*args, **kwargs)

    return wrapper


@triton.jit
def token_block(T, BT: tl.constexpr):
    """This program's token rows (int64, for large offsets) and their mask."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    return rows.to(tl.int64), rows < T


@triton.constexpr_function
def padded(n):
    """The stream count the kernels' aranges take for n streams: the next power of two (n itself for 1, 2, 4, 8);
    entries n..padded(n)-1 are masked on every load and store."""
    return triton.next_power_of_2(n)


def padded_entry(table: dict, n: int):
    """A per-n table's entry for n streams (tables keyed by the padded counts 1, 2, 4, 8, 16): its padded count's. The
    kernels' tiles are those of the padded count (its GEMM width 2 NP + NP^2 bounds n's); a clear error for an n
    without one (ops.should_fuse keeps such n on the reference path)."""
    if padded(n) not in table:
        raise ValueError(f"no kernel blocks for n = {n} streams (padded to {padded(n)}; tables cover {sorted(table)})")
    return table[padded(n)]


@triton.jit
def stream_index(N: tl.constexpr):
    """Stream indices [NP] (NP = padded(N)) and which are real streams (i < N)."""
    i = tl.arange(0, padded(N))
    return i, i < N


@triton.jit
def load_vec(ptr, rows64, rmask, N: tl.constexpr):
    """Per-token coefficients [T, N] as fp32 [BT, NP] (padded streams 0)."""
    i, real = stream_index(N)
    return tl.load(ptr + rows64[:, None] * N + i[None, :], mask=rmask[:, None] & real[None, :], other=0.0).to(
        tl.float32)


@triton.jit
def mat_offsets(rows64, rmask, N: tl.constexpr):
    """Offsets of per-token n x n matrices [T, N, N] as [BT, NP, NP], and their mask (real tokens, rows and
    columns)."""
    i, real = stream_index(N)
    offs = rows64[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    return offs, rmask[:, None, None] & real[None, :, None] & real[None, None, :]
