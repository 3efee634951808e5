"""Fused Triton ops against the float64 reference (fresh random inputs, awkward shapes).

On a machine without a GPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest) on small shapes; with a GPU they also run at full size on CUDA.
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import CountLaunches  # noqa: E402
from emulate_dots import emulated_errors, rel_err  # noqa: E402
from torch_mhc import ManifoldHyperConnection, ops  # noqa: E402
from torch_mhc.models import DecoderLM, ModelConfig  # noqa: E402
from torch_mhc.nn import functional as Fm  # noqa: E402
from torch_mhc.ops.coefficients import dot_precision  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(37, 24), (5, 40)] + ([(4099, 1280), (1000, 7168)] if CUDA else [])  # (tokens, C): not multiples of blocks

# Tolerances, relative to the largest reference value. Coefficients (fp32 whatever the streams): fp32 arithmetic up to
# summation order, 2e-5 in the interpreter (exact fp32 products) and 4e-5 on a GPU (approximate exp and division,
# other summation orders). The dots' input precision (fp32 products for fp32 streams, tf32 for bf16/fp16: see
# torch_mhc.ops.coefficients.dot_precision) is invisible to the interpreter; on CUDA each check adds twice what that
# precision costs on the test's own inputs, measured by emulating it on the float64 reference (tests/emulate_dots.py).
# bf16/fp16 outputs are rounded to the streams' dtype: half an ulp (2^-8 for bf16, 2^-11 for fp16)
# when rounding to nearest, as GPUs do; Triton's interpreter truncates fp32 -> bf16 (a full ulp,
# 2^-7), so bf16 gets 2^-7 on the GPU and 2^-6 in the interpreter; fp16 (numpy-native) 2^-10.
COEFF_TOL = 4e-5 if CUDA else 2e-5
STREAM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7 if CUDA else 2 ** -6, torch.float16: 2 ** -10}
FP32_COEFF_TOL = 2e-5  # what fp32 streams' coefficients must meet, arithmetic aside: the dots' rounding included


def tolerance(base: float, emulated: float) -> float:
    """The tolerance of one checked tensor: ``base`` (arithmetic, output rounding) and, where the dots' precision
    is real (CUDA), twice the error the emulated precision gives on the test's own inputs."""
    return base + 2 * emulated if CUDA else base


def make_coeff_inputs(T, n, C, dtype, seed, k=None):
    """x [T, n, C], phi [n*C, 2n+k], bias, alpha (k res logits; None: Sinkhorn's n^2)."""
    g = torch.Generator().manual_seed(seed)
    M = 2 * n + (n * n if k is None else k)
    x = torch.randn(T, n, C, generator=g).to(dtype)
    phi = torch.randn(n * C, M, generator=g) / (n * C) ** 0.5 * 3
    bias = torch.randn(M, generator=g)
    alpha = torch.rand(3, generator=g) + 0.5
    return [t.to(DEVICE).requires_grad_() for t in (x, phi, bias, alpha)]


def coefficients_reference(inputs, iters, variant, grad_seed, h_res=None):
    """-> (a function computing the float64 reference's outputs and input gradients (random output gradients) as a
    list, the output gradients). ``h_res``: the H_res map (None: the variant's Sinkhorn)."""
    x, phi, bias, alpha = inputs
    gen = torch.Generator().manual_seed(grad_seed)
    n = x.shape[-2]
    shapes = [x.shape[:-1], x.shape[:-1], x.shape[:-1] + (n,)]
    grads = [torch.randn(sh, generator=gen, dtype=torch.float64).to(x.device) for sh in shapes]

    def reference():
        ref = Fm.mhc_coefficients(x.double(), phi.double(), bias.double(), alpha.double(), iters=iters, eps=1e-6,
                                  variant=variant, h_res=h_res)
        outs, out_grads = zip(*[(r, g) for r, g in zip(ref, grads) if r.requires_grad])  # H_res = I: no graph
        return [*ref, *torch.autograd.grad(outs, (x, phi, bias, alpha), out_grads)]

    return reference, grads


