import contextlib
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from conftest import CountLaunches
from torch_mhc import ManifoldHyperConnection, expand_streams, ops
from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.nn import chained_backward
from torch_mhc.nn.recompute import optimal_interval, stream_recompute


def test_paper_interval():
    assert optimal_interval(4, 60) == round((4 * 60 / 6) ** 0.5) == 6
    assert optimal_interval(1, 1) == 1


def run_stack(conns, x, every, read_ahead=False):
    """Forward through the stack (``read_ahead``: each post hands the next read its read-ahead); returns (output,
    weak references to the storage of every state)."""
    states = []
    h = expand_streams(x, conns[0].n)
    ctx = stream_recompute(every) if every else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    ahead = None
    with ctx:
        for c, reader in zip(conns, conns[1:] + [None]):
            h, ahead = c.forward_ahead(h, read_ahead=ahead, reader=reader if read_ahead else None)
            states.append(StorageWeakRef(h.untyped_storage()))
    return h, states


@pytest.mark.parametrize("backend", ["reference", "triton", "triton-chained"])
@pytest.mark.parametrize("every", [1, 2, 3, 8])
def test_recompute_exact_and_drops_states(backend, every, monkeypatch):
    """Same gradients bit for bit with and without recompute; triton-chained: connections chained (read-ahead)
    under chained_backward, whose posts recompute the state in their backward kernel (checked to run, and
    against the reference path)."""
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    torch.manual_seed(0)
    C, n, L = 16, 4, 8
    subs = [torch.nn.Sequential(torch.nn.RMSNorm(C), torch.nn.Linear(C, C), torch.nn.Tanh()) for _ in range(L)]
    conns = [ManifoldHyperConnection(C, n, s, layer_index=i) for i, s in enumerate(subs)]
    chained = backend == "triton-chained"
    chain = None
    if chained:
        from torch_mhc.ops import streams

        chain = CountLaunches(streams._post_bwd_chain)
        monkeypatch.setattr(streams, "_post_bwd_chain", chain)
    with torch.no_grad():
        for c in conns:
            c.phi.normal_(std=0.1)
            c.bias.normal_()
    x = torch.randn(2, 5, C, requires_grad=True)
    params = [x] + [p for c in conns for p in c.parameters()]
    grads = {}
    with ops.use_backend(backend.split("-")[0]), (chained_backward() if chained else contextlib.nullcontext()):
        for mode in (0, every):
            out, states = run_stack(conns, x, mode, read_ahead=chained)
            gc.collect()
            alive = sum(not s.expired() for s in states[:-1])  # the last one is `out` itself
            loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
            del out
            grads[mode] = (torch.autograd.grad(loss, params), alive)
    (g_full, alive_full), (g_rc, alive_rc) = grads[0], grads[every]
    assert alive_full == L - 1  # without recompute autograd keeps every state
    assert alive_rc == (L - 1) // every  # with it, one state every `every` sublayers
    for a, b in zip(g_full, g_rc):
        assert torch.equal(a, b)
    if chained:
        assert chain.launches == 2 * (L - 1)  # every post but the last, with and without recompute
        with ops.use_backend("reference"):
            out, _ = run_stack(conns, x, 0)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        for a, b in zip(g_full, torch.autograd.grad(loss, params)):
            assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < 1e-4


def test_model_recompute_same_loss_and_grads():
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 16))
    results = []
    for recompute in (False, True):
        torch.manual_seed(2)
        model = DecoderLM(ModelConfig(dim=32, n_layers=3, n_heads=2, max_seq_len=16, recompute=recompute))
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert model.recompute_interval() == optimal_interval(4, 6) == 2
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
