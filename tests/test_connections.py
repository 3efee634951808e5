import pytest
import torch
from torch import nn
from torch.func import functional_call

from torch_mhc import (
    HyperConnection,
    HyperHead,
    ManifoldHyperConnection,
    Residual,
    expand_streams,
    merge_streams,
)


# ---------------------------------------------------------------- independent float64 transcriptions
def spec_mhc_token(x, phi, b, alpha, n, iters, eps, variant):
    """One token, spec sections 2-3 written out: x [n, C] float64."""
    row = x.reshape(-1).double()
    r = torch.sqrt((row * row).mean() + eps)
    raw = (row / r) @ phi.double()
    pre = alpha[0] * raw[:n] + b[:n]
    post = alpha[1] * raw[n : 2 * n] + b[n : 2 * n]
    res = alpha[2] * raw[2 * n :] + b[2 * n :]
    h_pre = 1 / (1 + torch.exp(-pre))
    h_post = 2 / (1 + torch.exp(-post))
    if variant == "paper":
        m = torch.exp(res.reshape(n, n))
        for _ in range(iters):
            m = m / (m.sum(0, keepdim=True) + eps)
            m = m / (m.sum(1, keepdim=True) + eps)
        h_res = m
    else:  # DeepSeek-V4 inference code, then H_res = comb^T
        h_pre = h_pre + eps
        comb = torch.softmax(res.reshape(n, n), dim=-1) + eps
        comb = comb / (comb.sum(0, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(1, keepdim=True) + eps)
            comb = comb / (comb.sum(0, keepdim=True) + eps)
        h_res = comb.T
    return h_pre, h_post, h_res


def spec_layer(x, f_out, coeffs):
    """x_{l+1} = H_res x + H_post^T F, one token, loops."""
    h_pre, h_post, h_res = coeffs
    n = x.shape[0]
    out = torch.zeros_like(x, dtype=torch.float64)
    for i in range(n):
        out[i] = h_post[i] * f_out
        for j in range(n):
            out[i] += h_res[i, j] * x[j]
    return out


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() > 1 else 1.0))


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_mhc_matches_spec(variant, n):
    torch.manual_seed(10 + n)
    C, iters, eps = 6, 20, 1e-6
    conn = ManifoldHyperConnection(C, n, variant=variant, sinkhorn_iters=iters, eps=eps).double()
    randomise(conn, seed=n)
    phi, b, alpha = (t.detach() for t in conn.projection())
    x = torch.randn(3, 2, n, C, dtype=torch.float64)
    f = torch.randn(3, 2, C, dtype=torch.float64)
    h_pre, h_post, h_res = conn.coefficients(x)
    sub_in, state = conn.pre(x)
    out = conn.post(state, f)
    for idx in [(0, 0), (1, 1), (2, 0)]:
        ref = spec_mhc_token(x[idx], phi, b, alpha, n, iters, eps, variant)
        torch.testing.assert_close(h_pre[idx], ref[0])
        torch.testing.assert_close(h_post[idx], ref[1])
        torch.testing.assert_close(h_res[idx], ref[2])
        torch.testing.assert_close(sub_in[idx], ref[0] @ x[idx])
        torch.testing.assert_close(out[idx], spec_layer(x[idx], f[idx], ref))


def test_deepseek_v4_layout_and_orientation():
    """H_res[i, j] comes from column 2n + j*n + i of V4's fn (comb applied transposed)."""
    n, C = 4, 3
    conn = ManifoldHyperConnection(C, n, variant="deepseek-v4", bias_init="zero")
    assert conn.fn.shape == (2 * n + n * n, n * C) and conn.base.shape == (2 * n + n * n,)
    assert conn.scale.shape == (3,)
    with torch.no_grad():
        conn.base[2 * n + 1 * n + 2] = 8.0  # comb[1, 2] large -> H_res[2, 1] large
    h_res = conn.coefficients(torch.randn(1, n, C))[2][0]
    assert h_res[2, 1] > 0.9 and h_res[1, 2] < 0.5
    paper = ManifoldHyperConnection(C, n, bias_init="zero")
    with torch.no_grad():
        paper.bias[2 * n + 1 * n + 2] = 8.0  # paper: H_res[1, 2] from column 2n + 1*n + 2
    h_res = paper.coefficients(torch.randn(1, n, C))[2][0]
    assert h_res[1, 2] > 0.9 and h_res[2, 1] < 0.5


