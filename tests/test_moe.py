"""The grouped MoE path against the loop over experts it replaced (MoE.forward_reference): the same
outputs, gradients, loads and training curve, with no host sync."""

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from torch_mhc.models import DecoderLM, ModelConfig, MoE
from torch_mhc.models.moe import grouped_mm_available, grouped_swiglu, padded_layout

aten = torch.ops.aten
# ops that read a tensor's values back to the host (item, bool, int) or whose output shape depends on them
DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten.bincount.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.masked_scatter.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class CountSyncs(TorchDispatchMode):
    """Counts, by name, the ops that make a host sync (on CUDA) or a data-dependent shape: ``DATA_DEPENDENT``
    and indexing with a boolean mask; also ``Tensor.tolist`` calls (CPU tolist reads memory directly, it
    dispatches no op). ``ops`` counts every op seen, to check backward ran under the mode."""

    def __init__(self):
        super().__init__()
        self.syncs, self.ops = {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] = self.ops.get(name, 0) + 1
        masked = func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in DATA_DEPENDENT or masked:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.syncs["Tensor.tolist"] = counter.syncs.get("Tensor.tolist", 0) + 1
            return counter._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def random_moe(dim=16, n_routed=8, n_shared=1, top_k=3, hidden=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    moe = MoE(dim, n_routed, n_shared, top_k, hidden, bias_rate=0.05).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.3)
        moe.bias.normal_(std=0.3)
    return moe


def run(moe, x, impl, block=None):
    """Output, gradients of (x, every parameter) and counted load of one training forward + backward."""
    moe.impl, moe.block = impl, block
    moe.load.zero_()
    x = x.detach().requires_grad_()
    y = moe(x)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                [x, *moe.parameters()])
    return y, grads, moe.load.clone()


CASES = [("padded", None), ("padded", 1), ("padded", 4), ("padded", 10_000)]  # 10_000: [E, tokens] buckets