def check_coefficients(inputs, iters, variant, grad_seed, h_res=None, scale=1.0):
    """Fused coefficients and their gradients (random output gradients) against the float64 reference, with
    tolerances from the emulated dot precision on CUDA (see :func:`tolerance`), times ``scale`` (for inputs where
    fp32 itself, the reference path included, is further from float64). ``h_res``: the H_res map."""
    x, phi, bias, alpha = inputs
    reference, grads = coefficients_reference(inputs, iters, variant, grad_seed, h_res)
    ref = reference()
    emulated = emulated_errors(reference, dot_precision(x.dtype))
    got = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=iters, eps=1e-6, variant=variant, h_res=h_res)
    for a, b, e in zip(got, ref[:3], emulated):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < scale * tolerance(COEFF_TOL, e)
    g_got = torch.autograd.grad(got, (x, phi, bias, alpha), [g.float() for g in grads])
    for name, a, b, e in zip(("x", "phi", "bias", "alpha"), g_got, ref[3:], emulated[3:]):
        assert a.dtype == (x.dtype if name == "x" else torch.float32)
        base = STREAM_TOL[x.dtype] if name == "x" and x.dtype != torch.float32 else COEFF_TOL
        assert rel_err(a, b) < scale * tolerance(base, e), name


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
    monkeypatch.setattr(coefficients, "gemm_fwd_split", lambda n_t, K, bk, batch_invariant=False: (1, K))
    whole = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=20, eps=1e-6, variant="paper")
    for a, b in zip(split, whole):
        assert rel_err(a, b) < COEFF_TOL


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16])
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
        assert ops.should_fuse(torch.zeros(1, 4, 8)) and not ops.should_fuse(torch.zeros(1, 4, 8, dtype=torch.float64))
        assert all(ops.should_fuse(torch.zeros(1, n, 8)) for n in range(1, 17))
        assert all(ops.should_fuse(torch.zeros(1, n, 8), width=2 * n + n * n) for n in range(1, 17))
        # beyond n = 8 the coefficient kernels take Sinkhorn's width only (identity: 2n, circulant: 3n)
        assert not any(ops.should_fuse(torch.zeros(1, n, 8), width=w) for n in (9, 12, 16) for w in (2 * n, 3 * n))
        assert not ops.should_fuse(torch.zeros(1, 17, 8), width=17 * 19)
        assert not any(ops.should_fuse(torch.zeros(1, n, 8)) for n in (17, 32))


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("iters", [1, 2, 20])
@pytest.mark.parametrize("large_logits", [False, True])
def test_coefficients_sinkhorn_edges(variant, iters, large_logits):
    """Few Sinkhorn iterations (V4 with 1: the leading row step only), and res logits above the exp
    clamp (the paper's shifted exp, whose shift sends the gradient to the largest logit). (Logits spread far
    enough to underflow whole rows of the exp start: test_streams_any_n's edges at n = 6.)"""
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


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("T, C", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chained_stack_against_reference(n, T, C, dtype, monkeypatch):
    """Three chained connections (read-ahead forward, chained backward: each post's kernel sums its reader's terms
    of the state gradient) against the float64 reference: the output, the input's and every parameter's gradient."""
    from torch_mhc.nn import chained_backward, run_chain
    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)

    g = torch.Generator().manual_seed(T + n)
    conns = [ManifoldHyperConnection(C, n, torch.nn.Tanh(), layer_index=i) for i in range(3)]
    with torch.no_grad():
        for c in conns:
            c.phi.copy_(torch.randn(c.phi.shape, generator=g) / (n * C) ** 0.5 * 3)
            c.bias.copy_(torch.randn(c.bias.shape, generator=g))
    x0 = torch.randn(T, n, C, generator=g).to(dtype)
    w = torch.randn(T, n, C, generator=g, dtype=torch.float64)

    def run(backend, dt):
        for c in conns:
            c.to(DEVICE, torch.float64 if dt == torch.float64 else torch.float32)
        x = x0.to(DEVICE, dt).requires_grad_()
        with ops.use_backend(backend), chained_backward():
            h = run_chain(conns, x)
        params = [p for c in conns for p in c.parameters()]
        return [h, *torch.autograd.grad((h.double() * w.to(DEVICE)).sum(), [x] + params)]

    out, *grads = run("triton", dtype)
    ref_out, *ref_grads = run("reference", torch.float64)
    emulated = emulated_errors(lambda: run("reference", torch.float64), dot_precision(dtype))
    assert chain.launches == 2  # the two posts that have a reader ran the chained kernel
    if dtype == torch.float32:  # fp32 streams: the dots' rounding is below fp32's tolerance (tf32 was at 4x)
        assert max(emulated) < FP32_COEFF_TOL
    assert rel_err(out, ref_out) < tolerance(4 * STREAM_TOL[dtype], emulated[0])
    assert rel_err(grads[0], ref_grads[0]) < tolerance(4 * STREAM_TOL[dtype], emulated[1])
    # bf16: three sublayers of rounded states; parameter gradients are sums over tokens with cancellation (measured
    # at T = 37, n = 1: chained 4.0e-2, unchained kernels 4.0e-2, the reference path in bf16 9.9e-2)
    for a, b, e in zip(grads[1:], ref_grads[1:], emulated[2:]):
        assert rel_err(a, b) < tolerance(6e-2 if dtype == torch.bfloat16 else 10 * COEFF_TOL, e)


