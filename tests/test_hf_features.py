"""The transformers features that transformers' own model tests check, on the two models this project
changes inside transformers: DeepSeek-V4 patched by ``apply_mhc_kernels`` and a Llama converted by
``convert_to_mhc`` (written here, not copied): gradient checkpointing recomputes, a meta-device build +
``init_weights()`` initialises everything, batching and attention backends agree in fp32/fp16/bf16,
``save_pretrained``/``from_pretrained`` round trips, generation with and without the cache and with
left padding, and a converted directory that declares its own architecture. The exported torch-mhc model
(``TorchMhcForCausalLM``) takes the batching, round-trip and generation tests too.
"""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.10",
                                   reason="transformers >= 5.10 is not installed (pip install 'torch-mhc[hf]')")

from transformers.models.deepseek_v4 import modeling_deepseek_v4 as v4  # noqa: E402

from test_hf_deepseek_v4 import randomize_hc  # noqa: E402
from torch_mhc.integrations.convert import convert_to_mhc, mhc_connections  # noqa: E402
from torch_mhc.integrations.deepseek_v4 import DeepseekV4Connection, apply_mhc_kernels  # noqa: E402

VOCAB = 64


def v4_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4,
        n_shared_experts=1, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
        sliding_window=8, hc_mult=2, hc_sinkhorn_iters=5, max_position_embeddings=64,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], mlp_layer_types=["moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        rms_norm_eps=1e-5, hc_eps=1e-6,  # two eps, as transformers' own test config has
        experts_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return transformers.DeepseekV4Config(**kwargs)


def patched_v4(seed=0, **overrides):
    torch.manual_seed(seed)
    return apply_mhc_kernels(randomize_hc(transformers.DeepseekV4ForCausalLM(v4_config(**overrides)))).eval()


def llama_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def converted_llama(seed=0, n=2, **overrides):
    """A converted tiny Llama whose connections hold values no initialisation reproduces (as if trained)."""
    torch.manual_seed(seed)
    model = convert_to_mhc(transformers.LlamaForCausalLM(llama_config(**overrides)), n=n)
    with torch.no_grad():
        for c in mhc_connections(model):
            c.phi.normal_(0, 0.2)
            c.bias.normal_(0, 1.0)
            c.alpha.uniform_(0.5, 1.5)
    return model.eval()


def exported(seed=0):
    """The exported torch-mhc model (TorchMhcForCausalLM, what ``mhc export`` writes) over a tiny DecoderLM."""
    from torch_mhc.integrations.hf_model import TorchMhcConfig, TorchMhcForCausalLM

    torch.manual_seed(seed)
    config = TorchMhcConfig(mhc=dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=64, n_streams=2))
    return TorchMhcForCausalLM(config).eval()


MODELS = {"deepseek_v4": patched_v4, "converted_llama": converted_llama}
INFERENCE_MODELS = {**MODELS, "exported": exported}  # the exported model has its own checkpointing tests (end)