def test_hc_matches_spec():
    torch.manual_seed(5)
    n, C, eps = 3, 5, 1e-6
    conn = HyperConnection(C, n, eps=eps).double()
    randomise(conn, seed=7)
    x = torch.randn(4, n, C, dtype=torch.float64)
    f = torch.randn(4, C, dtype=torch.float64)
    out = conn.post(conn.pre(x)[1], f)
    for t in range(4):
        xn = torch.stack([x[t, i] / torch.sqrt((x[t, i] ** 2).mean() + eps) for i in range(n)])
        s = conn.scale.detach()
        a_m = conn.static_pre.detach() + s[0] * torch.tanh(xn @ conn.w_pre.detach())
        b = conn.static_post.detach() + s[1] * torch.tanh(xn @ conn.w_post.detach())
        a_r = conn.static_res.detach() + s[2] * torch.tanh(xn @ conn.w_res.detach())
        # HC: H' = B^T F(H^T A_m) + A_r^T H
        expected = b[:, None] * f[t][None, :] + a_r.T @ x[t]
        torch.testing.assert_close(out[t], expected)
        torch.testing.assert_close(conn.pre(x)[0][t], a_m @ x[t])


class Sub(nn.Module):
    """A pre-norm sublayer F(x) = W2 gelu(W1 rmsnorm(x))."""

    def __init__(self, C):
        super().__init__()
        self.norm = nn.RMSNorm(C, eps=1e-12)
        self.w1, self.w2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        return self.w2(torch.nn.functional.gelu(self.w1(self.norm(x))))


def stack_outputs(make_conn, n, subs, x):
    conns = [make_conn(i, s) for i, s in enumerate(subs)]
    h = expand_streams(x, n)
    for c in conns:
        h = c(h)
    return h


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize(
    "make",
    [
        lambda i, s, C, n, eps: ManifoldHyperConnection(C, n, s, layer_index=i, bias_init="zero", eps=eps),
        lambda i, s, C, n, eps: ManifoldHyperConnection(C, n, s, layer_index=i, bias_init="identity", eps=eps),
        lambda i, s, C, n, eps: ManifoldHyperConnection(C, n, s, layer_index=i, variant="deepseek-v4", eps=eps),
        lambda i, s, C, n, eps: HyperConnection(C, n, s, layer_index=i),
        lambda i, s, C, n, eps: HyperConnection(C, n, s, layer_index=i, dynamic=False),
    ],
    ids=["mhc-zero", "mhc-identity", "mhc-v4", "hc", "hc-static"],
)
def test_init_equals_prenorm_stack(make, eps):
    """Exact with eps = 0; with the Sinkhorn eps each of the 2*iters normalisations may shrink
    a row sum by a factor 1/(1 + eps), so the deviation is bounded by 2*iters*eps per layer."""
    torch.manual_seed(0)
    C, n, layers = 16, 4, 6
    subs = [Sub(C).double() for _ in range(layers)]
    x = torch.randn(2, 5, C, dtype=torch.float64)
    ref = x
    for s in subs:
        ref = ref + s(ref)
    out = stack_outputs(lambda i, s: make(i, s, C, n, eps).double(), n, subs, x)
    tol = 1e-9 + 2 * 20 * eps * layers * ref.abs().max().item()
    for k in range(n):
        torch.testing.assert_close(out[..., k, :], ref, rtol=0, atol=tol)
    torch.testing.assert_close(merge_streams(out, "mean"), ref, rtol=0, atol=tol)


