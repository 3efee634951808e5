"""The fused sublayer (one dx buffer: post's backward hands dx to the pre half, which adds pre's and the
coefficient GEMM's terms in place) against the float64 reference path, in every way a state can be used."""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import CountLaunches
from torch_mhc import ManifoldHyperConnection, ops
from torch_mhc.nn import chained_backward, run_chain
from torch_mhc.nn import functional as Fm

pytest.importorskip("triton")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2 ** -6}  # relative to the largest value; see tests/test_ops.py


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_conn(n, C, variant="paper", seed=0, **kwargs):
    torch.manual_seed(seed)
    conn = ManifoldHyperConnection(C, n, torch.nn.Linear(C, C), layer_index=1, variant=variant, **kwargs)
    with torch.no_grad():
        proj, bias, _ = conn.projection()
        proj.normal_(std=0.3)
        bias.normal_()
    return conn


def grads_of(conn, x0, backend, dtype, use):
    """x0 -> a state s (non-leaf) -> ``use(conn, s)`` -> loss; gradients of x0 and of every parameter."""
    x = x0.detach().to(dtype).requires_grad_()
    params = list(conn.parameters())
    with ops.use_backend(backend):
        s = x * 1.25
        loss = use(conn, s)
        g = torch.autograd.grad(loss, [x] + params, allow_unused=True)
    return [torch.zeros_like(p) if gp is None else gp for p, gp in zip([x] + params, g)]


def weighted(t):
    return (t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view_as(t)).sum()


def one_sublayer(conn, s):
    y, state = conn.pre(s)
    assert (state.link is not None) == ops.should_fuse(s)
    return weighted(conn.post(state, conn.sublayer(y)))


def state_feeds_two_consumers(conn, s):
    """The state goes to the sublayer and to something else (a diagnostic, a skip)."""
    return one_sublayer(conn, s) + 0.3 * weighted(s.square())


def two_sublayers_same_conn(conn, s):
    """The new state feeds the next sublayer: two link channels in a row."""
    return weighted(conn(conn(s)))


def post_twice(conn, s):
    """Two posts on the same pre state: autograd sums the two link gradients before the pre half adds in place."""
    y, state = conn.pre(s)
    f = conn.sublayer(y)
    return weighted(conn.post(state, f)) + 0.5 * weighted(conn.post(state, 2 * f))


def pre_only(conn, s):
    """post never runs: no link gradient; the GEMM backward writes a fresh dx."""
    y, _ = conn.pre(s)
    return weighted(conn.sublayer(y))


def post_without_grad(conn, s):
    y, state = conn.pre(s)
    with torch.no_grad():
        out = conn.post(state, conn.sublayer(y))
    return weighted(y) + (out.double() * 0).sum()


def coefficients_alone(conn, s):
    return sum(weighted(h) for h in conn.coefficients(s))


def read_ahead_chain(conn, s):
    """The connection reads the states it writes (its own reader, three times): each fused post but the last
    computes the next read's coefficient GEMM and hands it on."""
    return weighted(run_chain([conn] * 3, s))


def read_ahead_state_changed(conn, s):
    """The state is changed in place between the post and the next read: the read-ahead no longer matches it."""
    s2, ahead = conn.forward_ahead(s, reader=conn)
    s2.mul_(1.5)
    return weighted(conn.forward_ahead(s2, read_ahead=ahead)[0])


def chained(conn, s):
    """Chained backward: each read leaves its terms of the state's gradient to the post that wrote the state."""
    with chained_backward():
        return read_ahead_chain(conn, s)


def chained_state_also_used(conn, s):
    """A state between two chained sublayers also feeds something else: its gradient reaches the post as the sum
    of that consumer's and the read's (zero) stand-in; the post adds the read's terms."""
    with chained_backward():
        s2, ahead = conn.forward_ahead(s, reader=conn)
        return weighted(conn.forward_ahead(s2, read_ahead=ahead)[0]) + 0.3 * weighted(s2.square())


def chained_state_hooked(conn, s):
    """A hook that changes the state's gradient: the read must not defer (the hook has to see the whole gradient)."""
    with chained_backward():
        s2, ahead = conn.forward_ahead(s, reader=conn)
        s2.register_hook(lambda g: 1.5 * g)
        s3, ahead = conn.forward_ahead(s2, read_ahead=ahead, reader=conn)
        return weighted(conn.forward_ahead(s3, read_ahead=ahead)[0])