def ids(batch=2, length=10, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def attention_class(model):
    return v4.DeepseekV4Attention if isinstance(model, v4.DeepseekV4ForCausalLM) else \
        transformers.models.llama.modeling_llama.LlamaAttention


# --- gradient checkpointing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes(name, use_reentrant):
    """With checkpointing every attention runs twice (forward, and again in the backward), without it once;
    gradients equal."""
    model = MODELS[name]().float().train()
    calls = []
    for m in model.modules():
        if isinstance(m, attention_class(model)):
            m.register_forward_pre_hook(lambda *_: calls.append(1))
    x = ids()
    layers = model.config.num_hidden_layers

    model(x, labels=x).loss.backward()
    assert len(calls) == layers
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    calls.clear()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(x, labels=x).loss.backward()
    assert len(calls) == 2 * layers
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    hc = [k for k in grads if "_mhc." in k or "_hc." in k]
    assert len(hc) >= 3 * 2 * layers and all(grads[k].abs().sum() > 0 for k in hc)

    calls.clear()
    model.gradient_checkpointing_disable()
    model(x, labels=x).loss.backward()
    assert len(calls) == layers


# --- init_weights -----------------------------------------------------------------------------------------------


def _materialised_on_cpu(model):
    model.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty leaves is arbitrary: make it NaN so that anything not initialised shows
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
    return model


def test_v4_meta_build_and_init_weights_equal_transformers_init():
    """Meta build, patch, to_empty, init_weights: nothing NaN, and every parameter and buffer equal to
    transformers' own init of the unpatched model from the same seed (the patched modules draw the same)."""
    config = v4_config()
    built = []
    for patch in (False, True):
        with torch.device("meta"):
            model = transformers.DeepseekV4ForCausalLM(config)
        if patch:
            apply_mhc_kernels(model)
        _materialised_on_cpu(model)
        torch.manual_seed(5)
        model.init_weights()
        built.append(model)
    plain, patched = built
    assert isinstance(patched.model.layers[0].attn_hc, DeepseekV4Connection)
    state, ref = patched.state_dict(), plain.state_dict()
    assert state.keys() == ref.keys()
    for k, v in state.items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
        assert torch.equal(v, ref[k]), k
    layer = patched.model.layers[1]
    assert torch.equal(layer.ffn_hc.base, torch.zeros(2 * 2 + 4)) and torch.equal(layer.ffn_hc.scale, torch.ones(3))
    assert 0.01 < layer.attn_hc.fn.std() < 0.03  # N(0, initializer_range^2)


def test_converted_meta_build_and_init_weights_is_the_residual_network():
    """Meta build, convert, to_empty, init_weights: nothing NaN, the connections equal what construction
    gives on their deterministic parts (biases, alpha, zero columns), and the model computes the Llama made
    of the same weights (the conversion's residual init; up to the Sinkhorn eps)."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config())
    convert_to_mhc(model, n=4)
    _materialised_on_cpu(model)
    torch.manual_seed(5)
    model.init_weights()
    for k, v in model.state_dict().items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
    torch.manual_seed(0)
    eager = convert_to_mhc(transformers.LlamaForCausalLM(llama_config()), n=4)
    for got, want in zip(mhc_connections(model), mhc_connections(eager)):
        assert got.bias.dtype == torch.float32
        assert torch.equal(got.bias, want.bias) and torch.equal(got.alpha, want.alpha)
        assert torch.equal(got.phi[:, : 2 * 4] == 0, want.phi[:, : 2 * 4] == 0)
        assert got.phi[:, 2 * 4 :].std() > 0
    plain = transformers.LlamaForCausalLM(llama_config()).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_mhc." not in k})
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids()).logits, plain(ids()).logits, rtol=1e-4, atol=1e-4)


# --- batching and dtypes ----------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative to the logits' scale


def _close(got, want, dtype, what):
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"{what}: max error {err:.3g} of the logits' scale in {dtype}"


@pytest.mark.parametrize("name", sorted(INFERENCE_MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_equals_each_row_alone(name, dtype):
    """A batch's logits equal each row's alone; in fp16/bf16 also equal the fp32 model's within rounding."""
    model = INFERENCE_MODELS[name]()
    full = copy.deepcopy(model).float()
    model = model.to(dtype)
    x = ids(batch=3)
    with torch.no_grad():
        batched = model(x).logits
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(3)])
        reference = full(x).logits
    assert batched.dtype == dtype and torch.isfinite(batched).all()
    _close(batched, alone, dtype if dtype != torch.float32 else torch.float32, "batch vs alone")
    if dtype != torch.float32:  # 8x the rounding of the batch comparison: the whole model in low precision
        err = (batched.float() - reference).abs().max() / reference.abs().max().clamp_min(1.0)
        assert err <= 8 * TOLERANCE[dtype], f"{dtype} vs fp32: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_converted_eager_and_sdpa_attention_agree_with_padding(dtype):
    """The converted Llama on a left-padded batch: eager and SDPA attention give the same logits on the real
    tokens, in fp32/fp16/bf16 (DeepSeek-V4 supports eager attention only, so it has no such pair)."""
    model = converted_llama().to(dtype)
    x = ids(batch=3)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :6] = 0
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            results[implementation] = model(x, attention_mask=mask).logits
    real = mask.bool()
    _close(results["sdpa"][real], results["eager"][real], dtype, "sdpa vs eager")


# --- save_pretrained / from_pretrained --------------------------------------------------------------------------


def test_v4_save_and_load_round_trip(tmp_path):
    model = patched_v4()
    model.save_pretrained(tmp_path / "v4")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v4", local_files_only=True,
                                                               experts_implementation="eager")  # not saved
    assert type(loaded) is transformers.DeepseekV4ForCausalLM  # the directory is a plain V4: patch it again
    apply_mhc_kernels(loaded.eval())
    assert_same_model(loaded, model)


