"""Fused Triton ops against the float64 reference (fresh random inputs, awkward shapes).

On a machine without a GPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest) on small shapes; with a GPU they also run at full size on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import CountLaunches  # noqa: E402
from torch_mhc import ManifoldHyperConnection, ops  # noqa: E402
from torch_mhc.models import DecoderLM, ModelConfig  # noqa: E402
from torch_mhc.nn import functional as Fm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(37, 24), (5, 40)] + ([(4099, 1280), (1000, 7168)] if CUDA else [])  # (tokens, C): not multiples of blocks

# Tolerances, relative to the largest reference value. fp32: the interpreter's fp32 is exact up to
# summation order (2e-5); on the GPU the coefficient GEMMs use tf32 (10-bit mantissa): 2e-3.
# bf16/fp16 outputs are rounded to the streams' dtype: half an ulp (2^-8 for bf16, 2^-11 for fp16)
# when rounding to nearest, as GPUs do; Triton's interpreter truncates fp32 -> bf16 (a full ulp,
# 2^-7), so bf16 gets 2^-7 on the GPU and 2^-6 in the interpreter; fp16 (numpy-native) 2^-10.
COEFF_TOL = 2e-3 if CUDA else 2e-5
STREAM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7 if CUDA else 2 ** -6, torch.float16: 2 ** -10}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_coeff_inputs(T, n, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    M = 2 * n + n * n
    x = torch.randn(T, n, C, generator=g).to(dtype)
    phi = torch.randn(n * C, M, generator=g) / (n * C) ** 0.5 * 3
    bias = torch.randn(M, generator=g)
    alpha = torch.rand(3, generator=g) + 0.5
    return [t.to(DEVICE).requires_grad_() for t in (x, phi, bias, alpha)]


def check_coefficients(inputs, iters, variant, grad_seed):
    """Fused coefficients and their gradients (random output gradients) against the float64 reference."""
    x, phi, bias, alpha = inputs
    got = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=1e-6, variant=variant)
    ref = Fm.mhc_coefficients(x.double(), phi.double(), bias.double(), alpha.double(), iters=iters, eps=1e-6,
                              variant=variant)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < COEFF_TOL
    gen = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(r.shape, generator=gen, dtype=r.dtype).to(DEVICE) for r in ref]
    g_got = torch.autograd.grad(got, (x, phi, bias, alpha), [g.float() for g in grads])
    g_ref = torch.autograd.grad(ref, (x, phi, bias, alpha), grads)
    for name, a, b in zip(("x", "phi", "bias", "alpha"), g_got, g_ref):
        assert a.dtype == (x.dtype if name == "x" else torch.float32)
        tol = STREAM_TOL[x.dtype] if name == "x" and x.dtype != torch.float32 else COEFF_TOL
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_coefficients(variant, n, T, C, dtype):
    if n == 8 and C > 2000:
        pytest.skip("covered by smaller shapes")
    if dtype == torch.float16 and n != 4:
        pytest.skip("fp16 loads are the bf16 code path; one n suffices")
    inputs = make_coeff_inputs(T, n, C, dtype, seed=n * 100 + C)
    check_coefficients(inputs, 20, variant, grad_seed=n)


@pytest.mark.parametrize("n, T, C", [(4, 5, 1000), (1, 70, 4096), (8, 3, 520)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coefficients_split_k(n, T, C, dtype, monkeypatch):
    """Few tokens, long rows: the forward GEMM splits K over programs (partials summed in a fixed order), checked
    to happen, against float64; and the same values as the unsplit kernel up to summation order."""
    from torch_mhc.ops import coefficients

    kernel = coefficients._gemm_fwd
    counted = CountLaunches(kernel)
    monkeypatch.setattr(coefficients, "_gemm_fwd", counted)
    inputs = make_coeff_inputs(T, n, C, dtype, seed=n + C)
    check_coefficients(inputs, 20, "paper", grad_seed=n)
    # the split path ran: several K slices per token block
    assert counted.launches and all(k["SPLIT"] for k in counted.kwargs) and all(g[1] > 1 for g in counted.grids)
    monkeypatch.setattr(coefficients, "_gemm_fwd", kernel)
    x, phi, bias, alpha = inputs
    split = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=20, eps=1e-6, variant="paper")
    monkeypatch.setattr(coefficients, "gemm_fwd_split", lambda n_t, K, bk: (1, K))
    whole = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=20, eps=1e-6, variant="paper")
    for a, b in zip(split, whole):
        assert rel_err(a, b) < COEFF_TOL


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stream_pre_post(n, T, C, dtype):
    g = torch.Generator().manual_seed(n + C)
    x = torch.randn(T, n, C, generator=g).to(dtype).to(DEVICE).requires_grad_()
    f = torch.randn(T, C, generator=g).to(dtype).to(DEVICE).requires_grad_()
    h_pre = torch.rand(T, n, generator=g).to(DEVICE).requires_grad_()
    h_post = (2 * torch.rand(T, n, generator=g)).to(DEVICE).requires_grad_()
    h_res = torch.softmax(torch.randn(T, n, n, generator=g), -1).to(DEVICE).requires_grad_()
    y = ops.fused_stream_pre(x, h_pre)
    out = ops.fused_stream_post(x, h_post, h_res, f)
    assert y.dtype == out.dtype == dtype and y.shape == (T, C) and out.shape == (T, n, C)
    ins64 = [t.detach().double().requires_grad_() for t in (x, h_pre, h_post, h_res, f)]
    y_ref = Fm.stream_pre(ins64[0], ins64[1])
    out_ref = Fm.stream_post(ins64[0], ins64[2], ins64[3], ins64[4])
    assert rel_err(y, y_ref) < STREAM_TOL[dtype]
    assert rel_err(out, out_ref) < STREAM_TOL[dtype]
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    go = torch.randn(out_ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((y, out), (x, h_pre, h_post, h_res, f), (gy.to(dtype), go.to(dtype)))
    ref = torch.autograd.grad((y_ref, out_ref), ins64, (gy.to(dtype).double(), go.to(dtype).double()))
    for name, a, b in zip(("x", "h_pre", "h_post", "h_res", "f"), got, ref):
        # coefficient grads are fp32 sums over C of products of rounded inputs
        tol = STREAM_TOL[dtype] if name in ("x", "f") else 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(a, b) < tol, name


def test_model_code_does_not_know_which_path_runs():
    """The same DecoderLM, forward and backward, through the kernels and through the reference."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=24, n_layers=1, n_heads=2, max_seq_len=8, connection="mhc", n_streams=4)
    model = DecoderLM(cfg).to(DEVICE)
    with torch.no_grad():
        for c in model.connections():
            c.phi.normal_(std=0.05)
            c.bias.normal_()
    idx = torch.randint(0, 256, (2, 8), device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with ops.use_backend(backend):
            _, loss = model(idx, idx)
        loss.backward()
        results[backend] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert results["triton"][0] == pytest.approx(results["reference"][0], rel=1e-4)
    for k, g in results["reference"][1].items():
        assert rel_err(results["triton"][1][k], g) < 1e-3, k


def test_fixed_mappings_and_static_go_through_reference_math():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 16, device=DEVICE)
    for kwargs in ({"learn": ("res",)}, {"dynamic": False, "bias_init": "identity"}):
        conn = ManifoldHyperConnection(16, 4, torch.nn.Identity(), **kwargs).to(DEVICE)
        with ops.use_backend("triton"):
            a = conn(x)
        with ops.use_backend("reference"):
            b = conn(x)
        torch.testing.assert_close(a, b)