USES = [one_sublayer, state_feeds_two_consumers, two_sublayers_same_conn, post_twice, pre_only, post_without_grad,
        coefficients_alone, read_ahead_chain, read_ahead_state_changed, chained, chained_state_also_used,
        chained_state_hooked]


@pytest.mark.parametrize("use", USES, ids=lambda u: u.__name__)
@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_fused_sublayer_matches_reference(use, n):
    C, x0 = 24, torch.randn(3, 5, n, 24, generator=torch.Generator().manual_seed(n))
    conn = make_conn(n, C, seed=n)
    got = grads_of(conn, x0, "triton", torch.float32, use)
    ref = grads_of(conn.double(), x0.double(), "reference", torch.float64, use)
    conn.float()
    assert rel_err(got[0], ref[0]) < TOL[torch.float32]
    for i, (a, b) in enumerate(zip(got[1:], ref[1:])):  # parameters: sums over tokens, with cancellation
        assert rel_err(a, b) < 1e-3, i


@pytest.mark.parametrize("use", [state_feeds_two_consumers, chained_state_also_used], ids=lambda u: u.__name__)
@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n", [2, 8])
def test_fused_sublayer_bf16_and_variants(variant, n, use):
    C, x0 = 40, torch.randn(7, n, 40, generator=torch.Generator().manual_seed(n))
    conn = make_conn(n, C, variant, seed=n)
    conn.sublayer = torch.nn.Tanh()  # compare the connection's parameters only (no bf16 Linear)
    got = grads_of(conn, x0, "triton", torch.bfloat16, use)
    ref = grads_of(conn.double(), x0.to(torch.bfloat16).double(), "reference", torch.float64, use)
    assert got[0].dtype == torch.bfloat16
    # x: one rounding of the summed dx to bf16 (and the bf16 sublayer); parameters: fp32 sums of rounded terms
    assert rel_err(got[0], ref[0]) < 2 ** -5
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("use", [state_feeds_two_consumers, chained], ids=lambda u: u.__name__)
def test_fused_sublayer_is_deterministic(use):
    """Bit-identical gradients run to run (no atomics; each dx element written by one program)."""
    x0 = torch.randn(19, 4, 24, generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        conn = make_conn(4, 24, seed=3)
        conn.sublayer = torch.nn.Tanh()
        runs.append(grads_of(conn, x0, "triton", torch.bfloat16, use))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_one_buffer_equals_separate_ops_sum():
    """The one-buffer backward gives the same dx as the separate ops whose three terms autograd adds (fp32)."""
    n, C = 4, 24
    x0 = torch.randn(6, n, C, generator=torch.Generator().manual_seed(5))
    conn = make_conn(n, C, seed=5)
    phi, bias, alpha = conn.projection()
    x = x0.clone().requires_grad_()
    w = torch.randn(6, n, C, generator=torch.Generator().manual_seed(6))
    y, (_, h_post, h_res), link = ops.fused_sublayer_pre(x, phi, bias, alpha, iters=20, eps=1e-6, variant="paper")
    fused = torch.autograd.grad((ops.fused_sublayer_post(link, h_post, h_res, torch.tanh(y)) * w).sum(), [x])[0]
    h_pre, h_post, h_res = ops.fused_mhc_coefficients(x, phi, bias, alpha, iters=20, eps=1e-6, variant="paper")
    out = ops.fused_stream_post(x, h_post, h_res, torch.tanh(ops.fused_stream_pre(x, h_pre)))
    separate = torch.autograd.grad((out * w).sum(), [x])[0]
    assert rel_err(fused, separate) < 1e-6


def test_fallbacks_use_the_plain_path():
    """No link where the scheme does not apply (fixed mappings, static mHC, reference backend, fp64 streams)."""
    x = torch.randn(2, 4, 16)
    cases = [(make_conn(4, 16, learn=("res",)), "triton", x), (make_conn(4, 16, dynamic=False), "triton", x),
             (make_conn(4, 16), "reference", x), (make_conn(4, 16).double(), "triton", x.double())]
    for conn, backend, xs in cases:
        with ops.use_backend(backend):
            _, state = conn.pre(xs)
        assert state.link is None


def test_no_grad_forward_matches():
    conn = make_conn(4, 24)
    x = torch.randn(3, 4, 24)
    with torch.no_grad():
        with ops.use_backend("triton"):
            a = conn(x)
        with ops.use_backend("reference"):
            b = conn(x)
    assert rel_err(a, b) < TOL[torch.float32]


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "lift_fresh", "lift_fresh_copy", "item", "is_nonzero"):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_reference_coefficients_without_host_round_trip(monkeypatch):
    """The reference path gathers the per-column alpha with an index built once per (n, device) (no tensor
    from a Python list per call, no repeat_interleave reading its repeats back). The CPU-only finiteness
    check, which does read a value back, is switched off here."""
    monkeypatch.setattr(Fm, "check_finite", lambda *args: None)
    n, C = 4, 8
    x, phi = torch.randn(3, n, C), torch.randn(n * C, 2 * n + n * n)
    bias, alpha = torch.randn(2 * n + n * n), torch.rand(3, requires_grad=True)
    Fm.alpha_columns(n, alpha.device)  # the one-time index
    with ops.use_backend("reference"), _Syncs() as mode:
        out = Fm.mhc_coefficients(x, phi, bias, alpha, iters=3)
        sum(o.sum() for o in out).backward()  # the Sinkhorn backward too (its shifted-exp term is a mask)
    assert mode.seen == []
    assert alpha.grad is not None
    scale = torch.repeat_interleave(alpha.detach(), torch.tensor([n, n, n * n]))  # the former construction
    torch.testing.assert_close(out, Fm.mhc_coefficients(x, phi, bias, alpha.detach(), iters=3))
    h = (x.flatten(-2) @ phi) * torch.rsqrt(x.flatten(-2).square().mean(-1, keepdim=True) + 1e-6) * scale + bias
    assert torch.equal(out[0], torch.sigmoid(h[..., :n]))  # bit-identical to the former math