def assert_same_model(loaded, model):
    """Every tensor of the state dict and the logits on fresh ids bit-identical."""
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_converted_save_and_load_round_trip(tmp_path):
    """A converted model's directory loads as itself with a plain AutoModelForCausalLM (torch_mhc imported):
    exact weights and logits; loaded in bf16 the connections stay fp32."""
    model = converted_llama()
    model.save_pretrained(tmp_path / "m")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    assert type(loaded).__name__ == "MhcLlamaForCausalLM" and isinstance(loaded, transformers.LlamaForCausalLM)
    assert loaded.config.model_type == "mhc_llama" and type(loaded.model.layers[0]).__name__ == "MhcLlamaDecoderLayer"
    assert_same_model(loaded, model)
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True,
                                                             dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for c in mhc_connections(half) for p in c.parameters())
    assert all(torch.equal(p, model.get_parameter(k)) for k, p in half.named_parameters() if "_mhc." in k)


def test_exported_save_and_load_round_trip(tmp_path):
    model = exported()
    model.save_pretrained(tmp_path / "e")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", local_files_only=True).eval()
    assert type(loaded) is type(model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# --- generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(INFERENCE_MODELS))
def test_greedy_generation_with_and_without_cache(name):
    model = INFERENCE_MODELS[name]()
    prompt = ids(batch=2, length=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 13) and torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["converted_llama", "exported"])
def test_left_padded_batch_generates_as_each_prompt_alone(name):
    model = INFERENCE_MODELS[name]()
    prompts = [ids(batch=1, length=7, seed=3)[0], ids(batch=1, length=4, seed=4)[0]]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 7 - len(p) :], mask[i, 7 - len(p) :] = p, 1
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # no stop at eos
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(together[i, 7 - len(p) :], alone[0]), i


def test_v4_left_padded_generation_equals_transformers():
    """DeepSeek-V4 itself does not generate a left-padded prompt as it generates it alone (its compressor
    pools windows of tokens before the mask applies; transformers skips its own left-padding test for this
    reason), so the patched model is held to transformers' model: the same tokens from the same padded batch."""
    torch.manual_seed(0)
    reference = randomize_hc(transformers.DeepseekV4ForCausalLM(v4_config())).eval()
    patched = apply_mhc_kernels(copy.deepcopy(reference))
    x = ids(batch=2, length=8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(x, **kwargs), reference.generate(x, **kwargs))


# --- a converted directory declares what it is --------------------------------------------------------------------


def _plain_load(path, *, import_torch_mhc: bool):
    """AutoModelForCausalLM.from_pretrained(path) in a fresh interpreter; returns the process."""
    code = ("import sys, transformers\n"
            + ("import torch_mhc.integrations\n" if import_torch_mhc else "")
            + "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)\n"
              "print(type(m).__name__, sum(1 for k in m.state_dict() if '_mhc.' in k))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_converted_directory_declares_its_architecture(tmp_path):
    """config.json says mhc_llama / MhcLlamaForCausalLM, not llama: without torch_mhc a plain loader refuses
    (transformers does not know the type) instead of loading a Llama without its connections; with torch_mhc
    imported it builds the converted model, the 3 parameters of each of the 2 x 2 connections loaded.
    No code ships in the directory."""
    import json

    converted_llama().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mhc_llama" and config["architectures"] == ["MhcLlamaForCausalLM"]
    assert "auto_map" not in config and not list((tmp_path / "m").glob("*.py"))
    refused = _plain_load(tmp_path / "m", import_torch_mhc=False)
    assert refused.returncode != 0 and "mhc_llama" in refused.stderr, refused.stderr[-2000:]
    built = _plain_load(tmp_path / "m", import_torch_mhc=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert built.stdout.split() == ["MhcLlamaForCausalLM", str(2 * 2 * 3)]


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=2, num_return_sequences=2),
    "sample": dict(do_sample=True, top_k=8, temperature=0.7),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
@pytest.mark.parametrize("use_cache", [True, False])
def test_v4_generation_modes_equal_transformers(mode, use_cache):
    """generate() of the patched model equals transformers' model in greedy, beam and (seeded) sampling modes,
    with and without the cache: the same tokens, and the scores, hidden states and attentions that
    return_dict_in_generate hands back agree to fp32 rounding."""
    torch.manual_seed(0)
    reference = randomize_hc(transformers.DeepseekV4ForCausalLM(v4_config())).eval()
    patched = apply_mhc_kernels(copy.deepcopy(reference))
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, pad_token_id=0, use_cache=use_cache, return_dict_in_generate=True,
                  output_scores=True, output_hidden_states=True, output_attentions=True, **GENERATION_MODES[mode])
    outs = []
    for model in (reference, patched):
        torch.manual_seed(7)
        outs.append(model.generate(ids(batch=2, length=6), **kwargs))
    ref, out = outs
    assert torch.equal(out.sequences, ref.sequences)
    for s, r in zip(out.scores, ref.scores):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-5)
    hidden = [h for step in out.hidden_states for h in step]
    assert len(hidden) == 5 * 3 and hidden[1].shape[-2:] == (2, 32)  # per step: embeddings + 2 layers' streams
    for h, r in zip(hidden, [h for step in ref.hidden_states for h in step]):
        torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-5)
    for a, r in zip([a for step in out.attentions for a in step], [a for step in ref.attentions for a in step]):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_converted_generation_modes_equal_the_original(mode):
    """The residual init makes the converted model the original Llama (up to the Sinkhorn eps, ~1e-6 relative
    in the logits): generate() gives the original's tokens in greedy, beam and (seeded) sampling modes."""
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(llama_config()).eval()
    converted = convert_to_mhc(copy.deepcopy(original), n=4)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **GENERATION_MODES[mode])
    outs = []
    for model in (original, converted):
        torch.manual_seed(7)
        outs.append(model.generate(ids(batch=2, length=6), **kwargs))
    assert torch.equal(outs[1], outs[0])