def test_n1_is_plain_residual():
    torch.manual_seed(1)
    C = 8
    sub = Sub(C).double()
    x = torch.randn(3, 1, C, dtype=torch.float64)
    expected = x + sub(x[..., 0, :]).unsqueeze(-2)
    for conn in (
        Residual(C, 1, sub),
        ManifoldHyperConnection(C, 1, sub, eps=0.0).double(),
        ManifoldHyperConnection(C, 1, sub, eps=0.0, bias_init="identity").double(),
        HyperConnection(C, 1, sub).double(),
    ):
        torch.testing.assert_close(conn(x), expected)
    # with n = 1, H_res = 1 whatever the parameters are
    conn = ManifoldHyperConnection(C, 1, eps=0.0).double()
    randomise(conn, 0)
    torch.testing.assert_close(conn.coefficients(x)[2], torch.ones(3, 1, 1, dtype=torch.float64))


def test_residual_fixed_mappings_match_mhc_ablation():
    torch.manual_seed(2)
    C, n = 8, 4
    x = torch.randn(3, n, C, dtype=torch.float64)
    sub = Sub(C).double()
    fixed = ManifoldHyperConnection(C, n, sub, learn=()).double()
    randomise(fixed, 3)
    torch.testing.assert_close(fixed(x), Residual(C, n, sub)(x))
    torch.testing.assert_close(Residual(C, n, sub)(x), x + sub(x.mean(-2)).unsqueeze(-2))


@pytest.mark.parametrize(
    "conn",
    [
        ManifoldHyperConnection(5, 3, variant="paper"),
        ManifoldHyperConnection(5, 3, variant="deepseek-v4"),
        ManifoldHyperConnection(5, 3, dynamic=False, bias_init="identity"),
        ManifoldHyperConnection(5, 3, learn=("res",)),
        HyperConnection(5, 3),
        Residual(5, 3),
    ],
    ids=["mhc", "mhc-v4", "mhc-static", "mhc-res-only", "hc", "residual"],
)
def test_gradcheck_full_forward(conn):
    torch.manual_seed(3)
    conn = conn.double()
    randomise(conn, 4)
    lin = nn.Linear(5, 5).double()
    conn.sublayer = lin
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conn, (x,))
    # gradients w.r.t. the connection's own parameters
    names = [k for k, _ in conn.named_parameters() if not k.startswith("sublayer.")]
    values = tuple(dict(conn.named_parameters())[k].detach().clone().requires_grad_(True) for k in names)
    if values:
        def call(*vals):
            return functional_call(conn, dict(zip(names, vals)), (x.detach(),), strict=False)

        assert torch.autograd.gradcheck(call, values)