def test_reference_alpha_gradient_sums_as_before():
    """alpha's gradient is summed in the former repeat_interleave's order: training curves stay bit-identical."""
    n = 4
    for seed in range(4):
        torch.manual_seed(seed)
        alpha = torch.randn(3, requires_grad=True)
        h, g = torch.randn(16, 128, 2 * n + n * n), torch.randn(16, 128, 2 * n + n * n)
        (h * torch.repeat_interleave(alpha, torch.tensor([n, n, n * n])) * g).sum().backward()
        before, alpha.grad = alpha.grad.clone(), None
        (h * alpha.index_select(0, Fm.alpha_columns(n, alpha.device)) * g).sum().backward()
        assert torch.equal(alpha.grad, before)


@pytest.mark.parametrize("use, gemms", [(read_ahead_chain, 1), (read_ahead_state_changed, 2),
                                        (two_sublayers_same_conn, 2)], ids=lambda u: getattr(u, "__name__", u))
def test_read_ahead_replaces_the_next_gemm(monkeypatch, use, gemms):
    """Given its reader, the fused post computes its GEMM and hands it on: the coefficient GEMM kernel runs only for
    the first read (and again where the state changed after the post, or where no read-ahead was handed on)."""
    from torch_mhc.ops import coefficients

    counter = CountLaunches(coefficients._gemm_fwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", counter)
    conn = make_conn(4, 24, seed=7)
    with ops.use_backend("triton"):
        use(conn, torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(7)))
    assert counter.launches == gemms


@pytest.mark.parametrize("n, C, dtype", [(1, 24, torch.float32), (2, 40, torch.bfloat16), (4, 24, torch.float16),
                                         (8, 16, torch.bfloat16)])
