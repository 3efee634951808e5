"""H_res maps (torch_mhc.nn.maps) against float64 references written here, on their own and inside mHC connections:
doubly stochastic where they claim to be, gradients (gradcheck), init, the fused kernels (Triton interpreter) equal to
the reference path, a user's own map and a user's own coefficients on both paths, bad input, diagnostics."""

import itertools
import math

import pytest
import torch

from torch_mhc import ManifoldHyperConnection, ops
from torch_mhc.diagnostics import collect_diagnostics
from torch_mhc.models.decoder import DecoderLM, ModelConfig
from torch_mhc.nn import chained_backward, maps
from torch_mhc.nn import run_chain as run_connections
from torch_mhc.nn.maps import (
    CirculantMap,
    HResMap,
    IdentityMap,
    KroneckerMap,
    PermutationMixtureMap,
    SinkhornMap,
    default_factors,
    make_h_res,
    permutation_matrices,
)
from torch_mhc.numerics import H_RES_MAPS

# ---- float64 references, token by token, written from the definitions ----


def ref_sinkhorn(L, iters, eps, start, transpose):
    """One token's [n, n] logits -> Sinkhorn-Knopp, as docs/design.md defines the paper and V4 forms."""
    if transpose:
        L = L.T
    if start == "exp":
        m, steps = L.exp(), ["col", "row"] * iters
    else:
        m, steps = torch.softmax(L, dim=0) + eps, ["row"] + ["col", "row"] * (iters - 1)
    for step in steps:
        m = m / (m.sum(0, keepdim=True) + eps) if step == "col" else m / (m.sum(1, keepdim=True) + eps)
    return m


def ref_permutation_mixture(logits, n):
    w = torch.softmax(logits, 0)
    out = torch.zeros(n, n, dtype=logits.dtype)
    for p, perm in enumerate(itertools.permutations(range(n))):
        for i in range(n):
            out[i, perm[i]] += w[p]
    return out


def ref_circulant(logits, n):
    w = torch.softmax(logits, 0)
    return torch.stack([torch.stack([w[(j - i) % n] for j in range(n)]) for i in range(n)])


def ref_kronecker(logits, factors, factor):
    out, start = torch.ones(1, 1, dtype=logits.dtype), 0
    for f in factors:
        k = math.factorial(f) if factor == "permutation-mixture" else f * f
        part = logits[start:start + k]
        start += k
        h = (ref_permutation_mixture(part, f) if factor == "permutation-mixture"
             else ref_sinkhorn(part.view(f, f), 20, 1e-6, "exp", False))
        out = torch.kron(out, h)
    return out


def reference(m: HResMap, logits: torch.Tensor) -> torch.Tensor:
    """[T, k] float64 -> [T, n, n], token by token."""
    n = m.n
    rows = []
    for t in logits:
        if isinstance(m, SinkhornMap):
            rows.append(ref_sinkhorn(t.view(n, n), m.iters, m.eps, m.start, m.transpose))
        elif isinstance(m, IdentityMap):
            rows.append(torch.eye(n, dtype=t.dtype))
        elif isinstance(m, PermutationMixtureMap):
            rows.append(ref_permutation_mixture(t, n))
        elif isinstance(m, CirculantMap):
            rows.append(ref_circulant(t, n))
        elif isinstance(m, KroneckerMap):
            rows.append(ref_kronecker(t, m.factors, m.factor))
    return torch.stack(rows)