# --- the exported model: init_weights, gradient checkpointing, round trip ------------------------------------------


def exported_config(**overrides):
    """Three blocks, MoE after the first, the learned head merge: the parts whose init draws differ."""
    from torch_mhc.integrations.hf_model import TorchMhcConfig

    mhc = dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, max_seq_len=64, n_streams=4, merge="head", moe=True,
               n_routed_experts=4, top_k=2, first_dense_layers=1)
    mhc.update(overrides)
    return TorchMhcConfig(mhc=mhc)


@pytest.mark.parametrize("overrides", [{}, {"connection": "hc", "tie_embeddings": True}], ids=["mhc-moe", "hc-tied"])
def test_exported_meta_build_and_init_weights_equal_eager_construction(overrides):
    """Meta build, to_empty (NaN), init_weights: nothing NaN, and every parameter and buffer (the rotary tables,
    the MoE routing bias) equal to eager construction from the same seed. Parameters flagged as loaded
    (``_is_hf_initialized``, as from_pretrained flags them) keep their values; the rest are still initialised."""
    from torch_mhc.integrations.hf_model import TorchMhcForCausalLM

    config = exported_config(**overrides)
    torch.manual_seed(4)
    eager = TorchMhcForCausalLM(config)
    want = dict(eager.named_buffers()) | eager.state_dict()

    def meta_built(loaded=()):
        torch.manual_seed(4)
        with torch.device("meta"):
            model = TorchMhcForCausalLM(config)
        _materialised_on_cpu(model)
        with torch.no_grad():
            for name in loaded:
                p = model.get_parameter(name)
                p.copy_(torch.arange(p.numel()).view_as(p) / p.numel())
                p._is_hf_initialized = True
        model.init_weights()
        return model

    model = meta_built()
    got = dict(model.named_buffers()) | model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
        assert torch.equal(v, want[k]), k
    assert model.model.blocks[1].ffn.sublayer.mlp.bias.abs().sum() == 0  # MoE routing bias, as constructed
    assert (model.model.lm_head.weight is model.model.embed.weight) == config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, eager.eval()(x).logits)

    loaded = ["model.blocks.1.attn.phi" if config.mhc["connection"] == "mhc" else "model.blocks.1.attn.w_pre",
              "model.blocks.2.ffn.sublayer.norm.weight", "model.embed.weight"]
    partly = meta_built(loaded)
    for k, v in partly.state_dict().items():
        if k in loaded:
            assert torch.equal(v, torch.arange(v.numel()).view_as(v) / v.numel()), k
        else:
            assert not v.is_floating_point() or torch.isfinite(v).all(), k
    assert partly.model.blocks[0].attn.sublayer.qkv.weight.std() > 0.01