def test_read_ahead_post_writes_the_same_state_and_the_next_gemm(n, C, dtype):
    """The read-ahead post writes bit-for-bit the plain post's state, and its raw = state @ phi and inv_rms match
    the float64 values of the stored (rounded) state and the coefficient GEMM kernel's."""
    from torch_mhc.ops.coefficients import coefficients_forward, make_epilogue

    g = torch.Generator().manual_seed(n)
    T, M = 21, 2 * n + n * n
    x = torch.randn(T, n, C, generator=g).to(dtype)
    f = torch.randn(T, C, generator=g).to(dtype)
    h_post, h_res = torch.rand(T, n, generator=g) * 2, torch.rand(T, n, n, generator=g)
    phi = torch.randn(n * C, M, generator=g) / (n * C) ** 0.5
    plain = ops.fused_stream_post(x, h_post, h_res, f)
    link = (x, x.new_empty(1).expand(T, n, C))
    with ops.use_backend("triton"):
        out, ahead = ops.fused_sublayer_post(link, h_post, h_res, f, read_ahead=(phi, 1e-6))
    assert torch.equal(out, plain)
    s = out.double().reshape(T, n * C)
    raw, inv = s @ phi.double(), torch.rsqrt(s.square().mean(-1) + 1e-6)
    assert rel_err(ahead.raw, raw) < 2e-5 and rel_err(ahead.inv, inv) < 2e-5
    *_, (_, _, raw_k, inv_k) = coefficients_forward(out.view(T, n * C), phi, torch.zeros(M), torch.ones(3),
                                                    make_epilogue(n, ("sinkhorn", 3, False, False), False), 1e-6)
    assert rel_err(ahead.raw, raw_k) < 2e-5 and rel_err(ahead.inv, inv_k) < 2e-5
    assert ahead.matches(out, phi, 1e-6)
    assert not ahead.matches(out, phi, 1e-5) and not ahead.matches(out.clone(), phi, 1e-6)
    phi.add_(0)  # a new version of phi
    assert not ahead.matches(out, phi, 1e-6)


def test_decoder_reads_ahead_through_its_stack(monkeypatch):
    """DecoderLM hands each post's read-ahead to the next read: one coefficient GEMM launch per forward (the first
    read), whatever the depth; under chained_backward every post but the last sums its reader's gradient terms;
    gradients still match the reference path."""
    from torch_mhc.models import DecoderLM, ModelConfig
    from torch_mhc.ops import coefficients

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(dim=24, n_layers=3, n_heads=2, max_seq_len=8, connection="mhc", n_streams=4))
    conns = model.connections()
    from torch_mhc.ops import streams

    counter = CountLaunches(coefficients._gemm_fwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", counter)
    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    idx = torch.randint(0, 256, (2, 8))
    grads = {}
    for backend in ("triton", "triton-chained", "reference"):
        model.zero_grad()
        with ops.use_backend(backend.split("-")[0]):
            with chained_backward() if backend.endswith("chained") else __import__("contextlib").nullcontext():
                loss = model(idx, idx)[1]
        loss.backward()
        grads[backend] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert counter.launches == 2  # the first read of each triton forward
    assert chain.launches == len(conns) - 1  # every post but the last sums its reader's terms
    for k, g in grads["reference"].items():
        assert rel_err(grads["triton"][k], g) < 1e-3, k
        assert rel_err(grads["triton-chained"][k], g) < 1e-3, k


@pytest.mark.parametrize("n, use, chained_posts", [
    (4, read_ahead_chain, 0), (4, chained, 2), (4, chained_state_also_used, 1), (4, chained_state_hooked, 1),
    (1, chained, 2), (8, chained, 0)], ids=lambda u: getattr(u, "__name__", str(u)))
def test_chained_backward_sums_the_state_gradient_in_the_post(monkeypatch, n, use, chained_posts):
    """Under chained_backward each chained post's backward runs the chained kernel (the hooked state's does not;
    n = 8 keeps the plain backward), and then the reader's GEMM backward writes no dx."""
    from torch_mhc.ops import coefficients, streams

    chain = CountLaunches(streams._post_bwd_chain)
    gemm = CountLaunches(coefficients._gemm_bwd)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    monkeypatch.setattr(coefficients, "_gemm_bwd", gemm)
    conn = make_conn(n, 24, seed=7)
    x = torch.randn(5, n, 24, generator=torch.Generator().manual_seed(7), requires_grad=True)
    with ops.use_backend("triton"):
        use(conn, x).backward()
    assert chain.launches == chained_posts
    sublayers = {read_ahead_chain: 3, chained: 3, chained_state_also_used: 2, chained_state_hooked: 3}[use]
    assert gemm.launches == sublayers
    assert [k["DX"] for k in gemm.kwargs].count(False) == chained_posts


@pytest.mark.parametrize("h_res", ["identity", "circulant", "permutation-mixture", "kronecker"])
def test_other_maps_share_the_read_ahead_and_the_chained_backward(monkeypatch, h_res):
    """With a map other than Sinkhorn (computed on chip; its own GEMM width 2n + k) the sublayer keeps the
    read-ahead (one forward GEMM for three chained sublayers) and the chained backward (two chained posts, their
    readers' GEMM backward without dx); gradients equal the float64 reference path's."""
    from torch_mhc.ops import coefficients, streams

    fwd = CountLaunches(coefficients._gemm_fwd)
    chain = CountLaunches(streams._post_bwd_chain)
    bwd = CountLaunches(coefficients._gemm_bwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", fwd)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    monkeypatch.setattr(coefficients, "_gemm_bwd", bwd)
    conn = make_conn(4, 24, seed=5, h_res=h_res)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(5))
    got = grads_of(conn, x0, "triton", torch.float32, chained)
    assert (fwd.launches, chain.launches, [k["DX"] for k in bwd.kwargs].count(False)) == (1, 2, 2)
    ref = grads_of(conn.double(), x0.double(), "reference", torch.float64, chained)
    assert rel_err(got[0], ref[0]) < TOL[torch.float32]
    for a, b in zip(got[1:], ref[1:]):
        assert rel_err(a, b) < 1e-3


def test_chained_backward_retain_grad():
    """retain_grad on a chained state: the read falls back, and the state's gradient is the whole one."""
    conn = make_conn(4, 24, seed=11)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(11))

    def run(backend: str):
        x = x0.clone().requires_grad_()
        with ops.use_backend(backend), chained_backward():
            s2, ahead = conn.forward_ahead(x * 1.25, reader=conn)
            s2.retain_grad()
            weighted(conn.forward_ahead(s2, read_ahead=ahead)[0]).backward()
        return s2.grad, x.grad

    for a, b in zip(run("triton"), run("reference")):
        assert rel_err(a, b) < 1e-4


