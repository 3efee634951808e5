import math
from pathlib import Path

import pytest
import torch

from torch_mhc import HyperConnection, ManifoldHyperConnection, Residual
from torch_mhc.models import DecoderLM, ModelConfig, MoE
from torch_mhc.train.config import build_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("connection", ["residual", "hc", "mhc"])
@pytest.mark.parametrize("merge", ["sum", "head"])
def test_shapes_and_backward(connection, merge):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=16, connection=connection, merge=merge)
    model = DecoderLM(cfg)
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 256)
    assert abs(loss.item() - math.log(256)) < 0.5  # near uniform at init
    loss.backward()
    kinds = {"residual": Residual, "hc": HyperConnection, "mhc": ManifoldHyperConnection}
    assert all(isinstance(c, kinds[connection]) for c in model.connections())
    assert len(model.connections()) == 4
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_modes_agree_at_init():
    """mHC and HC start as the Pre-Norm residual network (copied streams, mean merge)."""
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (2, 12))
    outs, reference = {}, None
    for connection in ("residual", "hc", "mhc"):
        cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=12, connection=connection, merge="mean",
                          mhc_eps=0.0, norm_eps=1e-12)
        model = DecoderLM(cfg).double()
        if reference is None:
            reference = model.state_dict()
        missing, unexpected = model.load_state_dict(reference, strict=False)  # same sublayer weights
        assert not unexpected and all(".sublayer." not in k for k in missing)
        outs[connection] = model(idx)[0]
    torch.testing.assert_close(outs["hc"], outs["residual"])
    torch.testing.assert_close(outs["mhc"], outs["residual"])


def test_causal():
    torch.manual_seed(3)
    model = DecoderLM(ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    idx = torch.randint(0, 256, (1, 16))
    a = model(idx)[0]
    idx2 = idx.clone()
    idx2[0, 10] = (idx2[0, 10] + 1) % 256
    b = model(idx2)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_moe_routing_and_bias_balancing():
    torch.manual_seed(4)
    moe = MoE(dim=16, n_routed=4, n_shared=1, top_k=2, expert_hidden=8, bias_rate=0.05)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        moe.router.weight[0] = 0.5  # with inputs of mean 1, expert 0 is chosen by every token
    x = torch.randn(256, 16) + 1
    idx, gates = moe.route(x)
    assert idx.shape == gates.shape == (256, 2)
    torch.testing.assert_close(gates.sum(-1), torch.ones(256))
    # output equals an explicit per-token computation
    out = moe(x)
    ref = moe.shared(x[5])
    for k in range(2):
        e = idx[5, k]
        h = x[5]
        ref = ref + gates[5, k] * ((torch.nn.functional.silu(h @ moe.w1[e]) * (h @ moe.w3[e])) @ moe.w2[e])
    torch.testing.assert_close(out[5], ref, rtol=1e-5, atol=1e-5)

    def imbalance():
        load = torch.bincount(moe.route(x)[0].flatten(), minlength=4).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    assert before == 2.0
    moe.train()
    for _ in range(60):
        moe(x)
        moe.update_bias()
    assert imbalance() < before
    assert moe.bias[0] < 0  # the over-loaded expert was pushed down


def test_moe_model_dense_first_layers():
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=2, max_seq_len=8, moe=True, n_routed_experts=4, top_k=2,
                      first_dense_layers=1)
    model = DecoderLM(cfg)
    assert len(model.moe_layers()) == 2
    assert not isinstance(model.blocks[0].ffn.sublayer.mlp, MoE)
    _, loss = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    loss.backward()


@pytest.mark.parametrize("name, billions", [("3b", 3), ("9b", 9), ("27b", 27)])
def test_paper_configs_on_meta(name, billions):
    cfg = build_config(config_file=str(REPO / "configs" / f"paper-{name}.toml"))
    assert cfg.model.n_streams == 4 and cfg.model.moe
    with torch.device("meta"):
        model = DecoderLM(cfg.model)
    count = model.num_params()
    assert abs(count / 1e9 - billions) / billions < 0.1, count


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 30, "n_heads": 4}, "divisible"), ({"n_streams": 0}, "n_streams"), ({"connection": "dense"}, "connection"),
     ({"moe": True, "top_k": 9, "n_routed_experts": 4}, "top_k"), ({"identity_gap": -2.0}, "identity_gap"),
     ({"phi_init_std": float("nan")}, "phi_init_std"), ({"bias_init": "eye"}, "bias_init")],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoderLM(ModelConfig(**kwargs))


