"""CUDA graphs and inductor on a GPU: the fused kernels captured and replayed (skipped without CUDA; CI has no GPU,
``bench/gpu_check.sh`` runs this file on the first lent one).

What is checked, each against the same computation run eagerly on the same GPU:
- a decode step's connections (one token per sequence through a stack of mHC connections, ``run_chain``)
  captured with ``torch.cuda.graph`` and replayed on new inputs: the same bits (same kernels, same grids); the
  read-ahead runs where n has it (4 here, not 6 or 16);
- a stack's forward and backward as ``torch.cuda.make_graphed_callables``: outputs and every gradient, same bits;
- a ``DecoderLM`` forward at a fixed shape captured whole, replayed on new tokens: the same bits;
- ``torch.compile(model, mode="reduce-overhead", fullgraph=True)`` (inductor with CUDA graph trees over the
  ``torch_mhc::`` custom ops): no CUDA-graph skip, logits within fp32 rounding of eager (inductor fuses the
  model's other ops its own way, so not bit-identical).
A decode step with ``KVCache`` grows the cache each token (a new shape every step), so the model's whole decode
step is not a static graph; its mHC part (the connections at one token) is what the first test captures.
"""

import pytest
import torch
from torch import nn

from torch_mhc import ManifoldHyperConnection, ops
from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.nn import run_chain

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
pytest.importorskip("triton")


def connection_stack(n: int, dim: int, variant: str, depth: int = 4, seed: int = 0) -> nn.ModuleList:
    """``depth`` mHC connections around small MLPs, with random (not initial) coefficients, on the GPU."""
    torch.manual_seed(seed)
    conns = nn.ModuleList(
        ManifoldHyperConnection(dim, n, nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)),
                                sinkhorn_iters=20, variant=variant)
        for _ in range(depth))
    with torch.no_grad():
        for p in conns.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return conns.cuda()


def warm_up(fn, *args, steps: int = 3):
    """Run ``fn`` a few times on a side stream before capture (Triton compiles and autotuning happen here, not
    inside the graph), as torch.cuda.graph's documentation asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@pytest.mark.parametrize("n, dtype", [(4, torch.bfloat16), (4, torch.float32), (6, torch.bfloat16),
                                      (16, torch.bfloat16)])
@torch.no_grad()
def test_decode_step_connections_replay_bit_identical(variant, n, dtype):
    dim = 256
    conns = connection_stack(n, dim, variant).to(dtype)
    static = torch.randn(8, 1, n, dim, device="cuda", dtype=dtype)  # 8 sequences, one new token each
    assert ops.should_fuse(static)
    warm_up(run_chain, list(conns), static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run_chain(list(conns), static)
    for seed in range(3):
        x = torch.randn(static.shape, device="cuda", dtype=dtype, generator=torch.Generator("cuda").manual_seed(seed))
        static.copy_(x)
        g.replay()
        torch.testing.assert_close(out, run_chain(list(conns), x), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
def test_training_step_graphed_callables_bit_identical(variant):
    n, dim = 4, 256
    conns = connection_stack(n, dim, variant).to(torch.bfloat16)
    eager = connection_stack(n, dim, variant).to(torch.bfloat16)
    eager.load_state_dict(conns.state_dict())

    class Stack(nn.Module):
        def __init__(self, conns):
            super().__init__()
            self.conns = conns

        def forward(self, x):
            return run_chain(list(self.conns), x)

    sample = torch.randn(4, 32, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(Stack(conns), (sample,))
    for seed in range(2):
        gen = torch.Generator("cuda").manual_seed(seed)
        x = torch.randn(sample.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        g_out = torch.randn(sample.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        # None, not zeros: the graphed backward hands out its static gradient buffers, which the first step's
        # .grad then is; zeroing them in place and replaying would add the new gradient to itself
        conns.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = graphed(xa), Stack(eager)(xb)
        ya.backward(g_out)
        yb.backward(g_out)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
        for (name, pa), pb in zip(conns.named_parameters(), eager.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def small_model(variant: str) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=64, variant=variant)
    return DecoderLM(cfg).cuda().eval()


@pytest.mark.parametrize("variant", ["paper", "deepseek-v4"])
@torch.no_grad()
def test_model_forward_replay_bit_identical(variant):
    model = small_model(variant)
    static = torch.randint(0, 256, (2, 16), device="cuda")
    warm_up(lambda idx: model(idx)[0], static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        logits = model(static)[0]
    for seed in range(3):
        idx = torch.randint(0, 256, static.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        static.copy_(idx)
        g.replay()
        torch.testing.assert_close(logits, model(idx)[0], rtol=0, atol=0)


@torch.no_grad()
def test_reduce_overhead_compile_uses_cuda_graphs():
    from torch._dynamo.utils import counters

    model = small_model("paper")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # cudagraph trees: warm-up run, recording, then replays
        idx = torch.randint(0, 256, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        got = compiled(idx)[0].clone()
        torch.testing.assert_close(got, model(idx)[0], rtol=1e-4, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
