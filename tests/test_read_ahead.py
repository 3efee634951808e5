"""The read-ahead as a value: a post computes its reader's coefficient GEMM only when handed the reader, returns it,
and the caller hands it to that reader's read (``forward_ahead``, ``post_ahead``, ``pre(read_ahead=...)``,
``run_chain``, ``DecoderLM``'s ``run_blocks``). Modules between two connections (hooks, compiled connections, a
module of the user's in the block list, a checkpointed block) are supported: the read-ahead is dropped there and
the results are those without it. Kernels run through Triton's interpreter."""

import pytest
import torch
from torch import nn

from conftest import CountLaunches
from torch_mhc import ManifoldHyperConnection, ops
from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.nn import HyperConnection, Residual, forward_ahead_of, run_chain

pytest.importorskip("triton")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make_conn(seed, n=4, C=24, cls=ManifoldHyperConnection, **kwargs):
    torch.manual_seed(seed)
    conn = cls(C, n, nn.Sequential(nn.Linear(C, C), nn.Tanh()), layer_index=seed, **kwargs)
    if isinstance(conn, ManifoldHyperConnection):
        with torch.no_grad():
            proj, bias, _ = conn.projection()
            proj.normal_(std=0.3)
            bias.normal_()
    return conn


@pytest.fixture
def gemm(monkeypatch):
    """Counts launches of the coefficient GEMM kernel (each read that did not take a read-ahead launches it)."""
    from torch_mhc.ops import coefficients

    counter = CountLaunches(coefficients._gemm_fwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", counter)
    return counter


def weighted(t):
    return (t.double() * torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view_as(t)).sum()


def test_post_ahead_computes_only_for_a_reader_given_and_the_read_uses_it(gemm):
    """post_ahead without a reader computes nothing (None); with one, the state is bit-for-bit the plain post's and
    the value, handed to the reader's pre, replaces its GEMM (no launch), giving its coefficients to rounding; a
    read-ahead not handed on is not used (the module keeps nothing)."""
    a, b = make_conn(1), make_conn(2)
    x = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(3))
    with ops.use_backend("triton"), torch.no_grad():
        y, state = a.pre(x)
        plain, none = a.post_ahead(state, a.sublayer(y))
        assert none is None and gemm.launches == 1
        s, ahead = a.post_ahead(state, a.sublayer(y), b)
        assert torch.equal(s, plain) and ahead is not None
        _, own = b.pre(s)  # not handed the read-ahead: computes its own GEMM
        assert gemm.launches == 2
        _, taken = b.pre(s, read_ahead=ahead)
        assert gemm.launches == 2
        _, again = b.pre(s)  # nothing was kept in b: its own GEMM again
        assert gemm.launches == 3
    assert torch.equal(own.h_res, again.h_res) and torch.equal(own.h_post, again.h_post)
    for got, want in zip((taken.h_post, taken.h_res), (own.h_post, own.h_res)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("reader", ["hc", "residual", "static", "other-dim", "fixed-mappings"])
def test_readers_that_take_no_read_ahead_get_none(gemm, reader):
    """A reader whose read is not the fused mHC read (HC, residual, static mHC, fixed mappings) or that has another
    width gets no read-ahead: None is returned and no read-ahead post runs."""
    from torch_mhc.ops import streams

    post = CountLaunches(streams._post_fwd)
    other = {"hc": lambda: make_conn(2, cls=HyperConnection), "residual": lambda: Residual(24, 4),
             "static": lambda: make_conn(2, dynamic=False), "other-dim": lambda: make_conn(2, C=16),
             "fixed-mappings": lambda: make_conn(2, learn=("pre", "post"))}[reader]()
    a = make_conn(1)
    x = torch.randn(5, 4, 24)
    with ops.use_backend("triton"), torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(streams, "_post_fwd", post)
        _, ahead = a.forward_ahead(x, reader=other)
    assert ahead is None and [k["PROJ"] for k in post.kwargs] == [False]


def test_run_chain_hands_each_value_on_and_matches_the_reference(gemm):
    """Three connections: one GEMM launch for the whole chain (each later read takes its writer's value); the output
    and every gradient equal the float64 reference path's, and those of the same chain called one by one (no
    read-ahead: three launches) to rounding."""
    conns = [make_conn(i) for i in range(3)]
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(4))

    def run(backend, dtype, chain):
        for c in conns:
            c.to(dtype)
        x = x0.to(dtype).requires_grad_()
        with ops.use_backend(backend):
            out = run_chain(conns, x) if chain else conns[2](conns[1](conns[0](x)))
        return [out, *torch.autograd.grad(weighted(out), [x, *[p for c in conns for p in c.parameters()]])]

    chained = run("triton", torch.float32, True)
    assert gemm.launches == 1
    one_by_one = run("triton", torch.float32, False)
    assert gemm.launches == 1 + 3
    ref = run("reference", torch.float64, True)
    for got, plain, want in zip(chained, one_by_one, ref):
        assert rel_err(got, want) < 1e-4 and rel_err(plain, want) < 1e-4