# The fp32 cases of test_coefficients and test_coefficients_sinkhorn_edges, with their seeds.
FP32_CASES = ([dict(n=n, T=T, C=C, variant=v, iters=20, seed=n * 100 + C, grad_seed=n, large=False)
               for n in (1, 2, 4, 8) for T, C in SHAPES for v in ("paper", "deepseek-v4") if not (n == 8 and C > 2000)]
              + [dict(n=4, T=6, C=16, variant=v, iters=it, seed=it + 10 * large, grad_seed=it, large=large)
                 for v in ("paper", "deepseek-v4") for it in (1, 2) for large in (False, True)])


@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fp32_streams_keep_fp32_products(case):
    """fp32 streams ask for fp32 coefficients: what the kernels' dot precision for fp32 streams costs, emulated on
    the float64 reference with the coefficient tests' own inputs, stays below the fp32 tolerance for every output
    and gradient. With tf32 (truncated to 10 mantissa bits) it does not: 1-5x (the Sinkhorn edges worst)."""
    n, T, C = case["n"], case["T"], case["C"]
    inputs = make_coeff_inputs(T, n, C, torch.float32, seed=case["seed"])
    if case["large"]:
        with torch.no_grad():
            inputs[2][2 * n:] += 70.0 + 3 * torch.arange(n * n, dtype=torch.float32, device=DEVICE)
    reference, _ = coefficients_reference(inputs, case["iters"], case["variant"], case["grad_seed"])
    errors = emulated_errors(reference, dot_precision(torch.float32))
    assert max(errors) < FP32_COEFF_TOL, errors