def test_chained_backward_leaves_terms_only_for_its_own_post():
    """Terms left by a read in a backward that stops there (autograd.grad of that sublayer's phi only) are never
    used by a later backward that reaches the writing post without going through the read."""
    a, b = make_conn(4, 24, seed=12), make_conn(4, 24, seed=13)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(12))
    results = {}
    for backend in ("triton", "reference"):
        x = x0.clone().requires_grad_()
        with ops.use_backend(backend), chained_backward():
            s2, ahead = a.forward_ahead(x * 1.25, reader=b)
            out = b.forward_ahead(s2, read_ahead=ahead)[0]
        torch.autograd.grad(weighted(out), [b.projection()[0]], retain_graph=True)  # b's read leaves its terms
        results[backend] = torch.autograd.grad(weighted(s2.square()), [x])[0]
    assert rel_err(results["triton"], results["reference"]) < 1e-4


def test_trainer_runs_chained_backward(monkeypatch, tmp_path):
    """`mhc train` with the kernels: its forward and backward run under chained_backward (the default job's model,
    2 layers = 4 chained connections, 2 steps through the interpreter), and the loss is finite."""
    from conftest import TINY
    from torch_mhc.cli import main
    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    sets = [*TINY, "model.n_layers=2", "steps=2", "eval_every=100", "diag_every=100", "ckpt_every=100",
            f"out_dir={tmp_path}"]
    with ops.use_backend("triton"):
        assert main(["train", *[a for s in sets for a in ("--set", s)]]) == 0
    assert chain.launches == 2 * 3  # per step: every post but the last of the 4 connections
    lines = next(tmp_path.glob("*/metrics.jsonl")).read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) for v in losses)


def _chain_of(k, n=4, C=24, seed=0):
    """k connections (distinct parameters), to be run in a chain (``run_chain``, ``_after``) as DecoderLM runs them."""
    return [make_conn(n, C, seed=seed + i) for i in range(k)]


def _after(conns, s, ahead):
    """The state ``conns[0]`` wrote (``s``, with the read-ahead ``ahead`` it computed) through the rest of the chain."""
    for conn, reader in zip(conns[1:], list(conns[2:]) + [None]):
        s, ahead = conn.forward_ahead(s, read_ahead=ahead, reader=reader)
    return s


def test_chained_backward_with_nothing_requiring_grad():
    """A frozen trunk (nothing requires grad) under the scope: same state, no handoff, no error."""
    conns = _chain_of(3)
    for c in conns:
        c.requires_grad_(False)
    x = torch.randn(5, 4, 24)
    with ops.use_backend("triton"):
        plain = run_chain(conns, x)
        with chained_backward():
            chained_out = run_chain(conns, x)
    assert torch.equal(plain, chained_out) and not chained_out.requires_grad