def _attention_calls(model):
    from torch_mhc.models.decoder import Attention

    calls = []
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_exported_gradient_checkpointing_recomputes(use_reentrant, every_n_layers):
    """gradient_checkpointing_enable(): each checkpointed block's attention runs again in backward (3 blocks:
    6 calls, or 5 with every_n_layers=2 (blocks 0 and 2)), gradients equal to the plain backward's, the
    parameter names unchanged; eval and disable run each attention once."""
    from torch_mhc.integrations.hf_model import TorchMhcForCausalLM

    torch.manual_seed(0)
    model = TorchMhcForCausalLM(exported_config()).train()
    calls = _attention_calls(model)
    x = ids()
    layers = model.config.num_hidden_layers
    keys = list(model.state_dict())

    model(x, labels=x).loss.backward()
    assert len(calls) == layers
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert any("phi" in k for k in grads) and any("head_merge" in k for k in grads)

    model.zero_grad()
    calls.clear()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
                                        every_n_layers=every_n_layers)
    assert [b.gradient_checkpointing for b in model.model.blocks] == [i % every_n_layers == 0 for i in range(layers)]
    assert model.is_activation_checkpointing and list(model.state_dict()) == keys
    model(x, attention_mask=torch.ones_like(x), labels=x, use_cache=True).loss.backward()  # the Trainer's call
    assert len(calls) == layers + len(range(0, layers, every_n_layers))
    assert grads.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-6, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")

    calls.clear()
    model.eval()
    with torch.no_grad():
        out = model.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 3 * layers and out.shape == (1, 7)

    calls.clear()
    model.train().gradient_checkpointing_disable()
    assert type(model.model.blocks[0]).__name__ == "Block" and not model.is_activation_checkpointing
    model(x, labels=x).loss.backward()
    assert len(calls) == layers


def test_exported_rich_save_and_load_round_trip(tmp_path):
    """MoE, head merge, tied embeddings: from_pretrained gives the saved tensors exactly (its init_weights leaves
    loaded tensors alone) and recomputes the rotary tables, which are not saved; also after checkpointing."""
    from torch_mhc.integrations.hf_model import TorchMhcForCausalLM

    torch.manual_seed(2)
    model = TorchMhcForCausalLM(exported_config(tie_embeddings=True))
    with torch.no_grad():  # values no initialisation reproduces
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.model.blocks[2].ffn.sublayer.mlp.bias.normal_()
    model.gradient_checkpointing_enable()
    model.save_pretrained(tmp_path / "e")
    torch.manual_seed(9)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e", local_files_only=True).eval()
    assert type(loaded) is TorchMhcForCausalLM
    for k, v in (dict(model.named_buffers()) | model.state_dict()).items():
        assert torch.equal((dict(loaded.named_buffers()) | loaded.state_dict())[k], v), k
    assert loaded.model.lm_head.weight is loaded.model.embed.weight
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_exported_gradient_checkpointing_on_the_fused_kernels(monkeypatch):
    """On the fused path (Triton; the interpreter on a CPU), where each connection's post computes its next
    reader's GEMM ahead and, in the trainer's ``chained_backward`` scope, sums its reader's gradient terms:
    checkpointed blocks' gradients equal the plain fused backward's, twice in a row, and the reference path's.
    The read-ahead is not chained across a checkpointed block's boundary (as ``mhc train``'s checkpointing), so
    the recompute computes what the forward did: each block's first read launches its own coefficient GEMM, in
    the forward and again in the recompute (the plain forward launches one for the whole chain)."""
    from conftest import CountLaunches
    from torch_mhc import ops
    from torch_mhc.integrations.hf_model import TorchMhcForCausalLM
    from torch_mhc.nn.connections import chained_backward
    from torch_mhc.ops import coefficients

    torch.manual_seed(0)
    model = TorchMhcForCausalLM(exported_config(moe=False, merge="sum")).train()
    x = ids(length=8)

    def grads():
        model.zero_grad()
        with chained_backward():
            loss = model(x, labels=x).loss
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    reference = grads()
    gemm = CountLaunches(coefficients._gemm_fwd)
    monkeypatch.setattr(coefficients, "_gemm_fwd", gemm)
    with ops.use_backend("triton"):
        fused = grads()
        assert gemm.launches == 1
        model.gradient_checkpointing_enable()
        checkpointed = [grads(), grads()]
        assert gemm.launches == 1 + 2 * (3 + 3)
        model.gradient_checkpointing_disable()
        again = grads()
    for k, want in fused.items():
        for got in checkpointed + [again]:
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
        torch.testing.assert_close(want, reference[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