def test_block_tables_and_budgets_cover_exactly_the_fused_stream_counts():
    """should_fuse's FUSED_STREAMS (the stream kernels, 1 to 16) and COEFFICIENT_STREAMS (the coefficient kernels,
    1 to 16; every map at 1 to 8, MAP_STREAMS) are what the kernels are built for: every n takes the blocks and
    register budget of its padded count (the tables are keyed by the powers of two the kernels' aranges take) and is
    traced by the compile gate; an n beyond the tables is a clear ValueError, never a KeyError."""
    from torch_mhc.ops import aot, coefficients, streams
    from torch_mhc.ops.blocks import padded, padded_entry

    fused, coefficient = set(ops.FUSED_STREAMS), set(ops.COEFFICIENT_STREAMS)
    assert fused == coefficient == set(range(1, 17)) and set(ops.MAP_STREAMS) == set(range(1, 9))
    assert [padded(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8] + [16] * 8 + [32]
    tables = {n_set: tables for n_set, tables in (
        (frozenset(coefficient), (coefficients.GEMM_FWD_BLOCKS, coefficients.GEMM_BWD_BLOCKS,
                                  coefficients.GEMM_FWD_BLOCKS_FP32, coefficients.GEMM_BWD_BLOCKS_FP32,
                                  coefficients.EPI_BLOCK)),
        (frozenset(fused), (aot.STREAM_REG_BUDGET,)))}
    for n_set, n_tables in tables.items():
        for table in n_tables:
            assert set(table) == {padded(n) for n in n_set}
            for n in n_set:
                assert padded_entry(table, n) == table[padded(n)]
            with pytest.raises(ValueError, match="n = 17"):
                padded_entry(table, 17)
    for n in fused:  # the stream kernels' token blocks are powers of two (tl.arange) for every n and C
        for C in (8, 24, 1000):
            for post_bwd in (False, True):
                bt, bc, _ = streams._blocks(n, C, post_bwd)
                assert bt & (bt - 1) == 0 and bc & (bc - 1) == 0, (n, C, post_bwd)
    assert {case["n"] for case in aot.GATE_CASES} == coefficient
    assert {case["n"] for case in aot.STREAM_CASES} == set(aot.WIDE_STREAMS) == fused - set(ops.MAP_STREAMS)


def _connections(n, C):
    """Every public connection that calls the fused ops: dynamic mHC (paper, V4), static mHC, HC and static HC."""
    from torch_mhc import HyperConnection

    return [ManifoldHyperConnection(C, n, torch.nn.Tanh(), layer_index=1),
            ManifoldHyperConnection(C, n, torch.nn.Tanh(), variant="deepseek-v4"),
            ManifoldHyperConnection(C, n, torch.nn.Tanh(), dynamic=False),
            HyperConnection(C, n, torch.nn.Tanh(), layer_index=1),
            HyperConnection(C, n, torch.nn.Tanh(), dynamic=False)]


def assert_every_connection_matches_reference(n, C=8, T=5):
    """Every public connection (:func:`_connections`) and a 2-layer mHC DecoderLM at n streams, forward and backward
    under chained backward, through the triton backend and the reference: the same results (the kernels' fp32 sums
    in another order); should_fuse as FUSED_STREAMS says, and never for the coefficient kernels beyond
    COEFFICIENT_STREAMS."""
    from torch_mhc.nn import chained_backward

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
                assert ops.should_fuse(x) is (backend == "triton" and n in ops.FUSED_STREAMS)
                assert ops.should_fuse(x, width=2 * n + n * n) is (backend == "triton" and n in ops.COEFFICIENT_STREAMS)
                out = conn(x)
            grads = torch.autograd.grad(weighted(out), [x, *conn.parameters()], allow_unused=True)
            results.append((out, grads))
        (a, ga), (b, gb) = results
        assert rel_err(a, b) < 1e-5
        for u, v in zip(ga, gb):
            assert (u is None) == (v is None)
            if u is not None:
                assert rel_err(u, v) < 1e-4
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connection="mhc", n_streams=n)
    model = DecoderLM(cfg).to(DEVICE)
    idx = torch.randint(0, 256, (2, 8), device=DEVICE)
    losses = []
    for backend in ("triton", "reference"):
        with ops.use_backend(backend), chained_backward():
            _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("n", [9, 12, 16, 17])
def test_stream_counts_beyond_the_maps(n, monkeypatch):
    """n beyond MAP_STREAMS on the path that fuses (the triton backend; CUDA tensors under auto): every connection
    and a DecoderLM run forward and backward with the reference path's results, no crash; at n = 9..16 pre and post
    run the stream kernels and dynamic mHC's Sinkhorn coefficients the coefficient kernels (HC's, static mHC's:
    the reference), at n = 17 nothing fuses. (n = 3, 5, 6 used to raise KeyError in a block table, HC and static
    mHC to fail in the backward.)"""
    from torch_mhc.ops import coefficients, streams

    post, gemm = CountLaunches(streams._post_fwd), CountLaunches(coefficients._gemm_fwd)
    monkeypatch.setattr(streams, "_post_fwd", post)
    monkeypatch.setattr(coefficients, "_gemm_fwd", gemm)
    assert_every_connection_matches_reference(n)
    assert (post.launches > 0) is (gemm.launches > 0) is (n <= 16)


def weighted(t):
    return (t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64, device=t.device).view_as(t)).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch(dtype):
    """T = 0 through every fused op, forward and backward (the host code divided by the token count): correctly
    shaped empty outputs and input gradients, zero parameter gradients, as the reference gives."""
    from torch_mhc.nn import chained_backward, run_chain

    n, C = 4, 16
    x, phi, bias, alpha = make_coeff_inputs(0, n, C, dtype, seed=0)
    for variant in ("paper", "deepseek-v4"):
        got = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=20, eps=1e-6, variant=variant)
        assert [t.shape for t in got] == [(0, n), (0, n), (0, n, n)]
        grads = torch.autograd.grad(got, (x, phi, bias, alpha), [torch.ones_like(t) for t in got])
        assert grads[0].shape == x.shape and grads[0].dtype == dtype
        assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[1:], (phi, bias, alpha)))
    h = [torch.rand(0, n, device=DEVICE, requires_grad=True) for _ in range(2)]
    h_res = torch.rand(0, n, n, device=DEVICE, requires_grad=True)
    f = torch.randn(0, C, device=DEVICE, dtype=dtype, requires_grad=True)
    y = ops.fused_stream_pre(x, h[0])
    out = ops.fused_stream_post(x, h[1], h_res, f)
    assert y.shape == (0, C) and out.shape == (0, n, C) and y.dtype == out.dtype == dtype
    grads = torch.autograd.grad((y.sum() + out.sum()), (x, h[0], h[1], h_res, f))
    assert [g.shape for g in grads] == [x.shape, (0, n), (0, n), (0, n, n), (0, C)]
    # the sublayer Functions with read-ahead and chained backward, through connections (a [2, 0] lead shape)
    conns = [ManifoldHyperConnection(C, n, torch.nn.Tanh(), layer_index=i).to(DEVICE) for i in range(3)]
    results = []
    for backend in ("triton", "reference"):
        s0 = torch.randn(2, 0, n, C, device=DEVICE, dtype=dtype, requires_grad=True)
        with ops.use_backend(backend), chained_backward():
            s = run_chain(conns, s0)
        params = [p for c in conns for p in c.parameters()]
        results.append((s, torch.autograd.grad(s.float().sum(), [s0, *params])))
    (a, ga), (b, gb) = results
    assert a.shape == b.shape == (2, 0, n, C)
    for u, v in zip(ga, gb):
        assert u.shape == v.shape and torch.equal(u.float(), v.float())


