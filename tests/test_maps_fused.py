"""The built-in H_res maps computed on chip by the epilogue kernels (Triton interpreter on CPU; CUDA when present):
which maps take the on-chip spec, the fused coefficients and every gradient against the float64 reference, a stack
of connections through the read-ahead and the chained backward, and a subclass overriding ``h_res`` still taking
the logits path."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import CountLaunches  # noqa: E402
from test_maps import assert_chain_equals_float64, make_chain  # noqa: E402
from test_ops import check_coefficients, make_coeff_inputs  # noqa: E402
from torch_mhc import ops  # noqa: E402
from torch_mhc.nn.maps import (  # noqa: E402
    CirculantMap,
    IdentityMap,
    KroneckerMap,
    PermutationMixtureMap,
    make_h_res,
)
from torch_mhc.numerics import H_RES_MAPS  # noqa: E402
from torch_mhc.ops import MAP_STREAMS  # noqa: E402
from torch_mhc.ops.coefficients import RES_IDENTITY, RES_LOGITS, RES_MIXTURE, make_epilogue  # noqa: E402


def on_chip_maps(n):
    """Every built-in map the kernels compute on chip at n (default options), and Kronecker with other factors
    (n = 7: no Kronecker of permutation mixtures; permutation mixtures for n <= 4, n = 3 being its own default
    Kronecker; n = 5's 120 logits are wider than ops.MAX_GEMM_WIDTH: see test_wide_map_runs_the_reference_path)."""
    out = [IdentityMap(n), CirculantMap(n)] + ([KroneckerMap(n)] if n in (1, 2, 4, 6, 8) else [])
    if n <= 4:
        out.append(PermutationMixtureMap(n))
    if n == 8:
        out += [KroneckerMap(8, factors=(2, 2, 2)), KroneckerMap(8, factors=(2, 4))]
    return out


def test_built_in_maps_take_the_on_chip_spec():
    """Every built-in map but Sinkhorn-factor Kronecker is computed on chip for every fused n (Sinkhorn: its own
    spec, tested in test_maps); the spec's logit count is the map's; a subclass overriding h_res gets None."""
    for n in MAP_STREAMS:
        for name in H_RES_MAPS:
            if (name == "permutation-mixture" and n > 5) or (name == "kronecker" and n == 7):
                continue  # no such map
            spec = ops.kernel_spec(make_h_res(name, n), 20, "paper")
            assert spec[0] != "logits", (name, n)
        for m in on_chip_maps(n):
            epi = make_epilogue(n, ops.kernel_spec(m, 20, "paper"), False)
            assert epi.on_chip and epi.k == m.logit_count() and epi.M == 2 * n + m.logit_count(), m
            assert epi.constexprs()["RES"] == (RES_IDENTITY if isinstance(m, IdentityMap) else RES_MIXTURE).value
        sinkhorn_factors = KroneckerMap(n, factor="sinkhorn")
        assert sinkhorn_factors.kernel_spec() is None
        assert ops.kernel_spec(sinkhorn_factors, 20, "paper") == ("logits", sinkhorn_factors.logit_count())
    for cls in (IdentityMap, CirculantMap, PermutationMixtureMap, KroneckerMap):
        own = type("Own" + cls.__name__, (cls,), {"h_res": lambda self, logits: cls.h_res(self, logits)})
        assert own(4).kernel_spec() is None and cls(4).kernel_spec() is not None
        keeps = type("Keeps" + cls.__name__, (cls,), {})  # a subclass that keeps the built-in h_res: on chip
        assert keeps(4).kernel_spec() == cls(4).kernel_spec()


def test_wide_map_runs_the_reference_path(monkeypatch):
    """The permutation mixture at n = 5 (k = 120, a GEMM 130 columns wide, wider than ops.MAX_GEMM_WIDTH) runs the
    reference path under the triton backend, with the reference's results; the kernels' entry points refuse it by
    name; the post before it computes no read-ahead for it."""
    m, n = PermutationMixtureMap(5), 5
    assert 2 * n + m.logit_count() > ops.MAX_GEMM_WIDTH
    x = torch.randn(7, n, 8)
    with ops.use_backend("triton"):
        assert ops.should_fuse(x) and not ops.should_fuse(x, width=2 * n + m.logit_count())
    counted = count_epilogues(monkeypatch)
    conns = make_chain(m, n, 8)
    assert_chain_equals_float64(conns, torch.randn(2, 3, n, 8))
    assert all(c.launches == 0 for c in counted)
    inputs = make_coeff_inputs(5, n, 8, torch.float32, seed=3, k=m.logit_count())
    with pytest.raises(ValueError, match="at most 128 columns"):
        ops.fused_mhc_coefficients(*[t.detach() for t in inputs[:4]], iters=20, eps=1e-6, variant="paper", h_res=m)


def test_bad_epilogue_specs_are_refused():
    for spec in [("mixture", (("shift", 2),)), ("mixture", (("rotate", 4),)), ("mixture", ()), ("circulant",),
                 ("mixture", (("permutation", 2), ("permutation", 1.5)))]:
        with pytest.raises(ValueError, match="epilogue spec"):
            make_epilogue(4, spec, False)


@pytest.mark.parametrize("n, which", [pytest.param(n, i, id=repr(m)) for n in MAP_STREAMS
                                      for i, m in enumerate(on_chip_maps(n))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_chip_coefficients_equal_float64_reference(n, which, dtype):
    """H_pre, H_post, H_res and the gradients of x, phi, bias and alpha (random output gradients) against the
    float64 reference path on fresh inputs (37 tokens: not a multiple of the epilogue's token block); the paper's
    gates, and V4's (H_pre + eps) for fp32."""
    m = on_chip_maps(n)[which]
    for variant in ("paper", "deepseek-v4") if dtype == torch.float32 else ("paper",):
        inputs = make_coeff_inputs(37, n, 24, dtype, seed=10 * n + which, k=m.logit_count())
        check_coefficients(inputs, 20, variant, grad_seed=n + which, h_res=m)


def count_epilogues(monkeypatch):
    from torch_mhc.ops import coefficients

    counted = [CountLaunches(coefficients._epilogue_fwd), CountLaunches(coefficients._epilogue_bwd)]
    monkeypatch.setattr(coefficients, "_epilogue_fwd", counted[0])
    monkeypatch.setattr(coefficients, "_epilogue_bwd", counted[1])
    return counted


@pytest.mark.parametrize("name, n", [("circulant", 4), ("permutation-mixture", 4), ("kronecker", 8),
                                     ("identity", 2), ("circulant", 3), ("kronecker", 6)])
def test_chained_stack_on_chip_equals_float64_reference(name, n, monkeypatch):
    """Three connections in a stack (read-ahead posts, chained backward) through the kernels with the map on chip:
    the state and every gradient equal the float64 reference path's; every epilogue ran the on-chip branch."""
    counted = count_epilogues(monkeypatch)
    conns = make_chain(name, n, 24)
    x = torch.randn(2, 3, n, 24)
    assert_chain_equals_float64(conns, x)
    want = (RES_IDENTITY if name == "identity" else RES_MIXTURE).value
    assert all(c.launches == 3 and {k["RES"] for k in c.kwargs} == {want} for c in counted)


@pytest.mark.parametrize("cls", [CirculantMap, PermutationMixtureMap, KroneckerMap])
def test_subclass_overriding_h_res_takes_the_logits_path(cls, monkeypatch):
    """A subclass whose h_res changes the built-in's (here: its square) runs its own h_res on the logits the
    kernels hand out (RES_LOGITS), and the result and gradients are its own, equal to the reference path's."""
    counted = count_epilogues(monkeypatch)

    class Squared(cls):
        def h_res(self, logits):
            h = super().h_res(logits)
            return h @ h

    n = 4
    conns = make_chain(Squared(n), n, 16, k=2)
    x = torch.randn(2, 3, n, 16)
    assert_chain_equals_float64(conns, x)
    assert counted[0].launches == 2 and all({k["RES"] for k in c.kwargs} == {RES_LOGITS.value} for c in counted)
