import math

import pytest
import torch

from torch_mhc import sinkhorn
from torch_mhc.nn.sinkhorn import sinkhorn_reference


def spec_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Spec section 2.4 read literally, float64, one matrix at a time."""
    out = torch.empty_like(logits, dtype=torch.float64)
    for idx in range(logits.shape[0]):
        m = logits[idx].double().exp()
        for _ in range(iters):
            m = m / (m.sum(0, keepdim=True) + eps)
            m = m / (m.sum(1, keepdim=True) + eps)
        out[idx] = m
    return out


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_matches_spec_transcription(n):
    torch.manual_seed(n)
    logits = torch.randn(5, n, n) * 2
    got = sinkhorn(logits, iters=20, eps=1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), spec_sinkhorn(logits, 20, 1e-6), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("start", ["exp", "softmax"])
def test_gradcheck(start):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, iters=7, eps=1e-6, start=start), (logits,))


@pytest.mark.parametrize("start", ["exp", "softmax"])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: some logits above EXP_SAFE_MAX, the shift is active
def test_custom_backward_equals_autograd_of_iteration(start, scale):
    torch.manual_seed(1)
    logits = (torch.randn(6, 4, 4, dtype=torch.float64) * scale).requires_grad_()
    grad = torch.randn(6, 4, 4, dtype=torch.float64)
    (g1,) = torch.autograd.grad(sinkhorn(logits, iters=20, start=start), logits, grad)
    (g2,) = torch.autograd.grad(sinkhorn_reference(logits, iters=20, start=start), logits, grad)
    torch.testing.assert_close(g1, g2)


def test_saves_only_logits():
    logits = torch.randn(2, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sinkhorn(logits, iters=50)
    assert len(saved) == 1 and saved[0].shape == logits.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_doubly_stochastic(dtype):
    torch.manual_seed(2)
    logits = (torch.randn(64, 4, 4) * 1.5).to(dtype)
    prev_err = math.inf
    for iters in (1, 3, 10, 30, 100):
        m = sinkhorn(logits, iters=iters, eps=0.0)
        assert m.dtype == torch.float32
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(64, 4), rtol=0, atol=4e-6)
        col_err = (m.sum(-2) - 1).abs().max().item()
        # more iterations never move the result further from doubly stochastic
        assert col_err <= prev_err + 1e-6
        prev_err = col_err
    assert prev_err < 1e-5


def test_column_error_bound_from_iters():
    """Column error after t rounds is at most C * rho^t with rho < 1 for positive matrices."""
    torch.manual_seed(3)
    logits = torch.randn(256, 4, 4)
    errs = [(sinkhorn(logits, iters=t, eps=0.0).sum(-2) - 1).abs().max().item() for t in range(1, 12)]
    rho = max(errs[k + 1] / errs[k] for k in range(4) if errs[k] > 0)
    assert rho < 1
    for t in range(1, 11):
        assert errs[t] <= errs[0] * rho ** t * 4 + 1e-6


def test_softmax_start_is_deepseek_v4_transposed():
    """V4: softmax over the last dim + eps, columns, then (iters-1) x (rows, columns); H = comb^T."""
    torch.manual_seed(4)
    comb_logits = torch.randn(3, 4, 4, dtype=torch.float64)
    eps, iters = 1e-6, 20
    comb = torch.softmax(comb_logits, -1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    got = sinkhorn(comb_logits.transpose(-1, -2), iters=iters, eps=eps, start="softmax")
    torch.testing.assert_close(got, comb.transpose(-1, -2))


def test_large_logits_stay_finite():
    logits = torch.randn(4, 4, 4) * 100
    assert torch.isfinite(sinkhorn(logits)).all()


@pytest.mark.parametrize("start", ["exp", "softmax"])
@pytest.mark.parametrize("n", [6, 8])
def test_widely_spread_logits_keep_a_finite_gradient(start, n):
    """Logits spread by about 110 (n = 6) and 190 (n = 8), 20 iterations, fp32: the exp start underflows to 0 in
    whole rows, whose sums then sit at eps. The gradient was NaN there (it grew by 1/eps a step, then inf * 0);
    carried as gradient x value it stays finite, and where the fp32 forward itself matches float64 (n = 6) the
    gradient matches too. (At n = 8 the fp32 exp start loses whole rows that float64 keeps: the forward differs by
    about 0.3, a limit of Sinkhorn in fp32 without log-domain iterations, not of the backward.)"""
    torch.manual_seed(n)
    base = (70.0 + 3 * torch.arange(n * n, dtype=torch.float64)).view(n, n)
    logits = (base + torch.randn(5, n, n, dtype=torch.float64)).requires_grad_()
    weights = torch.randn(5, n, n, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        x = logits.detach().to(dtype).requires_grad_()
        (sinkhorn(x, 20, 1e-6, start) * weights.to(dtype)).sum().backward()
        grads.append(x.grad.double())
    assert torch.isfinite(grads[0]).all()
    if n == 6 or start == "softmax":
        assert (grads[0] - grads[1]).abs().max() < 1e-5
    reference = logits.detach().clone().requires_grad_()  # the plain autograd of the iteration, float64
    (sinkhorn_reference(reference, 20, 1e-6, start) * weights).sum().backward()
    torch.testing.assert_close(grads[1], reference.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, shape",
    [({}, (4, 3)), ({}, (4,)), ({"iters": 0}, (4, 4)), ({"start": "log"}, (4, 4)), ({"eps": -1.0}, (4, 4))],
)
def test_bad_inputs(kwargs, shape):
    with pytest.raises(ValueError):
        sinkhorn(torch.randn(shape), **kwargs)