def test_empty_channels():
    """C = 0: dynamic coefficients (fused or not) refuse it by name, before a NaN from the RMS of an empty row or a
    failed reshape in the kernels' host code; pre and post of empty rows take the reference path and give empty
    results; a connection cannot be built with dim 0."""
    n, T = 4, 3
    x = torch.randn(T, n, 0, device=DEVICE, requires_grad=True)
    phi = torch.randn(0, 2 * n + n * n, device=DEVICE)
    bias, alpha = torch.randn(2 * n + n * n, device=DEVICE), torch.rand(3, device=DEVICE)
    for backend in ("triton", "reference"):
        with ops.use_backend(backend):
            assert not ops.should_fuse(x)
            for call in (Fm.mhc_coefficients, Fm.mhc_sublayer_pre):
                with pytest.raises(ValueError, match="at least one channel"):
                    call(x, phi, bias, alpha)
            y = Fm.stream_pre(x, torch.rand(T, n, device=DEVICE))
            out = Fm.stream_post(x, torch.rand(T, n, device=DEVICE), torch.rand(T, n, n, device=DEVICE), y)
            assert y.shape == (T, 0) and out.shape == (T, n, 0)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        ManifoldHyperConnection(0, n)


def chained_stack(n: int, C: int, T: int, count: int) -> torch.Tensor:
    """``count`` chained mHC connections (Tanh sublayers) over a fresh random state ``[T, n, C]`` that requires
    grad; returns the last state. Call inside the backend and ``chained_backward`` scopes under test."""
    from torch_mhc.nn import run_chain

    conns = [ManifoldHyperConnection(C, n, torch.nn.Tanh(), layer_index=i).to(DEVICE) for i in range(count)]
    return run_chain(conns, torch.randn(T, n, C, device=DEVICE, requires_grad=True))


