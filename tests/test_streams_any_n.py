"""Stream counts that are not powers of two (n = 3, 5, 6, 7) through the kernels, padded inside them to the next
power of two with the padded streams masked (ops.blocks.padded): every output and gradient against the float64
reference (Triton interpreter on CPU; CUDA when present), Sinkhorn's edges (one iteration, the shifted exp's
largest-logit gradient) where padded logits sit beside the real ones, and every connection and a DecoderLM on the
fused path. The on-chip maps at these n are in test_maps_fused (parametrized over COEFFICIENT_STREAMS), pre/post and the
chained stack at n = 3 in test_ops."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import CountLaunches  # noqa: E402
from emulate_dots import rel_err  # noqa: E402
from test_ops import DEVICE, SHAPES, _connections, check_coefficients, make_coeff_inputs, weighted  # noqa: E402
from torch_mhc import ops  # noqa: E402
from torch_mhc.models import DecoderLM, ModelConfig  # noqa: E402

PADDED = [3, 5, 6, 7]


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n", PADDED)
@pytest.mark.parametrize("T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_coefficients_equal_float64_reference(variant, n, T, C, dtype):
    """H_pre, H_post, H_res (Sinkhorn on an n x n block inside the padded tile) and the gradients of x, phi, bias,
    alpha (random output gradients) against float64."""
    inputs = make_coeff_inputs(T, n, C, dtype, seed=n * 100 + C)
    check_coefficients(inputs, 20, variant, grad_seed=n)


# Large logits with 1 and 2 iterations, as test_ops' power-of-two edges: with 20, the rows these logits leave below
# eps make the fp32 Sinkhorn backward overflow (each step divides their gradient by eps) at any n, padded or not
# (n = 8 as well; an fp32 emulation of the kernel's backward on the real 6 x 6 block alone gives the same NaN).
EDGE_CASES = [(iters, large) for iters in (1, 2, 20) for large in (False, True) if not (large and iters == 20)]


@pytest.mark.parametrize("n", [3, 6])
@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("iters, large_logits", EDGE_CASES)
def test_padded_sinkhorn_edges(n, variant, iters, large_logits):
    """Few iterations (V4 with 1: the leading row step only) and res logits above the exp clamp: the paper's
    shifted exp sends the gradient to the largest logit, which must be a real one (padded logits are -inf), and
    nothing padded turns into inf or NaN (padded rows' and columns' sums are eps; padded gradient entries are
    zeroed after each backward step)."""
    T, C = 6, 16
    x, phi, bias, alpha = make_coeff_inputs(T, n, C, torch.float32, seed=iters + 10 * large_logits + n)
    if large_logits:
        with torch.no_grad():
            bias[2 * n:] += 70.0 + 3 * torch.arange(n * n, dtype=torch.float32, device=DEVICE)
    check_coefficients((x, phi, bias, alpha), iters, variant, grad_seed=iters)


@pytest.mark.parametrize("n", [3, 5, 6])
def test_connections_at_padded_n_run_the_kernels_and_equal_the_reference(n, monkeypatch):
    """Every connection (dynamic mHC paper and V4, static mHC, HC, static HC) and a DecoderLM at n = 3, 5, 6 take
    the fused path (should_fuse, kernels launched) under chained backward, with the reference path's results."""
    from torch_mhc.nn import chained_backward
    from torch_mhc.ops import streams
    from torch_mhc.ops.streams import READ_AHEAD_STREAMS

    post = CountLaunches(streams._post_fwd)
    monkeypatch.setattr(streams, "_post_fwd", post)
    C, T = 8, 5
    torch.manual_seed(n)
    x0 = torch.randn(T, n, C, device=DEVICE)
    for conn in _connections(n, C):
        conn.to(DEVICE)
        with torch.no_grad():
            for p in conn.parameters():
                p.add_(0.1 * torch.randn_like(p))
        results = []
        for backend in ("triton", "reference"):
            x = x0.clone().requires_grad_()
            with ops.use_backend(backend), chained_backward():
                assert ops.should_fuse(x) is (backend == "triton")
                out = conn(x)
            grads = torch.autograd.grad(weighted(out), [x, *conn.parameters()], allow_unused=True)
            results.append((out, grads))
        (a, ga), (b, gb) = results
        assert rel_err(a, b) < 1e-5
        for u, v in zip(ga, gb):
            assert (u is None) == (v is None)
            if u is not None:
                assert rel_err(u, v) < 1e-4
    launched = post.launches
    assert launched >= len(_connections(n, C))
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connection="mhc", n_streams=n)
    model = DecoderLM(cfg).to(DEVICE)
    idx = torch.randint(0, 256, (2, 8), device=DEVICE)
    losses = []
    for backend in ("triton", "reference"):
        with ops.use_backend(backend), chained_backward():
            _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
    assert post.launches > launched
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # the posts read ahead (the next GEMM fused in) only at n with checked tiles (n = 3; not 5, 6: they spill)
    assert any(k["PROJ"] for k in post.kwargs) is (n in READ_AHEAD_STREAMS)
