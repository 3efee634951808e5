"""Stream counts that are not powers of two (n = 3, 5, 6, 7) through the kernels, padded inside them to the next
power of two with the padded streams masked (ops.blocks.padded): every output and gradient against the float64
reference (Triton interpreter on CPU; CUDA when present), Sinkhorn's edges (one iteration, the shifted exp's
largest-logit gradient) where padded logits sit beside the real ones, and every connection and a DecoderLM on the
fused path. The on-chip maps at these n are in test_maps_fused (parametrized over MAP_STREAMS), pre/post and the
chained stack at n = 3 in test_ops."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import CountLaunches  # noqa: E402
from test_ops import (  # noqa: E402
    DEVICE,
    SHAPES,
    _connections,
    assert_every_connection_matches_reference,
    check_coefficients,
    make_coeff_inputs,
)

PADDED = [3, 5, 6, 7]


# n = 9..16 (padded to 16): the GEMM 2n + n^2 columns wide (99, 143, 288: forward tiles of 128, backward chunks of
# 32; fp32 streams' backward in two passes), the epilogue on [1, 16, 16] tiles; C = 24 splits the forward over K,
# C = 8 does not.
WIDE_CASES = [(n, T, C) for n in (9, 11, 16) for T, C in ((6, 24), (5, 8))]


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n, T, C", [(n, T, C) for n in PADDED for T, C in SHAPES] + WIDE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_coefficients_equal_float64_reference(variant, n, T, C, dtype):
    """H_pre, H_post, H_res (Sinkhorn on an n x n block inside the padded tile) and the gradients of x, phi, bias,
    alpha (random output gradients) against float64."""
    inputs = make_coeff_inputs(T, n, C, dtype, seed=n * 100 + C)
    check_coefficients(inputs, 20, variant, grad_seed=n)


# Large logits with 1 and 2 iterations, as test_ops' power-of-two edges: with 20, the rows these logits leave below
# eps make the fp32 Sinkhorn backward overflow (each step divides their gradient by eps) at any n, padded or not
# (n = 8 as well; an fp32 emulation of the kernel's backward on the real 6 x 6 block alone gives the same NaN).
EDGE_CASES = [(iters, large) for iters in (1, 2, 20) for large in (False, True)]


@pytest.mark.parametrize("n", [3, 6])
@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("iters, large_logits", EDGE_CASES)
def test_padded_sinkhorn_edges(n, variant, iters, large_logits):
    """Few iterations (V4 with 1: the leading row step only) and res logits above the exp clamp: the paper's
    shifted exp sends the gradient to the largest logit, which must be a real one (padded logits are -inf), and
    nothing padded turns into inf or NaN (padded rows' and columns' sums are eps: the backward carries gradient x
    value, 0 there); with 20 iterations, rows of the exp start that underflow to 0 keep the gradient finite."""
    T, C = 6, 16
    x, phi, bias, alpha = make_coeff_inputs(T, n, C, torch.float32, seed=iters + 10 * large_logits + n)
    if large_logits:
        with torch.no_grad():
            bias[2 * n:] += 70.0 + 3 * torch.arange(n * n, dtype=torch.float32, device=DEVICE)
    # n = 6, 20 iterations, the paper's exp start over logits spread by about 110: its entries reach e^-110 of the
    # largest, near fp32's underflow, and the fp32 reference path is itself 1.9e-5 off float64 on H_res and 2.2e-5
    # on phi's gradient (the kernels: the same); twice the fp32 bound. (The gradient was NaN here before it was
    # carried as gradient x value: nn.sinkhorn.sinkhorn_backward.)
    edge = large_logits and iters == 20 and variant == "paper" and n == 6
    check_coefficients((x, phi, bias, alpha), iters, variant, grad_seed=iters, scale=2.0 if edge else 1.0)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_connections_at_padded_n_run_the_kernels_and_equal_the_reference(n, monkeypatch):
    """Every connection (dynamic mHC paper and V4, static mHC, HC, static HC) and a DecoderLM at n = 3, 5, 6 take
    the fused path (should_fuse, kernels launched) under chained backward, with the reference path's results."""
    from torch_mhc.ops import streams
    from torch_mhc.ops.streams import READ_AHEAD_STREAMS

    post = CountLaunches(streams._post_fwd)
    monkeypatch.setattr(streams, "_post_fwd", post)
    assert_every_connection_matches_reference(n)
    assert post.launches > len(_connections(n, 8))
    # the posts read ahead (the next GEMM fused in) only at n with checked tiles (n = 3; not 5, 6: they spill)
    assert any(k["PROJ"] for k in post.kwargs) is (n in READ_AHEAD_STREAMS)