def test_hooked_or_compiled_connection_is_called_as_a_module(gemm):
    """forward_ahead_of calls a hooked connection through ``__call__`` (its hook runs and may replace the output)
    and drops the read-ahead on both sides of it; a hooked reader gets none. Results equal the reference path's
    with the same hook."""
    conns = [make_conn(i) for i in range(3)]
    seen = []
    handle = conns[1].register_forward_hook(lambda m, i, o: seen.append(o.shape) or o * 0.5)
    x0 = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(5))
    results = {}
    for backend in ("triton", "reference"):
        with ops.use_backend(backend), torch.no_grad():
            results[backend] = run_chain(conns, x0)
    assert gemm.launches == 3  # conns[0] computed none for its hooked reader; conns[1] none for conns[2]
    assert seen == [(5, 4, 24)] * 2
    assert rel_err(results["triton"], results["reference"]) < 1e-5
    handle.remove()
    with ops.use_backend("triton"), torch.no_grad():
        out, ahead = forward_ahead_of(conns[0], x0, reader=conns[1])
        assert ahead is not None
        conns[1]._compiled_call_impl = conns[1].forward  # as module.compile() sets it: a call is not forward
        try:
            assert forward_ahead_of(conns[0], x0, reader=conns[1])[1] is None
            assert forward_ahead_of(conns[1], out, read_ahead=ahead, reader=conns[2])[1] is None
        finally:
            conns[1]._compiled_call_impl = None


def small_model(**kw):
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**{**dict(vocab_size=64, dim=24, n_layers=3, n_heads=2, max_seq_len=8,
                                           n_streams=4), **kw}))


def logits_and_grads(model, backend):
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    with ops.use_backend(backend):  # the backward too: a checkpointed block's recompute runs the same path
        logits, loss = model(idx, idx)
        loss.backward()
    return logits, {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_close_to_reference(model, got):
    logits, grads = logits_and_grads(model, "reference")
    assert rel_err(got[0], logits) < 1e-4
    for k, g in grads.items():  # relative to the largest entry, or 1e-6 for a gradient near zero (alpha: ~1e-9)
        assert (got[1][k] - g).abs().max() / max(g.abs().max().item(), 1e-6) < 1e-3, k


class Scale(nn.Module):
    """A module of the user's in ``model.blocks``: ``(streams, cos, sin) -> streams``."""

    def forward(self, h, cos, sin):
        return 0.75 * h


@pytest.mark.parametrize("insert", ["none", "connection-hook", "block-hook-pair", "block-hook-tensor", "module"])
def test_decoder_supports_what_is_put_between_two_connections(gemm, insert):
    """DecoderLM hands the read-ahead from block to block (one GEMM launch per forward). A forward hook on a
    connection (it runs), a hook on a block that replaces its output (the pair, or the streams alone) and a module
    of the user's inserted into ``model.blocks`` are supported: the read-ahead is dropped there (one more launch
    per read that computes its own), and logits and gradients equal the reference path's with the same insertion."""
    model = small_model()
    ran = []
    if insert == "connection-hook":
        model.blocks[0].ffn.register_forward_hook(lambda m, i, o: ran.append(1) or 1.5 * o)
    elif insert == "block-hook-pair":
        model.blocks[1].register_forward_hook(lambda m, i, o: ran.append(1) or (1.5 * o[0], o[1]))
    elif insert == "block-hook-tensor":
        model.blocks[1].register_forward_hook(lambda m, i, o: ran.append(1) or 1.5 * o[0])
    elif insert == "module":
        model.blocks.insert(2, Scale())
    got = logits_and_grads(model, "triton")
    launches = {"none": 1, "connection-hook": 3, "block-hook-pair": 2, "block-hook-tensor": 2, "module": 2}[insert]
    assert gemm.launches == launches
    assert len(ran) == (0 if insert in ("none", "module") else 1)
    assert_close_to_reference(model, got)


def test_block_returning_something_else_is_refused_by_name():
    model = small_model()
    model.blocks[1].register_forward_hook(lambda m, i, o: {"streams": o[0]})
    with pytest.raises(ValueError, match=r"block 1 \(Block\) returned dict: a Block returns \(streams, read-ahead"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_checkpointed_blocks_neither_take_nor_give_a_read_ahead(gemm):
    """``activation_checkpoint=every:2`` (blocks 1 and 3 of 4): under gradients each checkpointed block's first read
    and the read after it launch their own GEMM, in the forward (1 + 3) and again in the recomputes (2); without
    gradients the blocks are plain and the chain runs through (1)."""
    from torch_mhc.distributed.parallelize import apply_activation_checkpoint

    model = apply_activation_checkpoint(small_model(n_layers=4), "every:2")
    got = logits_and_grads(model, "triton")
    assert gemm.launches == 1 + 3 + 2
    with ops.use_backend("triton"), torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert gemm.launches == 6 + 1
    assert_close_to_reference(model, got)


def test_deepseek_v4_connection_keeps_the_fused_read_through_the_base_hook():
    """DeepseekV4Connection answers the base's ``coefficients_are_base`` (its coefficients are the base's when the two
    eps agree) instead of restating the fused-read condition; static or fixed-mapping settings still turn it off."""
    from torch_mhc.integrations.deepseek_v4 import DeepseekV4Connection

    def v4(norm_eps, **settings):
        conn = DeepseekV4Connection(24, 4, sinkhorn_iters=5, eps=1e-6, norm_eps=norm_eps, init_std=0.02)
        conn.to_empty(device="cpu").reset_parameters()
        for k, v in settings.items():
            setattr(conn, k, v)
        return conn

    assert "fused_read" not in vars(DeepseekV4Connection)
    assert v4(1e-6).fused_read() and v4(1e-6).read_ahead_spec() is not None
    assert not v4(1e-5).fused_read() and v4(1e-5).read_ahead_spec() is None
    assert not v4(1e-6, dynamic=False).fused_read()
    assert not v4(1e-6, learn=("pre", "post")).fused_read()
