"""The torch_mhc:: custom ops (torch_mhc.nn.custom_ops) and torch.compile(fullgraph=True) of the model path.

Each op runs two implementations on CPU: the PyTorch reference (backend "auto" on CPU tensors) and the Triton kernels
through the interpreter (backend "triton", TRITON_INTERPRET=1 from conftest). Compiles use the "aot_eager" backend:
it traces forward and backward through AOT autograd (the ops' fake and backward registrations) without inductor's
C++ build (inductor works here too, 35 s for the small model: too slow for the suite).
"""

import pytest
import torch
import torch._dynamo

pytest.importorskip("triton")

from torch_mhc import ManifoldHyperConnection, ops  # noqa: E402
from torch_mhc.models import DecoderLM, ModelConfig  # noqa: E402
from torch_mhc.nn import custom_ops  # noqa: E402
from torch_mhc.nn import functional as Fm  # noqa: E402

OPS = torch.ops.torch_mhc
BACKENDS = ["auto", "triton"]  # on CPU tensors: the reference implementation, the kernels (interpreter)
# (variant, Sinkhorn iterations, softmax start, transposed): the paper's and V4's Sinkhorn on chip, res logits out
SPECS = [("paper", 3, False, False), ("deepseek-v4", 3, True, True), ("paper", 0, False, False)]
TOL = 2e-5  # fp32 against float64, relative to the largest reference value (as tests/test_ops.py)


@pytest.fixture
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def random_inputs(T, n, C, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    M = 2 * n + k
    return (torch.randn(T, n, C, generator=g, dtype=dtype), torch.randn(n * C, M, generator=g, dtype=dtype) * 0.5,
            torch.randn(M, generator=g, dtype=dtype), torch.rand(3, generator=g, dtype=dtype) + 0.5)


def close(a, b, tol=TOL):
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.double().abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,iters,softmax,transpose", SPECS)
def test_opcheck_coefficients(backend, variant, iters, softmax, transpose):
    n, C = 4, 8
    x, phi, bias, alpha = random_inputs(6, n, C, n * n, seed=iters + softmax)
    cfg = (1e-6, variant, iters, softmax, transpose)
    args = [t.requires_grad_() for t in (x, phi, bias, alpha)] + [*cfg, False]
    torch.library.opcheck(OPS.mhc_coefficients.default, args)
    pre, post, res, raw, inv = OPS.mhc_coefficients(*args)
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(t.shape, generator=g) for t in (pre, post, res)]
    torch.library.opcheck(OPS.mhc_coefficients_backward.default,
                          [t.detach() for t in (x, phi, bias, alpha, raw, inv)] + grads + [*cfg])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_streams(backend, dtype):
    """bf16 streams (fp32 coefficients) too: the fake implementations must give each output's dtype."""
    g = torch.Generator().manual_seed(3)
    T, n, C = 5, 4, 12
    x, f, dy = (torch.randn(shape, generator=g).to(dtype) for shape in ((T, n, C), (T, C), (T, C)))
    h_pre, h_post = torch.rand(T, n, generator=g), torch.rand(T, n, generator=g)
    h_res = torch.rand(T, n, n, generator=g)
    dout = torch.randn(T, n, C, generator=g).to(dtype)
    torch.library.opcheck(OPS.stream_pre.default, [x.clone().requires_grad_(), h_pre.clone().requires_grad_()])
    torch.library.opcheck(OPS.stream_post.default, [t.clone().requires_grad_() for t in (x, h_post, h_res, f)])
    torch.library.opcheck(OPS.stream_pre_backward.default, [x, h_pre, dy])
    torch.library.opcheck(OPS.stream_post_backward.default, [x, h_post, h_res, f, dout])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,iters,softmax,transpose", SPECS[:2])