def test_backend_switch():
    assert ops.get_backend() in ops.BACKENDS
    with pytest.raises(ValueError):
        ops.set_backend("cuda")
    with ops.use_backend("reference"):
        assert not ops.should_fuse(torch.zeros(1, device=DEVICE))
    with ops.use_backend("triton"):
        assert ops.should_fuse(torch.zeros(1)) and not ops.should_fuse(torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("large_logits", [False, True])
def test_coefficients_sinkhorn_edges(variant, iters, large_logits):
    """Few Sinkhorn iterations (V4 with 1: the leading row step only), and res logits above the exp
    clamp (the paper's shifted exp, whose shift sends the gradient to the largest logit)."""
    n, T, C = 4, 6, 16
    x, phi, bias, alpha = make_coeff_inputs(T, n, C, torch.float32, seed=iters + 10 * large_logits)
    if large_logits:
        with torch.no_grad():
            bias[2 * n :] += 70.0 + 3 * torch.arange(n * n, dtype=torch.float32, device=DEVICE)
    check_coefficients((x, phi, bias, alpha), iters, variant, grad_seed=iters)


@pytest.mark.parametrize("n", [2, 8])
def test_fused_sublayer_is_deterministic(n):
    """Same inputs, bit-identical outputs and gradients (no atomics; partial sums reduced in fixed order)."""
    T, C = 19, 24
    runs = []
    for _ in range(2):
        x, phi, bias, alpha = make_coeff_inputs(T, n, C, torch.bfloat16, seed=5)
        h_pre, h_post, h_res = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=3, eps=1e-6, variant="paper")
        out = ops.fused_stream_post(x, h_post, h_res, ops.fused_stream_pre(x, h_pre))
        grads = torch.autograd.grad(out, (x, phi, bias, alpha), torch.ones_like(out))
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chained_stack_against_reference(n, T, C, dtype, monkeypatch):
    """Three chained connections (read-ahead forward, chained backward: each post's kernel sums its reader's terms
    of the state gradient) against the float64 reference: the output, the input's and every parameter's gradient."""
    from torch_mhc.nn import chain_reads, chained_backward
    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)

    g = torch.Generator().manual_seed(T + n)
    conns = [ManifoldHyperConnection(C, n, torch.nn.Tanh(), layer_index=i) for i in range(3)]
    with torch.no_grad():
        for c in conns:
            c.phi.copy_(torch.randn(c.phi.shape, generator=g) / (n * C) ** 0.5 * 3)
            c.bias.copy_(torch.randn(c.bias.shape, generator=g))
    chain_reads(conns)
    x0 = torch.randn(T, n, C, generator=g).to(dtype)
    w = torch.randn(T, n, C, generator=g, dtype=torch.float64)
    results = {}
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        for c in conns:
            c.to(DEVICE, torch.float64 if dt == torch.float64 else torch.float32)
        x = x0.to(DEVICE, dt).requires_grad_()
        with ops.use_backend(backend), chained_backward():
            h = x
            for c in conns:
                h = c(h)
        params = [p for c in conns for p in c.parameters()]
        grads = torch.autograd.grad((h.double() * w.to(DEVICE)).sum(), [x] + params)
        results[backend] = (h, grads)
    (out, grads), (ref_out, ref_grads) = results["triton"], results["reference"]
    assert chain.launches == 2  # the two posts that have a reader ran the chained kernel
    assert rel_err(out, ref_out) < 4 * STREAM_TOL[dtype]
    assert rel_err(grads[0], ref_grads[0]) < 4 * STREAM_TOL[dtype]
    # bf16: three sublayers of rounded states; parameter gradients are sums over tokens with cancellation (measured
    # at T = 37, n = 1: chained 4.0e-2, unchained kernels 4.0e-2, the reference path in bf16 9.9e-2)
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert rel_err(a, b) < (6e-2 if dtype == torch.bfloat16 else 10 * COEFF_TOL)