def test_one_read_ahead_given_to_two_reads():
    """The functional API lets code hand one read-ahead to two reads of a state: the first read claims the
    handoff, the second keeps its own dx; gradients match the reference."""
    g = torch.Generator().manual_seed(21)
    n, C, M = 4, 24, 24
    phi = (torch.randn(n * C, M, generator=g) * 0.3).requires_grad_()
    bias_a, bias_b = torch.randn(M, generator=g).requires_grad_(), torch.randn(M, generator=g).requires_grad_()
    alpha = torch.full((3,), 0.5).requires_grad_()
    x0 = torch.randn(5, n, C, generator=g)
    results = {}
    for backend, chain in (("reference", False), ("triton", True)):
        x = x0.clone().requires_grad_()
        with ops.use_backend(backend):
            y, (_, h_post, h_res), link = Fm.mhc_sublayer_pre(x, phi, bias_a, alpha)
            s1, ahead = Fm.stream_post(x, h_post, h_res, torch.tanh(y), link=link, read_ahead=(phi, 1e-6),
                                       chain_backward=chain)
            ya, _, _ = Fm.mhc_sublayer_pre(s1, phi, bias_a, alpha, read_ahead=ahead)
            yb, _, _ = Fm.mhc_sublayer_pre(s1, phi, bias_b, alpha, read_ahead=ahead)
            loss = weighted(ya) + 0.7 * weighted(yb.square())
        results[backend] = torch.autograd.grad(loss, [x, phi, bias_a, bias_b, alpha])
    for a, b in zip(results["triton"], results["reference"]):
        assert rel_err(a, b) < 1e-4


def test_concurrent_backwards_over_one_graph(monkeypatch):
    """Two backward passes over one graph (threads, retain_graph) interleaved between a read's backward and its
    writer's: each finds its own terms (kept per graph task). The order is forced with a side consumer of the
    state whose backward waits in thread A until thread B has finished."""
    import threading

    a_waiting, b_done = threading.Event(), threading.Event()

    class Pause(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            if threading.current_thread().name == "A":
                a_waiting.set()
                b_done.wait(timeout=60)
            return grad

    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    conns = _chain_of(3, seed=30)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(30))
    results = {}
    for backend in ("reference", "triton"):
        x = x0.clone().requires_grad_()
        with ops.use_backend(backend), chained_backward():
            s1, ahead = conns[0].forward_ahead(x * 1.25, reader=conns[1])
            side = 0.3 * weighted(Pause.apply(s1).square())  # made before the read: its backward runs after it
            loss = weighted(_after(conns, s1, ahead)) + side
        params = [x] + list(conns[0].parameters())
        out = {}
        a_waiting.clear()
        b_done.clear()

        def task(name):
            out[name] = torch.autograd.grad(loss, params, retain_graph=True)
            if name == "B":
                b_done.set()

        ta = threading.Thread(target=task, args=("A",), name="A")
        ta.start()
        assert a_waiting.wait(timeout=60)
        tb = threading.Thread(target=task, args=("B",), name="B")
        tb.start()
        tb.join()
        ta.join()
        results[backend] = out
    assert chain.launches == 2 * 2  # both passes chained both posts that have a reader
    for name in ("A", "B"):
        for a, b in zip(results["triton"][name], results["reference"]["A"]):
            assert rel_err(a, b) < 1e-4, name


def test_chained_scope_is_per_thread(monkeypatch):
    """Another thread inside chained_backward() does not chain this thread's forward (no handoff is made)."""
    import threading

    from torch_mhc.ops import sublayer

    made = []
    init = sublayer.Handoff.__init__
    monkeypatch.setattr(sublayer.Handoff, "__init__", lambda self: (init(self), made.append(1))[0])
    inside, release = threading.Event(), threading.Event()

    def other():
        with chained_backward():
            inside.set()
            release.wait(30)

    conns = _chain_of(3, seed=40)
    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(30)
    try:
        with ops.use_backend("triton"):
            run_chain(conns, torch.randn(5, 4, 24, requires_grad=True))
    finally:
        release.set()
        thread.join()
    assert made == []
    with ops.use_backend("triton"), chained_backward():
        run_chain(conns, torch.randn(5, 4, 24, requires_grad=True))
    assert len(made) == 2  # the first two posts' read-aheads (the last connection has no reader)