def test_launches_run_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every kernel launch of the fused ops (all nine
    kernels, forward and backward, read-ahead and chained) happens inside a device guard for its own tensors'
    device. (On CPU the guard is a no-op; here it is replaced by one that records the device.)"""
    from torch_mhc.nn import chained_backward
    from torch_mhc.ops import blocks, coefficients, streams

    active = []

    class Guard:
        def __init__(self, t):
            self.device = None if t is None else t.device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    launched = {}

    class Checked(CountLaunches):
        def __getitem__(self, grid):
            run = super().__getitem__(grid)

            def launch(*args, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                assert active and active[-1] == tensors[0].device, self.kernel.__name__
                launched[self.kernel.__name__] = launched.get(self.kernel.__name__, 0) + 1
                return run(*args, **kwargs)
            return launch

    monkeypatch.setattr(blocks, "device_guard", Guard)
    for mod, names in ((coefficients, ("_gemm_fwd", "_epilogue_fwd", "_epilogue_bwd", "_gemm_bwd")),
                       (streams, ("_pre_fwd", "_pre_bwd", "_post_fwd", "_post_bwd", "_post_bwd_chain"))):
        for name in names:
            monkeypatch.setattr(mod, name, Checked(getattr(mod, name)))
    n, C, T = 4, 16, 6
    with ops.use_backend("triton"), chained_backward():
        s = chained_stack(n, C, T, 2)
        inputs = make_coeff_inputs(T, n, C, torch.float32, seed=1)
        h_pre, h_post, h_res = ops.fused_mhc_coefficients(*inputs, iters=3, eps=1e-6, variant="paper")
        out = ops.fused_stream_post(inputs[0], h_post, h_res, ops.fused_stream_pre(inputs[0], h_pre))
    (s.sum() + out.sum()).backward()
    assert sorted(launched) == sorted(["_gemm_fwd", "_epilogue_fwd", "_epilogue_bwd", "_gemm_bwd", "_pre_fwd",
                                       "_pre_bwd", "_post_fwd", "_post_bwd", "_post_bwd_chain"])
    assert not active


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_second_gpu_without_set_device():
    """Tensors on cuda:1 while cuda:0 is current: the fused ops give the reference results there."""
    assert torch.cuda.current_device() == 0
    n, T, C = 4, 37, 24
    inputs = [t.detach().to("cuda:1").requires_grad_() for t in make_coeff_inputs(T, n, C, torch.float32, seed=3)]
    check_coefficients(inputs, 20, "paper", grad_seed=1)
    x = inputs[0]
    h = torch.rand(T, n, device="cuda:1")
    y = ops.fused_stream_pre(x, h)
    torch.testing.assert_close(y, Fm.stream_pre(x.double(), h.double()).float(), rtol=1e-5, atol=1e-5)
    assert torch.cuda.current_device() == 0


def test_store_reload_loops_are_not_pipelined(monkeypatch):
    """The read-ahead post and the chained post backward store a chunk and load it back after a barrier in one loop
    iteration: their launches take num_stages=1, so Triton's software pipeliner leaves that loop alone."""
    from torch_mhc.nn import chained_backward
    from torch_mhc.ops import streams

    post, chain = CountLaunches(streams._post_fwd), CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_fwd", post)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    with ops.use_backend("triton"), chained_backward():
        s = chained_stack(n=2, C=16, T=5, count=3)
    s.sum().backward()
    reads_ahead = [k for k in post.kwargs if k["PROJ"]]
    assert len(reads_ahead) == 2 and chain.launches == 2  # the posts that have a reader
    assert all(k.get("num_stages") == 1 for k in reads_ahead + chain.kwargs)


def test_on_chip_maps_beyond_n_8_take_the_logits_path():
    """Beyond MAP_STREAMS the gate traces Sinkhorn and the logits epilogue only: an on-chip map that reaches the
    kernels there (only one whose logit count is n^2 can: unfused_reason) is handed its logits instead."""
    from torch_mhc.nn.maps import make_h_res

    circ8, circ16 = make_h_res("circulant", 8), make_h_res("circulant", 16)
    assert ops.kernel_spec(circ8, 20, "paper", 8)[0] == "mixture"
    assert ops.kernel_spec(circ16, 20, "paper", 16) == ("logits", 16)
    assert ops.kernel_spec(None, 20, "paper", 16)[0] == "sinkhorn"


def test_direct_calls_with_other_n_raise_a_clear_error():
    """The fused entry points called directly (not through torch_mhc.nn.functional) with an n the kernels are not
    built for: a ValueError that names n and the way out, before any kernel runs (a KeyError in a block table, or
    a forward that ran and a backward that failed, before)."""
    from torch_mhc.nn.maps import make_h_res

    # 16 under a circulant map (k = 16 logits): the coefficient kernels take only Sinkhorn there (the stream kernels
    # take it); 17: every kernel
    for n, k in ((16, 16), (17, None)):
        C, T = 8, 4
        x, phi, bias, alpha = make_coeff_inputs(T, n, C, torch.float32, seed=0, k=k)
        m = None if k is None else make_h_res("circulant", n)
        h = torch.rand(T, n, device=DEVICE)
        h_res = torch.rand(T, n, n, device=DEVICE)
        f = torch.randn(T, C, device=DEVICE)
        calls = [lambda: ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=2, eps=1e-6, variant="paper", h_res=m),
                 lambda: ops.fused_sublayer_pre(x, phi, bias, alpha, iters=2, eps=1e-6, variant="paper", h_res=m)]
        if n == 17:
            calls += [lambda: ops.fused_stream_pre(x, h), lambda: ops.fused_stream_post(x, h, h_res, f)]
        for call in calls:
            with pytest.raises(ValueError, match=f"n = {n}"):
                call()