def test_coefficient_op_matches_float64_reference(backend, variant, iters, softmax, transpose):
    """Forward and all four input gradients of the op (fp32) against the reference math in float64."""
    n, C = 4, 8
    inputs = random_inputs(7, n, C, n * n, seed=11 + iters + softmax)
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    out = OPS.mhc_coefficients(*ours, 1e-6, variant, iters, softmax, transpose, False)[:3]
    with ops.use_backend("reference"):
        expected = Fm.mhc_coefficients(ref[0], *ref[1:], iters=iters, eps=1e-6, variant=variant)
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in expected]
    torch.autograd.backward(out, [t.float() for t in grads])
    torch.autograd.backward(expected, grads)
    for a, b in zip(out, expected):
        assert a.dtype == torch.float32 and close(a, b)
    for a, b in zip(ours, ref):
        assert close(a.grad, b.grad), (a.grad - b.grad).abs().max()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_stream_ops_match_float64_reference(backend):
    g = torch.Generator().manual_seed(21)
    T, n, C = 6, 2, 20
    inputs = [torch.randn(T, n, C, generator=g), torch.rand(T, n, generator=g), torch.rand(T, n, n, generator=g),
              torch.randn(T, C, generator=g)]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    out = (custom_ops.fused_stream_pre(ours[0], ours[1]), custom_ops.fused_stream_post(*ours))
    expected = (Fm.stream_pre_reference(ref[0], ref[1]), Fm.stream_post_reference(*ref))
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in expected]
    torch.autograd.backward(out, [t.float() for t in grads])
    torch.autograd.backward(expected, grads)
    for a, b in zip(out + tuple(t.grad for t in ours), expected + tuple(t.grad for t in ref)):
        assert close(a, b, 1e-5)


def test_gradcheck_through_the_ops_registration():
    """float64 inputs take the reference implementation; gradcheck checks register_autograd and the backward ops."""
    x, phi, bias, alpha = (t.requires_grad_() for t in random_inputs(3, 2, 3, 4, seed=2, dtype=torch.float64))
    for variant, iters, softmax, transpose in SPECS:
        assert torch.autograd.gradcheck(
            lambda *t, c=(variant, iters, softmax, transpose): OPS.mhc_coefficients(*t, 1e-6, *c, False)[:3],
            (x, phi, bias, alpha))
    h = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(3, 2, 2, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS.stream_pre, (x, h))
    assert torch.autograd.gradcheck(OPS.stream_post, (x, h, h_res, f))


def test_bad_arguments_are_named_errors():
    x, phi, bias, alpha = random_inputs(2, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="variant must be one of"):
        OPS.mhc_coefficients(x, phi, bias, alpha, 1e-6, "v5", 3, False, False, False)
    with pytest.raises(ValueError, match="sinkhorn_iters must be >= 0"):
        OPS.mhc_coefficients(x, phi, bias, alpha, 1e-6, "paper", -1, False, False, False)


def torch_mhc_nodes(fn, *args) -> list[str]:
    """The torch_mhc:: ops in the graph dynamo captures for ``fn(*args)``; asserts one graph and no break."""
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    return [str(node.target) for gm in explained.graphs for node in gm.graph.nodes
            if str(node.target).startswith("torch_mhc.")]


def compiled_against_eager(model, loss_fn, *args):
    """(eager reference loss and gradients, compiled loss and gradients; fullgraph=True, aot_eager)."""
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for run in ("eager", "compiled"):
        if run == "eager":
            with ops.use_backend("reference"):
                loss = loss_fn(*args)
        else:
            torch._dynamo.reset()
            loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*args)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    return results