def test_hyperhead_and_merges():
    torch.manual_seed(4)
    n, C = 4, 6
    x = torch.randn(2, n, C, dtype=torch.float64)
    head = HyperHead(C, n).double()
    randomise(head, 5)
    row = x.flatten(-2)
    xhat = row / torch.sqrt((row ** 2).mean(-1, keepdim=True) + head.eps)
    w = torch.sigmoid(head.scale * (xhat @ head.fn.T) + head.base) + head.eps
    torch.testing.assert_close(head(x), (w.unsqueeze(-1) * x).sum(-2))
    torch.testing.assert_close(merge_streams(x, "sum"), x.sum(-2))
    torch.testing.assert_close(merge_streams(x, "mean"), x.mean(-2))
    e = expand_streams(x[:, 0], 3)
    assert e.shape == (2, 3, C) and torch.equal(e[:, 2], x[:, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams(dtype):
    torch.manual_seed(6)
    C, n = 32, 4
    conn = ManifoldHyperConnection(C, n, nn.Linear(C, C).to(dtype))
    randomise(conn.sublayer, 1)
    with torch.no_grad():
        conn.phi.normal_(std=0.1)
    x = torch.randn(4, n, C).to(dtype)
    coeffs = conn.coefficients(x)
    assert all(c.dtype == torch.float32 for c in coeffs)
    out = conn(x)
    assert out.dtype == dtype
    ref = ManifoldHyperConnection(C, n, nn.Linear(C, C).double()).double()
    ref.load_state_dict(conn.state_dict())
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=2e-2, atol=2e-2)


def gains(product):
    return product.abs().sum(-1).max().item(), product.abs().sum(-2).max().item()


def test_composite_gain_bounded_for_mhc_not_hc():
    torch.manual_seed(7)
    n, C, depth = 4, 16, 100
    x = torch.randn(8, n, C).bfloat16()
    prod_m = torch.eye(n)
    prod_h = torch.eye(n)
    for layer in range(depth):
        m = ManifoldHyperConnection(C, n, layer_index=layer)
        h = HyperConnection(C, n, layer_index=layer)
        with torch.no_grad():
            m.bias.normal_(std=1.0)
            m.phi.normal_(std=1.0)
            h.static_res.add_(torch.randn(n, n) * 0.3)
            h.w_res.normal_(std=1.0)
        hm = m.coefficients(x)[2].mean(0)
        hh = h.coefficients(x)[2].mean(0)
        prod_m = hm @ prod_m
        prod_h = hh @ prod_h
    fwd_m, bwd_m = gains(prod_m)
    fwd_h, bwd_h = gains(prod_h)
    assert fwd_m < 2 and bwd_m < 2
    assert fwd_h > 10 * fwd_m and bwd_h > 10 * bwd_m


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"n must be"):
        ManifoldHyperConnection(8, 0)
    with pytest.raises(ValueError, match=r"dim must be"):
        HyperConnection(0, 4)
    with pytest.raises(ValueError, match=r"bias_init"):
        ManifoldHyperConnection(8, 4, bias_init="ones")
    with pytest.raises(ValueError, match=r"variant"):
        ManifoldHyperConnection(8, 4, variant="v3")
    with pytest.raises(ValueError, match=r"learn"):
        ManifoldHyperConnection(8, 4, learn=("pre", "bogus"))
    conn = ManifoldHyperConnection(8, 4, nn.Identity())
    with pytest.raises(ValueError, match=r"\[\.\.\., n=4, dim=8\], got \(2, 3, 8\)"):
        conn(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"got \(2, 4, 7\)"):
        conn(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match=r"got \(8,\)"):
        conn(torch.randn(8))
    bad = torch.randn(2, 4, 8)
    bad[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        conn(bad)
    _, state = conn.pre(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"sublayer output must have shape \(2, 8\), got \(2, 9\)"):
        conn.post(state, torch.randn(2, 9))
    with pytest.raises(ValueError, match="without a sublayer"):
        ManifoldHyperConnection(8, 4)(torch.randn(2, 4, 8))
    with pytest.raises(ValueError):
        expand_streams(torch.randn(3), 0)
    with pytest.raises(ValueError):
        merge_streams(torch.randn(2, 3), "max")


# ---------------------------------------------------------------- init schemes (issue 22) and hc-identity
@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("gap", [0.0, 2.0, 6.0])
def test_identity_gap_sets_h_res_start(variant, gap):
    """b_res = g(2I - 1)/2: with phi set to zero, H_res at init is Sinkhorn of that matrix, computed here
    in float64 from its closed form (a circulant of exp(+-g/2) is already doubly stochastic after one
    normalisation: diagonal e^{g/2} / (e^{g/2} + (n-1) e^{-g/2}))."""
    n, C = 4, 8
    conn = ManifoldHyperConnection(C, n, bias_init="identity", identity_gap=gap, variant=variant, eps=0.0).double()
    proj, bias, _ = conn.projection()
    assert torch.equal(bias[2 * n:].reshape(n, n), gap * (2 * torch.eye(n, dtype=torch.float64) - 1) / 2)
    with torch.no_grad():
        proj.zero_()
    h_res = conn.coefficients(torch.randn(3, n, C, dtype=torch.float64))[2]
    d = torch.exp(torch.tensor(gap / 2, dtype=torch.float64))
    diag = d / (d + (n - 1) / d)
    expected = torch.full((n, n), (1 - diag.item()) / (n - 1), dtype=torch.float64).fill_diagonal_(diag.item())
    torch.testing.assert_close(h_res, expected.expand(3, n, n))


def test_identity_gap_6_is_the_old_default_bit_for_bit():
    """The default (g = 6) draws and sets exactly what the former fixed 6I - 3 init did."""
    n, C = 4, 16
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    conn = ManifoldHyperConnection(C, n, layer_index=2)
    conn.reset_parameters(g1)
    phi = torch.randn(n * C, 2 * n + n * n, generator=g2) / (n * C) ** 0.5
    phi[:, n:2 * n] = 0.0
    bias = torch.zeros(2 * n + n * n)
    bias[:n] = -3.0
    bias[2] = 3.0
    bias[2 * n:] = (6.0 * torch.eye(n) - 3.0).flatten()
    assert torch.equal(conn.phi, phi) and torch.equal(conn.bias, bias)


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
def test_v4_init_scheme(variant):
    """v4: every bias 0, phi ~ N(0, std^2) on every column (post included), alpha as given."""
    n, C = 4, 64
    conn = ManifoldHyperConnection(C, n, bias_init="v4", alpha_init=1.0, variant=variant)
    proj, bias, alpha = conn.projection()
    assert torch.equal(bias, torch.zeros_like(bias)) and torch.equal(alpha, torch.ones(3))
    assert abs(proj.std().item() - 0.02) < 0.002 and proj[:, n:2 * n].abs().min() > 0
    custom = ManifoldHyperConnection(C, n, bias_init="v4", phi_std=0.1)
    assert abs(custom.projection()[0].std().item() - 0.1) < 0.01


def test_init_scheme_bad_values():
    for kwargs in ({"identity_gap": -1.0}, {"identity_gap": float("nan")}, {"phi_std": -0.1},
                   {"bias_init": "eye"}):
        with pytest.raises(ValueError):
            ManifoldHyperConnection(8, 4, **kwargs)


def test_hc_identity_fixes_h_res_only():
    """HyperConnection(learn=("pre", "post")): H_res = I exactly, H_pre and H_post as full HC computes them."""
    torch.manual_seed(7)
    n, C = 3, 6
    full, ident = HyperConnection(C, n).double(), HyperConnection(C, n, learn=("pre", "post")).double()
    randomise(full, 1)
    ident.load_state_dict(full.state_dict())
    x = torch.randn(2, 5, n, C, dtype=torch.float64)
    (pf, qf, rf), (pi, qi, ri) = full.coefficients(x), ident.coefficients(x)
    torch.testing.assert_close(pi, pf)
    torch.testing.assert_close(qi, qf)
    assert not torch.allclose(rf, torch.eye(n, dtype=torch.float64))
    assert torch.equal(ri, torch.eye(n, dtype=torch.float64).expand_as(ri))


@pytest.mark.parametrize("learn", [("pre", "post", "res"), ("pre", "post"), ("res",), ()])
@pytest.mark.parametrize("make", [
    lambda learn, dyn: ManifoldHyperConnection(6, 3, nn.Linear(6, 6), learn=learn, dynamic=dyn, bias_init="v4"),
    lambda learn, dyn: ManifoldHyperConnection(6, 3, nn.Linear(6, 6), learn=learn, dynamic=dyn, h_res="circulant",
                                               variant="deepseek-v4", bias_init="v4"),
    lambda learn, dyn: HyperConnection(6, 3, nn.Linear(6, 6), learn=learn, dynamic=dyn),
], ids=["mhc", "mhc-v4-circulant", "hc"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_unused_param_count_is_what_gets_no_gradient(make, learn, dynamic):
    """unused_param_count equals the entries of the connection's own parameters whose gradient is exactly 0
    after a backward through random float64 streams (the fixed mappings' projections, biases and scales)."""
    torch.manual_seed(0)
    conn = make(learn, dynamic).double()
    with torch.no_grad():  # every parameter away from init, so no used entry has a zero gradient by accident
        for p in conn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    conn(x).square().sum().backward()
    own = [p for name, p in conn.named_parameters() if not name.startswith("sublayer.")]
    zero = sum(p.numel() if p.grad is None else int((p.grad == 0).sum()) for p in own)
    assert conn.unused_param_count() == zero