def test_chained_backward_leaves_no_terms_behind(monkeypatch):
    """A backward that does not reach the writing post (autograd.grad of the reader's phi only) does not defer:
    no handoff holds terms afterwards, and none outlives the graph without the cyclic GC."""
    import gc
    import weakref

    from torch_mhc.ops import sublayer

    made = []
    init = sublayer.Handoff.__init__
    monkeypatch.setattr(sublayer.Handoff, "__init__", lambda self: (init(self), made.append(weakref.ref(self)))[0])
    conns = _chain_of(3, seed=50)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(50))
    gc.disable()
    try:
        with ops.use_backend("triton"), chained_backward():
            out = run_chain(conns, x0.clone().requires_grad_())
        torch.autograd.grad(weighted(out), [conns[2].projection()[0]])
        assert len(made) == 2 and all(not h().pending for h in made)
        del out
        assert all(h() is None for h in made)
        # the gradient of a state alone: captured before its writer, which does not run: exact, nothing left
        grads = {}
        for backend in ("triton", "reference"):
            with ops.use_backend(backend), chained_backward():
                s1, ahead = conns[0].forward_ahead(x0.clone().requires_grad_(), reader=conns[1])
                out = _after(conns, s1, ahead)
            grads[backend] = torch.autograd.grad(weighted(out), [s1])[0]
        assert rel_err(grads["triton"], grads["reference"]) < 1e-4
        assert len(made) == 4 and all(h() is None or not h().pending for h in made)
    finally:
        gc.enable()


def test_handoff_terms_carry_no_autograd_history():
    """Terms left in a handoff are detached: they cannot keep the read's node (and the handoff) alive in a cycle."""
    from torch_mhc.ops.sublayer import Handoff

    w = torch.randn(3, requires_grad=True)
    h = Handoff()
    zero = h.leave((w * 2, None, torch.ones(2)), torch.empty(2, 4, 3))
    (terms, kept_zero), = h.pending.values()
    assert zero.stride() == (0, 0, 0) and kept_zero is zero
    assert terms[1] is None and all(t.grad_fn is None for t in terms if t is not None)


def test_chained_backward_deepseek_v4_fp32(monkeypatch):
    """The V4 layout (phi stored transposed) through chained posts, against float64 (fp32: tight)."""
    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    conns = [make_conn(4, 24, "deepseek-v4", seed=60 + i) for i in range(3)]
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(60))
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        for c in conns:
            c.to(dtype)
        x = x0.to(dtype).requires_grad_()
        with ops.use_backend(backend), chained_backward():
            out = run_chain(conns, x)
        results[backend] = torch.autograd.grad(weighted(out), [x] + [p for c in conns for p in c.parameters()])
    assert chain.launches == 2  # the two posts that have a reader
    assert rel_err(results["triton"][0], results["reference"][0]) < TOL[torch.float32]
    for a, b in zip(results["triton"][1:], results["reference"][1:]):
        assert rel_err(a, b) < 1e-3


def test_trainer_dtypes_fp32_streams_bf16_sublayer(monkeypatch):
    """What `mhc train` runs: fp32 streams, sublayers under bf16 autocast (their output bf16, the gradient of their
    input fp32), a chained stack (read-ahead forward, chained backward). Against the fp32 reference without autocast,
    the output and every gradient are as close as the reference path's own under autocast, within 4x or 2^-6 (the
    bf16 sublayers' gradients are sums of bf16 products; the interpreter truncates to bf16 where GPUs round)."""
    from torch_mhc.ops import streams

    chain = CountLaunches(streams._post_bwd_chain)
    monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    n, C, T = 4, 24, 7
    conns = [make_conn(n, C, seed=i) for i in range(2)]
    x0 = torch.randn(T, n, C)

    def run(backend, autocast):
        x = x0.clone().requires_grad_()
        with (ops.use_backend(backend), chained_backward(),
              torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
            s = run_chain(conns, x)
        params = [p for c in conns for p in c.parameters()]
        return [s, *torch.autograd.grad(weighted(s), [x, *params])]

    truth = run("reference", False)
    ref = run("reference", True)
    got = run("triton", True)
    assert chain.launches == 1
    assert got[0].dtype == torch.float32
    for g, r, t in zip(got, ref, truth):
        assert rel_err(g, t) < max(4 * rel_err(r, t), TOL[torch.bfloat16])