def maps_for(n):
    """Every built-in map (and the Sinkhorn and Kronecker options) that takes n streams."""
    kron = KroneckerMap(n) if max(default_factors(n)) <= 5 else KroneckerMap(n, factor="sinkhorn")
    out = [SinkhornMap(n), SinkhornMap(n, iters=3, start="softmax", transpose=True), IdentityMap(n),
           CirculantMap(n), kron]
    if n <= 5:
        out.append(PermutationMixtureMap(n))
    if n in (4, 6, 8):
        out.append(KroneckerMap(n, factors=(2, n // 2), factor="sinkhorn", iters=20))
    return out


ALL_N = [1, 2, 3, 4, 5, 6, 7, 8, 16]
CASES = [(n, i) for n in ALL_N for i in range(len(maps_for(n)))]
EXACT_DS = (IdentityMap, PermutationMixtureMap, CirculantMap)


@pytest.mark.parametrize("n, which", CASES)
def test_map_matches_float64_reference_and_is_doubly_stochastic(n, which):
    m = maps_for(n)[which]
    torch.manual_seed(n * 10 + which)
    logits = torch.randn(5, m.logit_count(), dtype=torch.float64)
    h = m(logits)
    assert h.shape == (5, n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h, reference(m, logits), rtol=1e-12, atol=1e-12)
    assert (h >= 0).all()
    exact = isinstance(m, EXACT_DS) or (isinstance(m, KroneckerMap) and m.factor == "permutation-mixture")
    # Sinkhorn: rows 1 up to eps; columns converge with the iterations (20 here, 3 for the V4 option: not checked)
    ones = torch.ones(5, n, dtype=torch.float64)
    torch.testing.assert_close(h.sum(-1), ones, rtol=0, atol=1e-12 if exact else 1e-5 * n)
    if exact or getattr(m, "iters", 20) >= 20:
        torch.testing.assert_close(h.sum(-2), ones, rtol=0, atol=1e-12 if exact else 1e-2)
    # fp32 compute for fp32/bf16 input (the reference path's numerics), fp64 kept
    assert m(logits.to(torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("n, which", [(n, i) for n, i in CASES if n <= 8 or i in (2, 3)])
def test_map_gradcheck(n, which):
    m = maps_for(n)[which]
    if m.logit_count() == 0:
        assert not m(torch.zeros(2, 0, dtype=torch.float64, requires_grad=True)).requires_grad
        return
    torch.manual_seed(n + which)
    logits = torch.randn(2, m.logit_count(), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (logits,))


def test_permutation_table_asked_first_under_inference_mode():
    """The cached permutation matrices are normal tensors: a forward under inference_mode first (e.g. sampling)
    does not break training afterwards (autograd saves them)."""
    m = PermutationMixtureMap(3)
    for dtype in (torch.float64, torch.float32):
        permutation_matrices.cache_clear()
        maps._permutation_table.cache_clear()
        with torch.inference_mode():
            m(torch.randn(2, 6, dtype=dtype))
        logits = torch.randn(2, 6, dtype=dtype, requires_grad=True)
        m(logits).square().sum().backward()
        assert logits.grad is not None


def test_logit_counts_and_factors():
    assert [make_h_res(name, 4).logit_count() for name in H_RES_MAPS] == [16, 0, 24, 4, 4]
    assert default_factors(16) == (4, 4) and default_factors(8) == (4, 2) and default_factors(6) == (3, 2)
    assert default_factors(4) == (2, 2) and KroneckerMap(4).logit_count() == 4  # not the 4! permutation mixture
    assert default_factors(7) == (7,) and default_factors(1) == (1,)
    assert KroneckerMap(16).logit_count() == 48 and KroneckerMap(8, factor="sinkhorn").logit_count() == 20


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="h_res must be one of"):
        ManifoldHyperConnection(8, 4, h_res="birkhoff")
    with pytest.raises(ValueError, match="n <= 5"):
        ManifoldHyperConnection(8, 6, h_res="permutation-mixture")
    with pytest.raises(ValueError, match="built for n = 2"):
        ManifoldHyperConnection(8, 4, h_res=CirculantMap(2))
    with pytest.raises(ValueError, match="product is n"):
        KroneckerMap(8, factors=(2, 2))
    with pytest.raises(ValueError, match="factor='sinkhorn'"):
        KroneckerMap(7)
    with pytest.raises(ValueError, match="takes 4 logits"):
        CirculantMap(4)(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="h_res: .*n <= 5"):
        ModelConfig(n_streams=8, h_res="permutation-mixture").validate()
    with pytest.raises(ValueError, match="h_res must be one of"):
        ModelConfig(h_res="nope").validate()
    ModelConfig(n_streams=8, h_res="permutation-mixture", connection="hc").validate()  # not an mHC model: ignored


# ---- inside a connection ----


def test_connection_width_and_layouts():
    for name in H_RES_MAPS:
        k = make_h_res(name, 4).logit_count()
        conn = ManifoldHyperConnection(8, 4, h_res=name)
        assert conn.phi.shape == (32, 8 + k) and conn.bias.shape == (8 + k,) and conn.alpha.shape == (3,)
        v4 = ManifoldHyperConnection(8, 4, h_res=name, variant="deepseek-v4")
        assert v4.fn.shape == (8 + k, 32) and v4.base.shape == (8 + k,) and v4.scale.shape == (3,)


@pytest.mark.parametrize("name", H_RES_MAPS)
@pytest.mark.parametrize("bias_init, gap", [("identity", 6.0), ("identity", 2.0), ("zero", 6.0), ("v4", 6.0)])
def test_init(name, bias_init, gap):
    """phi = 0: H_res is the map of the init logits; identity-like for the identity scheme (diagonal above the
    rest, more so for a larger gap), uniform for zero and v4 (identity map: always I)."""
    n = 4
    conn = ManifoldHyperConnection(8, n, h_res=name, bias_init=bias_init, identity_gap=gap).double()
    with torch.no_grad():
        conn.phi.zero_()
    h = conn.coefficients(torch.randn(3, n, 8, dtype=torch.float64))[2]
    torch.testing.assert_close(h, reference(conn.h_res_map, conn.bias[2 * n:].detach()[None].expand(3, -1)))
    eye = torch.eye(n, dtype=torch.float64)
    if name == "identity":
        torch.testing.assert_close(h, eye.expand(3, n, n))
    elif bias_init == "identity":
        diag, off = h[0].diagonal(), h[0][eye == 0]
        assert diag.min() > off.max()
        big = ManifoldHyperConnection(8, n, h_res=name, identity_gap=gap + 4).double()
        with torch.no_grad():
            big.phi.zero_()
        assert big.coefficients(torch.randn(1, n, 8, dtype=torch.float64))[2][0].diagonal().min() > diag.min()
    else:
        torch.testing.assert_close(h, torch.full((3, n, n), 1 / n, dtype=torch.float64), rtol=0, atol=1e-5)


def test_default_is_the_variants_sinkhorn_bit_for_bit():
    """h_res="sinkhorn" (default), and the same SinkhornMap passed as an instance, give the same parameters,
    outputs and gradients as each other on both paths (the default unchanged is checked against the code before
    the maps by bench/curve_equal.py; see docs/design.md)."""
    for variant in ("paper", "deepseek-v4"):
        v4 = variant == "deepseek-v4"
        outs = []
        for h_res in ("sinkhorn", SinkhornMap(4, iters=7, eps=1e-6, start="softmax" if v4 else "exp", transpose=v4)):
            torch.manual_seed(0)
            conn = ManifoldHyperConnection(8, 4, torch.nn.Linear(8, 8), sinkhorn_iters=7, variant=variant,
                                           h_res=h_res)
            x = torch.randn(2, 3, 4, 8, requires_grad=True)
            for backend in ("reference", "triton"):
                with ops.use_backend(backend):
                    y = conn(x)
                    outs.append([y, *torch.autograd.grad(y.square().sum(), [x, *conn.parameters()])])
        for a, b in zip(outs[:2], outs[2:]):
            for u, v in zip(a, b):
                assert torch.equal(u, v)


def make_chain(name, n, C, k=3, seed=0, sublayer=None):
    torch.manual_seed(seed)
    conns = [ManifoldHyperConnection(C, n, sublayer or torch.nn.Linear(C, C), layer_index=i, h_res=name)
             for i in range(k)]
    for c in conns:
        with torch.no_grad():
            p, b, a = c.projection()
            p.normal_(std=0.3)
            b.normal_()
            a.uniform_(0.5, 1.5)
    return conns


def run_chain(conns, x, backend):
    """A stack of connections (read-ahead, chained backward) -> (last state, gradients of x and every parameter)."""
    with ops.use_backend(backend), chained_backward():
        s = run_connections(conns, x)
        loss = (s.double() * torch.linspace(-1, 1, s.numel(), dtype=torch.float64).view_as(s)).sum()
        return [s, *torch.autograd.grad(loss, [x] + [p for c in conns for p in c.parameters()])]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_chain_equals_float64(conns, x, backend="triton"):
    """The stack ``conns`` on streams x through ``backend`` against the float64 reference path (``conns`` end up in
    float64): the state and every gradient within 2e-5 relative."""
    fused = run_chain(conns, x.clone().requires_grad_(), backend)
    ref = run_chain([c.double() for c in conns], x.double().requires_grad_(), "reference")
    for a, b in zip(fused, ref):
        assert rel_err(a, b) < 2e-5


FUSED_CASES = [(name, n) for name in H_RES_MAPS for n in (1, 2, 4, 8) if not (name == "permutation-mixture" and n > 4)]


@pytest.mark.parametrize("name, n", FUSED_CASES)
def test_fused_equals_float64_reference(name, n):
    """Three connections in a stack through the kernels (interpreter; fp32 streams) against the reference path in
    float64: forward and every gradient."""
    pytest.importorskip("triton")
    conns = make_chain(name, n, 24)
    x = torch.randn(2, 3, n, 24)
    assert_chain_equals_float64(conns, x)


@pytest.mark.parametrize("name", ["circulant", "permutation-mixture", "identity", "kronecker"])
def test_fused_bf16_streams_deterministic_and_fp32_coefficients(name, monkeypatch):
    pytest.importorskip("triton")
    from torch_mhc.ops import coefficients

    launches = []
    real = coefficients.coefficients_forward
    monkeypatch.setattr("torch_mhc.ops.sublayer.coefficients_forward",
                        lambda *a, **k: launches.append(1) or real(*a, **k))
    n = {"permutation-mixture": 2, "kronecker": 8}.get(name, 4)  # kronecker: n = 8's read-ahead tile, C % 16 != 0
    conns = make_chain(name, n, 40, sublayer=torch.nn.Tanh())  # the connections' parameters only (no bf16 Linear)
    x = torch.randn(2, 3, n, 40).to(torch.bfloat16)
    runs = [run_chain(conns, x.clone().requires_grad_(), "triton") for _ in range(2)]
    assert launches  # the fused sublayer ran
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with ops.use_backend("triton"):
        coeffs = conns[0].coefficients(x)
        _, (h_pre, h_post, h_res), link = conns[0].read(x)
    assert link is not None and all(h.dtype == torch.float32 for h in (*coeffs, h_pre, h_post, h_res))
    same_dtype = run_chain(conns, x.clone().requires_grad_(), "reference")  # the reference path on bf16 streams
    ref = run_chain([c.double() for c in conns], x.double().requires_grad_(), "reference")
    assert rel_err(runs[0][0], ref[0]) < 2 ** -5 and rel_err(runs[0][1], ref[1]) < 2 ** -5  # state, x: bf16
    # parameters: fp32 sums of bf16-rounded terms over three sublayers: the worst within 2e-2 of float64 (as
    # test_sublayer_fused's one sublayer) or at least as close as the reference path's worst on bf16 streams (its
    # roundings fall elsewhere; measured at n = 8: fused 2.4e-2, reference 5.3e-2)
    worst = max(rel_err(a, b) for a, b in zip(runs[0][2:], ref[2:]))
    assert worst < max(2e-2, max(rel_err(r, b) for r, b in zip(same_dtype[2:], ref[2:])))


# ---- a user's own map, and a user's own coefficients ----


class Reverse(HResMap):
    """No logits: H_res sends stream j to stream n-1-j (a permutation, doubly stochastic)."""

    def logit_count(self):
        return 0

    def h_res(self, logits):
        return torch.eye(self.n, dtype=logits.dtype).flip(0).expand(*logits.shape[:-1], self.n, self.n)


class LazyMix(HResMap):
    """One logit a: H_res = (1 - sigmoid(a)) I + sigmoid(a) J/n."""

    def logit_count(self):
        return 1

    def h_res(self, logits):
        a = torch.sigmoid(logits)[..., None]
        eye = torch.eye(self.n, dtype=logits.dtype, device=logits.device)
        return (1 - a) * eye + a / self.n

    def init_logits(self, bias_init, gap):
        return torch.full((1,), -gap, device="cpu")


class SquaredSinkhorn(SinkhornMap):
    """A subclass of a built-in map that changes its forward: the kernels must not run the built-in Sinkhorn."""

    def h_res(self, logits):
        h = super().h_res(logits)
        return h @ h


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_user_map_takes_effect(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    n, C = 4, 16
    torch.manual_seed(0)
    conn = ManifoldHyperConnection(C, n, torch.nn.Linear(C, C), h_res=Reverse(n))
    assert conn.phi.shape == (n * C, 2 * n)
    x = torch.randn(2, 3, n, C)
    with ops.use_backend(backend):
        y, state = conn.pre(x)
        out = conn.post(state, conn.sublayer(y))
    want = x.flip(-2) + state.h_post[..., None] * conn.sublayer(y)[..., None, :]
    torch.testing.assert_close(out, want)
    assert (state.link is not None) == (backend == "triton")

    # a map with a logit: fused == float64 reference, gradients included (bias, alpha, phi of the res column)
    conns = make_chain(LazyMix(n), n, C, k=2)
    assert_chain_equals_float64(conns, x, backend)
    fresh = ManifoldHyperConnection(C, n, h_res=LazyMix(n), identity_gap=5.0)
    assert fresh.bias.shape == (2 * n + 1,) and fresh.bias[-1].item() == -5.0  # the map's own init

    # a subclass of the built-in Sinkhorn that changes h_res is run as written, not as the built-in kernel
    sq = SquaredSinkhorn(n)
    assert sq.kernel_spec() is None and SinkhornMap(n).kernel_spec() == ("sinkhorn", 20, False, False)
    torch.manual_seed(1)
    a = ManifoldHyperConnection(C, n, h_res=sq)
    with ops.use_backend(backend):
        h = a.coefficients(x)[2]
    with ops.use_backend("reference"):
        plain = ManifoldHyperConnection(C, n)
        plain.load_state_dict(a.state_dict())
        h_plain = plain.coefficients(x)[2]
    torch.testing.assert_close(h, h_plain @ h_plain, rtol=1e-5, atol=1e-6)


class FixedRes(ManifoldHyperConnection):
    """A connection that overrides coefficients(): H_res = I whatever its parameters."""

    def coefficients(self, streams):
        h_pre, h_post, h_res = super().coefficients(streams)
        return h_pre, h_post, torch.eye(self.n).expand_as(h_res)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_overridden_coefficients_take_effect_on_both_paths(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    n, C = 4, 16
    conn = FixedRes(C, n, torch.nn.Linear(C, C))
    nxt = FixedRes(C, n, torch.nn.Linear(C, C))
    x = torch.randn(2, 3, n, C)
    with ops.use_backend(backend):
        y, state = conn.pre(x)
        s1, ahead = conn.post_ahead(state, conn.sublayer(y), nxt)
        out = nxt.forward_ahead(s1, read_ahead=ahead)[0]
    assert ahead is None  # an overridden coefficients() takes no read-ahead
    assert torch.equal(state.h_res, torch.eye(n).expand(2, 3, n, n)) and state.link is None
    with ops.use_backend("reference"):
        h_pre, h_post, _ = ManifoldHyperConnection.coefficients(conn, x)
        s1 = x + h_post[..., None] * conn.sublayer((h_pre[..., None] * x).sum(-2))[..., None, :]
        h_pre, h_post, _ = ManifoldHyperConnection.coefficients(nxt, s1)
        want = s1 + h_post[..., None] * nxt.sublayer((h_pre[..., None] * s1).sum(-2))[..., None, :]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- models and diagnostics ----


@pytest.mark.parametrize("name", H_RES_MAPS)
def test_diagnostics_of_a_model_with_each_map(name):
    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(dim=16, n_layers=2, n_heads=2, max_seq_len=8, h_res=name))
    assert all(c.h_res_map.name == name for c in model.connections())
    d = collect_diagnostics(model, torch.randint(0, 256, (2, 8)), step=0)
    assert len(d["layers"]) == 4 and len(d["h_res_mean"]) == 4
    h = torch.tensor(d["h_res_mean"], dtype=torch.float64)
    torch.testing.assert_close(h.sum(-1), torch.ones(4, 4, dtype=torch.float64), rtol=0, atol=1e-5)
    assert d["summary"]["max_composite_fwd_gain"] == pytest.approx(1.0, abs=1e-4)  # doubly stochastic
    for layer in d["layers"]:  # every number finite; a map without logits (identity) has no res spread
        assert all(math.isfinite(v) for v in layer.values() if isinstance(v, float)), layer
        assert ("res_logit_spread" in layer) == (model.connections()[0].h_res_map.logit_count() > 0)
    out = model(torch.randint(0, 256, (2, 8)))
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