def test_training_breaks_stream_symmetry():
    """With the identity bias init the copied streams stop being copies within a few steps, so H_res
    has something to mix. (With bias_init="zero" they stay copies for a long time: the gradient of
    H_res is zero while the streams are equal, and only the small per-token H_pre breaks the tie.)"""
    torch.manual_seed(5)
    model = DecoderLM(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, bias_init="identity"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (4, 16))
    for _ in range(5):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    streams = []
    model.blocks[-1].ffn.register_forward_hook(lambda m, i, o: streams.append(o.detach()))
    model(idx)
    spread = (streams[0] - streams[0].mean(-2, keepdim=True)).abs().max() / streams[0].abs().max()
    assert spread > 1e-3  # the streams are no longer copies of each other


INIT_CASES = [dict(), dict(variant="deepseek-v4", merge="head"), dict(connection="hc"), dict(moe=True, merge="head"),
              dict(connection="hc", moe=True), dict(connection="residual", tie_embeddings=True)]


@pytest.mark.parametrize("kw", INIT_CASES)
def test_meta_init_equals_eager(kw):
    """Built on meta, materialised with to_empty() and reset: the eager model, parameter for parameter and
    buffer for buffer (RoPE tables, MoE balancing state), hence the same logits."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=64, **kw)
    torch.manual_seed(7)
    eager = DecoderLM(cfg)
    torch.manual_seed(7)
    with torch.device("meta"):
        meta = DecoderLM(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for (name, a), (_, b) in zip(eager.named_parameters(), meta.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(eager.named_buffers(), meta.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(eager(idx)[0], meta(idx)[0])


@pytest.mark.parametrize("kw", INIT_CASES)
def test_reset_parameters_restores_construction(kw):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=64, **kw)
    torch.manual_seed(3)
    model = DecoderLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-5, 5)
    for moe in model.moe_layers():
        moe.bias.fill_(1.0)
    torch.manual_seed(3)
    model.reset_parameters()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_connection_reset_parameters_matches_construction():
    from torch_mhc.nn import HyperConnection, HyperHead, ManifoldHyperConnection

    for make in (lambda: ManifoldHyperConnection(16, 4, layer_index=5),
                 lambda: ManifoldHyperConnection(16, 2, variant="deepseek-v4", bias_init="zero", alpha_init=0.3),
                 lambda: HyperConnection(16, 4, layer_index=2), lambda: HyperConnection(16, 3, dynamic=False),
                 lambda: HyperHead(16, 4, scale_init=0.2)):
        torch.manual_seed(11)
        conn = make()
        built = {k: v.clone() for k, v in conn.state_dict().items()}
        with torch.no_grad():
            for p in conn.parameters():
                p.normal_()
        torch.manual_seed(11)
        conn.reset_parameters()
        for k, v in conn.state_dict().items():
            assert torch.equal(v, built[k]), (type(conn).__name__, k)


def test_paired_seeds_same_trunk_for_every_connection():
    """One seed gives every arm the same trunk (embedding, attention, FFN, norms, head): the connections draw
    from their own generator, after the trunk."""
    trunks, rng_after = [], _rng_after_init(5)
    for kw in (dict(connection="residual"), dict(connection="hc"), dict(), dict(n_streams=1),
               dict(variant="deepseek-v4", merge="head"), dict(learn=["pre", "post"])):
        torch.manual_seed(5)
        model = DecoderLM(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=64, **kw))
        roles = model.parameter_roles()
        trunks.append({k: v for k, v in model.named_parameters() if roles[k][0] != "connection"})
        assert torch.equal(torch.get_rng_state(), rng_after)  # and what follows draws the same numbers
    for other in trunks[1:]:
        assert other.keys() == trunks[0].keys()
        for k in other:
            assert torch.equal(other[k], trunks[0][k]), k
    torch.manual_seed(6)
    different = DecoderLM(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=64))
    assert not torch.equal(different.embed.weight, trunks[0]["embed.weight"])


def _rng_after_init(seed):
    """The global generator's state after building any model of the trunk shape above from ``seed``."""
    torch.manual_seed(seed)
    DecoderLM(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, vocab_size=64, connection="residual"))
    return torch.get_rng_state()