@pytest.mark.parametrize("impl, block", CASES)
@pytest.mark.parametrize("routing", ["random", "crowded"])
def test_grouped_equals_the_loop_float64(impl, block, routing):
    """Output, input and parameter gradients, and load equal the loop's in float64, with experts that get no
    token and (crowded) k experts that get every token, which fills [E, tokens] buckets exactly."""
    moe = random_moe()
    if routing == "crowded":
        with torch.no_grad():
            moe.bias.copy_(torch.tensor([0, 9, 0, 9, 0, 0, 9, 0], dtype=moe.bias.dtype))  # experts 1, 3, 6
    x = torch.randn(3, 13, 16, dtype=torch.float64)
    y0, g0, load0 = run(moe, x, "reference")
    y1, g1, load1 = run(moe, x, impl, block)
    if routing == "crowded":
        assert load1.tolist() == [0, 39, 0, 39, 0, 0, 39, 0]
    else:
        assert (load1 == 0).any() or load1.min() < load1.max()  # uneven
    assert torch.equal(load0, load1)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-13)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_grouped_mm_probe_works_without_gradients_and_draws_no_random_numbers(monkeypatch):
    """The probe behind "auto" (once per device and dtype) gives the same answer under no_grad and
    inference_mode, and leaves the global generator as it was (the training curve does not depend on it)."""
    from torch_mhc.models import moe as moe_module

    for context in (torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
        state = torch.random.get_rng_state()
        with context():
            assert grouped_mm_available(torch.device("cpu"), torch.float32)
        assert torch.equal(torch.random.get_rng_state(), state)


def test_grouped_mm_probe_is_invisible_to_saved_tensor_hooks(monkeypatch):
    """The probe keeps its saved tensors to itself: outer saved-tensor hooks (memory counting) see none, and a
    first forward under activation checkpointing, which probes, saves as many tensors as its recompute."""
    from torch_mhc.models import moe as moe_module

    monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        assert grouped_mm_available(torch.device("cpu"), torch.float32)
    assert packed == []
    monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    moe = random_moe(dim=32, dtype=torch.float32)
    x = torch.randn(24, 32, requires_grad=True)
    torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False).sum().backward()
    y = x.detach().requires_grad_()
    moe(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_grouped_mm_on_cpu_equals_the_loop_float32(monkeypatch):
    """torch._grouped_mm runs on the CPU in float32 (not float64): same results within float32 summation
    order; "auto" takes it for float32 with 16-byte aligned widths, the padded bmm for float64 or odd widths."""
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or grouped_mm(*a, **k))
    assert grouped_mm_available(torch.device("cpu"), torch.float32)
    assert not grouped_mm_available(torch.device("cpu"), torch.float64)
    for dtype, dim, used in ((torch.float64, 16, False), (torch.float32, 18, False), (torch.float32, 16, True)):
        calls.clear()
        random_moe(dim=dim, dtype=dtype)(torch.randn(5, dim, dtype=dtype))
        assert calls == ([dtype] * 3 if used else [])
    moe = random_moe(dtype=torch.float32)
    x = torch.randn(2, 21, 16)
    y0, g0, load0 = run(moe, x, "reference")
    y1, g1, load1 = run(moe, x, "grouped_mm")
    assert torch.equal(load0, load1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("block", [1, 3, 8, 64])
def test_padded_layout_puts_each_expert_in_its_own_blocks(block):
    torch.manual_seed(1)
    tokens, E = 20, 6
    for counts in ([20, 0, 0, 20, 0, 0], [0, 0, 0, 0, 0, 40], [7, 0, 13, 1, 19, 0], [1, 1, 1, 1, 1, 35]):
        counts = torch.tensor(counts)
        n = int(counts.sum())
        dest, block_expert, (nb, b) = padded_layout(counts, n, tokens if counts.max() <= tokens else n, block)
        assert dest.unique().numel() == n and 0 <= dest.min() and dest.max() < nb * b
        expert = torch.repeat_interleave(torch.arange(E), counts)
        owner = torch.arange(E)[dest // b] if block_expert is None else block_expert[dest // b]
        assert torch.equal(owner, expert)
        assert (dest[1:] > dest[:-1]).all()  # the sorted order kept


def test_grouped_swiglu_takes_any_expert_sorted_rows():
    """The entry an expert-parallel dispatch would feed: rows grouped by expert with device counts (no
    capacity bound given), against one matmul chain per expert."""
    torch.manual_seed(2)
    E, C, H = 5, 8, 6
    counts = torch.tensor([3, 0, 11, 1, 0])
    xs = torch.randn(int(counts.sum()), C, dtype=torch.float64)
    w1, w3, w2 = (torch.randn(E, C, H, dtype=torch.float64), torch.randn(E, C, H, dtype=torch.float64),
                  torch.randn(E, H, C, dtype=torch.float64))
    ref = torch.cat([(torch.nn.functional.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
                     for e, x in enumerate(xs.split(counts.tolist()))])
    for block in (None, 2, 100):
        torch.testing.assert_close(grouped_swiglu(xs, counts, w1, w3, w2, block=block), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="impl"):
        grouped_swiglu(xs, counts, w1, w3, w2, impl="loop")


def test_grouped_swiglu_takes_no_rows():
    """An expert-parallel rank may receive no rows: "auto" then runs (forward and backward, zero gradients) also
    where torch._grouped_mm would pick the float32 CPU path (its backward fails on no rows)."""
    w1, w3, w2 = (torch.randn(4, 32, 16, requires_grad=True), torch.randn(4, 32, 16), torch.randn(4, 16, 32))
    xs = torch.zeros(0, 32, requires_grad=True)
    y = grouped_swiglu(xs, torch.zeros(4, dtype=torch.int64), w1, w3, w2)
    y.sum().backward()
    assert y.shape == (0, 32) and torch.equal(w1.grad, torch.zeros_like(w1))


def test_autocast_bfloat16_matches_the_loop():
    """Under CPU autocast the expert GEMMs run in bfloat16 as the loop's matmuls do."""
    moe = random_moe(dim=32, hidden=16, dtype=torch.float32)
    x = torch.randn(64, 32)
    outs = {}
    for impl in ("reference", "padded", "grouped_mm"):
        moe.impl = impl
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(xg)
        outs[impl] = (y, *torch.autograd.grad(y.float().pow(2).sum(), [xg, moe.w1]))
    for impl in ("padded", "grouped_mm"):
        assert outs[impl][0].dtype == outs["reference"][0].dtype
        for a, b in zip(outs[impl], outs["reference"]):
            torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def moe_model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, max_seq_len=16, moe=True, n_routed_experts=8,
                      n_shared_experts=1, top_k=2, expert_hidden=16, first_dense_layers=1, moe_bias_rate=0.02, **kw)
    return DecoderLM(cfg).to(dtype)


def set_impl(model, impl):
    for moe in model.moe_layers():
        moe.impl = impl
    return model


def test_host_syncs_of_the_moe_path():
    """Forward + backward of a 4-block model (3 MoE layers, 8 experts) and the balancing update: the loop makes
    one nonzero per expert per layer and a bincount per layer; the grouped path makes none, so the model makes
    exactly the syncs of the same model with dense FFNs (the mHC connections' finiteness checks), with the
    padded bmm and with torch._grouped_mm ("auto" on the CPU in float32)."""
    counts = {}
    for name, kw in (("dense", dict(moe=False)), ("reference", {}), ("padded", {}), ("auto", {})):
        torch.manual_seed(0)
        cfg = dict(vocab_size=64, dim=32, n_layers=4, n_heads=2, max_seq_len=16, moe=True, n_routed_experts=8,
                   top_k=2, first_dense_layers=1)
        model = set_impl(DecoderLM(ModelConfig(**{**cfg, **kw})), name)
        x = torch.randint(0, 64, (2, 16))
        model(x, x)  # a first forward probes torch._grouped_mm once per process (grouped_mm_available)
        with CountSyncs() as c:
            _, loss = model(x, x)
            loss.backward()
            for moe in model.moe_layers():
                moe.update_bias()
        assert any("index_add" in op or "scatter_add" in op for op in c.ops)  # backward ran under the mode
        counts[name] = c.syncs
    moe_layers, experts = 3, 8
    assert counts["reference"]["aten.nonzero.default"] == moe_layers * experts
    assert counts["reference"]["aten.bincount.default"] == moe_layers
    assert counts["padded"] == counts["auto"] == counts["dense"]
    assert set(counts["dense"]) <= {"aten._local_scalar_dense.default"}


def test_update_bias_is_the_same_without_its_branch():
    """update_bias dropped its ``if load.sum() > 0`` (a host sync): bit for bit the old update, zero loads included."""
    moe = random_moe(dtype=torch.float32)
    for load in (torch.zeros(8), torch.tensor([3.0, 0, 0, 1, 4, 4, 0, 12]), torch.full((8,), 5.0)):
        old = moe.bias.clone()
        if load.sum() > 0:
            old += moe.bias_rate * torch.sign(load.mean() - load)
        moe.load.copy_(load)
        moe.update_bias()
        assert torch.equal(moe.bias, old) and not moe.load.any()


MODEL_CASES = [{}, dict(variant="deepseek-v4", merge="head")]


@pytest.mark.parametrize("kw", MODEL_CASES, ids=["mhc", "v4-head"])
def test_model_outputs_and_gradients_float64(kw):
    """A 3-block model (first dense, two MoE layers): logits and every gradient of the grouped path equal
    the loop's in float64."""
    ref = set_impl(moe_model(torch.float64, **kw), "reference")
    new = set_impl(copy.deepcopy(ref), "auto")
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    (l0, loss0), (l1, loss1) = ref(x, y), new(x, y)
    loss0.backward()
    loss1.backward()
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(new.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("kw, impl", [({}, "padded"), ({}, "auto"), (MODEL_CASES[1], "auto")],
                         ids=["mhc-padded", "mhc-auto", "v4-head-auto"])
def test_fp32_loss_curve_unchanged(kw, impl):
    """Eight AdamW steps on one batch with the balancing update after each: the grouped path's fp32 loss curve
    equals the loop's within rtol 1e-5 (summation order only; measured 0 and 1.1e-7), and the balancing
    biases are identical (the same routing)."""
    curves, biases = {}, {}
    for name in ("reference", impl):
        model = set_impl(moe_model(**kw), name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
        curves[name] = []
        for _ in range(8):  # one batch again and again: the loss falls fast
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            for moe in model.moe_layers():
                moe.update_bias()
            curves[name].append(loss.item())
        biases[name] = torch.stack([m.bias for m in model.moe_layers()])
    assert curves["reference"][-1] < curves["reference"][0] - 0.1  # it trains
    assert biases["reference"].abs().max() > 0  # the routing bias moved
    torch.testing.assert_close(torch.tensor(curves[impl]), torch.tensor(curves["reference"]), rtol=1e-5, atol=0)
    assert torch.equal(biases[impl], biases["reference"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("probed", [True, False])
def test_compiles_to_one_graph(dtype, probed, monkeypatch):
    """torch.compile(fullgraph=True) traces forward and backward without a graph break (which any
    data-dependent shape or value read would force), through _grouped_mm when an eager probe said it runs
    (bfloat16; float32's fake-tensor rule is missing in PyTorch 2.13) and through the padded bmm otherwise."""
    from torch_mhc.models import moe as moe_module

    if not probed:
        monkeypatch.setattr(moe_module, "_GROUPED_MM_OK", {})
    else:
        assert grouped_mm_available(torch.device("cpu"), dtype)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    moe = random_moe(dim=32, dtype=dtype)
    x = torch.randn(40, 32, dtype=dtype)
    torch._dynamo.reset()
    try:
        y = torch.compile(moe, backend="eager", fullgraph=True)(x)
        y.float().sum().backward()
    finally:
        torch._dynamo.reset()
    assert bool(calls) == (probed and dtype == torch.bfloat16)
    moe.impl = "reference"
    ref = moe(x)
    tol = 0.02 if dtype == torch.bfloat16 else 1e-5  # bfloat16: a few units in the last place of the largest
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol * ref.abs().max().item())
