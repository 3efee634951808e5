"""apply_mhc_kernels on transformers' DeepSeek-V4: outputs and every gradient equal transformers'
own modules in float64 (both hyper-connection sites of every layer and the head).

transformers' V4 code casts to fp32 with ``.float()`` (inside the connections and elsewhere), which
would turn a float64 comparison into an fp32 one; the ``float64_kept`` fixture makes ``.float()``
leave float64 tensors as they are, for both models alike, so the comparison measures the math.
"""

import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.10",
                                   reason="transformers >= 5.10 is not installed (pip install 'torch-mhc[hf]')")

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4  # noqa: E402

from torch_mhc.integrations.deepseek_v4 import DeepseekV4HyperHead, apply_mhc_kernels, connection_from_v4  # noqa: E402
from torch_mhc.nn import ManifoldHyperConnection  # noqa: E402


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        sliding_window=8, hc_mult=4, hc_sinkhorn_iters=20, max_position_embeddings=64,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        experts_implementation="eager",  # grouped_mm has no float64
    )
    kwargs.update(overrides)
    return transformers.DeepseekV4Config(**kwargs)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_hc(transformers.DeepseekV4ForCausalLM(tiny_config(**overrides)).double())


def randomize_hc(model):
    """Fresh random hyper-connection parameters (V4 initialises base at 0 and scale at 1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("hc.fn", "hc_fn")):
                p.normal_(0, 0.3)
            elif name.endswith(("hc.base", "hc_base")):
                p.normal_(0, 1.0)
            elif name.endswith(("hc.scale", "hc_scale")):
                p.uniform_(0.5, 1.5)
    return model


def test_patch_keeps_parameters_names_and_dtypes():
    model = tiny_model()
    before = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    fn = model.model.layers[0].attn_hc.fn
    assert apply_mhc_kernels(model) is model
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == before
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters())  # the same objects: optimizers still hold them
    layer = model.model.layers[0]
    assert isinstance(layer.attn_hc, ManifoldHyperConnection) and isinstance(layer.ffn_hc, ManifoldHyperConnection)
    assert layer.attn_hc.fn is fn and layer.attn_hc.variant == "deepseek-v4" and layer.attn_hc.sinkhorn_iters == 20
    assert isinstance(model.model.hc_head, DeepseekV4HyperHead)
    apply_mhc_kernels(model)  # idempotent
    assert model.model.layers[0].attn_hc is layer.attn_hc
    fp32 = tiny_model().float()
    apply_mhc_kernels(fp32)
    assert fp32.model.layers[1].ffn_hc.base.dtype == torch.float32


@pytest.fixture
def float64_kept(monkeypatch):
    original = torch.Tensor.float

    def keep(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", keep)


def test_outputs_and_all_gradients_equal_transformers_float64(float64_kept):
    reference = tiny_model()
    patched = apply_mhc_kernels(copy.deepcopy(reference))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (reference, patched):
        out = model(ids, labels=ids, output_hidden_states=True)
        out.loss.backward()
        results.append((out, {k: p.grad for k, p in model.named_parameters()}))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-12, atol=0)
    for h, ref_h in zip(out.hidden_states, ref_out.hidden_states):  # every layer's streams
        torch.testing.assert_close(h, ref_h, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    checked = 0
    for name, ref_g in ref_grads.items():
        if ref_g is None:
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(grads[name], ref_g, rtol=1e-8, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        checked += 1
    hc_names = [n for n in ref_grads if ".attn_hc." in n or ".ffn_hc." in n or "hc_head." in n]
    assert len(hc_names) == 3 * 2 * 2 + 3 and all(ref_grads[n].abs().sum() > 0 for n in hc_names)
    assert checked > len(hc_names)


def test_each_site_against_its_transformers_module(float64_kept):
    config = tiny_config()
    torch.manual_seed(3)
    hc = v4.DeepseekV4HyperConnection(config).double()
    head = v4.DeepseekV4HyperHead(config).double()
    with torch.no_grad():
        for p in (hc.fn, hc.base, head.hc_fn, head.hc_base):
            p.normal_(0, 0.5)
        hc.scale.uniform_(0.5, 1.5)
        head.hc_scale.uniform_(0.5, 1.5)
    streams = torch.randn(2, 5, 4, 32, dtype=torch.float64, requires_grad=True)
    f_out = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 4, 32, dtype=torch.float64)
    # a hyper-connection site: collapse, then expand + mix (as DeepseekV4DecoderLayer uses it)
    post, comb, collapsed = hc(streams)
    ref = post.unsqueeze(-1) * f_out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)
    conn = connection_from_v4(hc, config)
    x, state = conn.pre(streams)
    got = conn.post(state, f_out)
    torch.testing.assert_close(x, collapsed, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    inputs = [streams, f_out, hc.fn, hc.base, hc.scale]
    grads_ref = torch.autograd.grad((ref * weights).sum() + collapsed.square().sum(), inputs)
    grads = torch.autograd.grad((got * weights).sum() + x.square().sum(), inputs)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    # the head merge
    ours = DeepseekV4HyperHead(head)
    torch.testing.assert_close(ours(streams), head(streams), rtol=1e-12, atol=1e-13)
    inputs = [streams, head.hc_fn, head.hc_base, head.hc_scale]
    for g, r in zip(torch.autograd.grad((ours(streams) * weights[..., 0, :]).sum(), inputs),
                    torch.autograd.grad((head(streams) * weights[..., 0, :]).sum(), inputs)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_rejects_other_models():
    with pytest.raises(ValueError, match="DeepSeek-V4"):
        apply_mhc_kernels(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("rms_norm_eps", [1e-2, 1e-9])
def test_norm_eps_different_from_hc_eps(float64_kept, rms_norm_eps):
    """rms_norm_eps (the norm inside the connections and the head) != hc_eps (H_pre, Sinkhorn): the
    patched model equals transformers' in float64, logits and every hyper-connection gradient. The eps
    are far apart so that using the wrong one would show (1e-2 moves the logits by ~1e-3)."""
    reference = tiny_model(rms_norm_eps=rms_norm_eps, hc_eps=1e-4)
    patched = apply_mhc_kernels(copy.deepcopy(reference))
    assert patched.model.layers[0].attn_hc.norm_eps == rms_norm_eps and patched.model.layers[0].attn_hc.eps == 1e-4
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (reference, patched):
        out = model(ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(patched.named_parameters(), reference.parameters()):
        if "hc" in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    same_eps = apply_mhc_kernels(tiny_model(rms_norm_eps=1e-4, hc_eps=1e-4))  # the wrong eps would be visible
    same_eps.load_state_dict(reference.state_dict())
    assert (same_eps(ids).logits - outs[0].logits).abs().max() > 1e-9


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("layers", [1, 2])
def test_fused_kernels_inside_deepseek_v4(monkeypatch, layers):
    """The Triton path (interpreted on CPU) inside the patched model matches the reference path; each layer's
    attention post hands its FFN read the read-ahead, so only each layer's first read launches the coefficient GEMM
    (transformers' loop hands the next layer only the streams)."""
    from torch_mhc import ops
    from torch_mhc.ops import coefficients

    torch.manual_seed(0)
    config = tiny_config() if layers == 2 else tiny_config(
        num_hidden_layers=1, layer_types=["heavily_compressed_attention"], mlp_layer_types=["moe"])
    fused = apply_mhc_kernels(transformers.DeepseekV4ForCausalLM(config))
    reference = copy.deepcopy(fused)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    gemm, launches = coefficients._gemm_fwd, []
    monkeypatch.setattr(coefficients, "_gemm_fwd", type("Count", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or gemm[grid]})())
    with ops.use_backend("triton"):
        out = fused(ids, labels=ids)
        out.loss.backward()
    assert len(launches) == layers
    ref = reference(ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        if "hc" in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