def randomise_connections(model, seed):
    """Connection parameters far from their init, so that every coefficient matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ManifoldHyperConnection):
                for p in m.projection():
                    p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
def test_connection_compiles_fullgraph(backend, variant):
    torch.manual_seed(1)
    dim, n = 16, 4
    conn = ManifoldHyperConnection(dim, n, torch.nn.Linear(dim, dim), variant=variant, sinkhorn_iters=4)
    randomise_connections(conn, seed=3)
    x = torch.randn(3, 5, n, dim, requires_grad=True)

    def loss_fn(x):
        return (conn(x) ** 2).mean()

    nodes = torch_mhc_nodes(loss_fn, x)
    assert nodes.count("torch_mhc.mhc_coefficients.default") == 1
    assert nodes.count("torch_mhc.stream_pre.default") == nodes.count("torch_mhc.stream_post.default") == 1
    (l_ref, g_ref), (l_c, g_c) = compiled_against_eager(conn, loss_fn, x)
    assert close(l_c, l_ref, 1e-5)
    for a, b in zip(g_c, g_ref):
        assert close(a, b, 1e-4)


@pytest.mark.parametrize("kind", ["hc", "circulant", "learn pre and res"])
def test_other_connections_compile_fullgraph(kind):
    """HC (stream ops only), a map outside the kernels (the op hands out its res logits; the map traces in
    PyTorch) and a connection with a fixed mapping (coefficients apart from the sublayer read)."""
    from torch_mhc import HyperConnection

    torch.manual_seed(2)
    f = torch.nn.Linear(16, 16)
    conn = (HyperConnection(16, 4, f) if kind == "hc" else
            ManifoldHyperConnection(16, 4, f, h_res="circulant") if kind == "circulant" else
            ManifoldHyperConnection(16, 4, f, learn=("pre", "res")))
    with torch.no_grad():
        for p in conn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 5, 4, 16, requires_grad=True)

    def loss_fn(x):
        return (conn(x) ** 2).mean()

    nodes = torch_mhc_nodes(loss_fn, x)
    assert nodes.count("torch_mhc.mhc_coefficients.default") == (kind != "hc")
    assert nodes.count("torch_mhc.stream_pre.default") == nodes.count("torch_mhc.stream_post.default") == 1
    (l_ref, g_ref), (l_c, g_c) = compiled_against_eager(conn, loss_fn, x)
    assert close(l_c, l_ref, 1e-5)
    for a, b in zip(g_c, g_ref):
        assert close(a, b, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,moe", [("paper", False), ("deepseek-v4", False), ("paper", True)])
def test_decoder_compiles_fullgraph(backend, variant, moe):
    if moe and backend == "triton":
        pytest.skip("MoE once, with the reference implementation (the mHC ops are the same)")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, variant=variant, moe=moe,
                      n_routed_experts=4, first_dense_layers=1, sinkhorn_iters=5)
    model = DecoderLM(cfg)
    randomise_connections(model, seed=4)
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))

    def loss_fn(idx, targets):
        return model(idx, targets)[1]

    nodes = torch_mhc_nodes(loss_fn, idx, targets)
    assert nodes.count("torch_mhc.mhc_coefficients.default") == 2 * cfg.n_layers
    assert nodes.count("torch_mhc.stream_post.default") == 2 * cfg.n_layers
    (l_ref, g_ref), (l_c, g_c) = compiled_against_eager(model, loss_fn, idx, targets)
    assert close(l_c, l_ref, 1e-5)
    for a, b in zip(g_c, g_ref):
        assert close(a, b, 1e-4)


def test_dynamic_token_count_does_not_recompile():
    """A decode step's token count changes: with dynamic=True one graph serves T = 5 and T = 9 (T = 1 would be
    dynamo's own 0/1 specialisation)."""
    import torch._dynamo.testing

    conn = ManifoldHyperConnection(16, 4, torch.nn.Linear(16, 16), sinkhorn_iters=4)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(lambda x: conn(x).sum(), fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for T in (5, 9):
        x = torch.randn(2, T, 4, 16, requires_grad=True)
        step(x).backward()
        with ops.use_backend("reference"):
            x_ref = x.detach().requires_grad_()
            conn(x_ref).sum().backward()
        assert close(x.grad, x_ref.grad, 1e-5)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] >= 1


def test_reference_backend_compiles_plain_pytorch():
    """Backend "reference" under compile: the PyTorch path, no custom op in the graph."""
    conn = ManifoldHyperConnection(8, 2, torch.nn.Linear(8, 8))
    x = torch.randn(2, 3, 2, 8)
    with ops.use_backend("reference"):
        assert torch_mhc_nodes(lambda x: conn(x).sum(), x) == []


def test_eager_does_not_call_the_ops(monkeypatch):
    """Outside torch.compile the fused path is the kernels' autograd Functions (link, read-ahead), unchanged."""
    def refuse(*args, **kwargs):
        raise AssertionError("custom op called in eager mode")

    for name in ("fused_mhc_coefficients", "fused_stream_pre", "fused_stream_post", "fused_sublayer_pre"):
        monkeypatch.setattr(custom_ops, name, refuse)
    conn = ManifoldHyperConnection(8, 2, torch.nn.Linear(8, 8))
    x = torch.randn(2, 3, 2, 8, requires_grad=True)
    with ops.use_backend("triton"):
        conn(x).sum().backward()
        Fm.mhc_coefficients(x, *conn.projection())
    assert x.grad is not None
