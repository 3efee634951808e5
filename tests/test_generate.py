"""Generation with the KV cache: cached logits equal the full forward's (float64, random inputs, several layers,
MoE, the deepseek-v4 variant, the head merge, every connection), a left-padded batch equals each prompt alone,
greedy with the cache equals greedy without (also past max_seq_len), the exported transformers model through
``DynamicCache`` and ``attention_mask``, and ``mhc sample`` streaming its text."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from torch_mhc.models.decoder import DecoderLM, KVCache, ModelConfig

VOCAB = 61
MODELS = {  # init_std large enough that attention is far from uniform and the logits far apart
    "mhc": {},
    "hc": {"connection": "hc"},
    "residual": {"connection": "residual"},
    "mhc-moe": {"moe": True, "n_routed_experts": 4, "top_k": 2, "first_dense_layers": 1},
    "mhc-v4-head": {"variant": "deepseek-v4", "merge": "head"},
}


def make_model(name: str, dtype=torch.float64, max_seq_len: int = 40, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, max_seq_len=max_seq_len, init_std=0.25,
                      **MODELS[name])
    return DecoderLM(cfg).to(dtype).eval()


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention_mask [B, L]): each prompt right-aligned after ``pad`` tokens masked 0."""
    L = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((L - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.arange(L) >= L - len(p) for p in prompts]).long()
    return ids, mask


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_logits_equal_the_full_forward(name):
    """A prompt in pieces (6 tokens, then 5 at once against the cache, then one at a time) gives the logits of one
    forward over the whole sequence, float64. (MoE: 1e-6: its router gates are fp32, so a 1e-16 difference in a
    router input can move a gate by one fp32 ulp.)"""
    model = make_model(name)
    idx = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache()
        pieces = [model(idx[:, :6], cache=cache)[0], model(idx[:, 6:11], cache=cache)[0]]
        pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(11, 19)]
    assert cache.get_seq_length() == 19 and len(cache.keys) == 3
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-6 if "moe" in name else 1e-12)
    assert full.std() > 1  # logits far apart: a wrong position or mask moves them by far more than the tolerance


def test_several_new_queries_need_the_offset_mask():
    """Several new tokens against cached keys: each sees the cache and the new tokens up to itself. SDPA's own
    is_causal would align the queries with the first keys (the first query would see key 0 only)."""
    model = make_model("mhc")
    idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    attn = model.blocks[0].attn.sublayer
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x, model.rope_cos, model.rope_sin)
        cache = KVCache()
        cos, sin, kw = model.attention_inputs(8, cache, None, None)
        first = attn(x[:, :8], cos, sin, **kw)
        cos, sin, kw = model.attention_inputs(4, cache, None, None)
        rest = attn(x[:, 8:], cos, sin, **kw)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-12)
    assert idx.shape == (1, 12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_with_the_cache_equals_without(name):
    """Token for token, also past max_seq_len (5 + 40 > 24: the window is cropped and recomputed either way),
    and sampling draws the same tokens for one seed."""
    model = make_model(name, max_seq_len=24)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    seen = []
    cached = model.generate(prompt, 40, temperature=0, on_token=seen.append)
    assert torch.equal(cached, model.generate(prompt, 40, temperature=0, use_cache=False))
    assert torch.equal(torch.cat(seen, 1), cached[:, 5:])
    torch.manual_seed(7)
    sampled = model.generate(prompt, 20, temperature=1.0, top_k=10)
    torch.manual_seed(7)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=1.0, top_k=10, use_cache=False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mhc", "mhc-moe", "mhc-v4-head"])
def test_left_padded_batch_equals_each_prompt_alone(name, dtype):
    """Prompts of 11, 4 and 7 tokens, left-padded into one batch: each row's logits are the prompt's alone (pads
    neither attended nor counted in the positions), and (float32) greedy generation past max_seq_len gives each
    row the tokens it gets alone, with and without the cache."""
    model = make_model(name, dtype, max_seq_len=24)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (11, 4, 7)]
    ids, mask = left_padded(prompts, pad=3)
    L = ids.shape[1]
    atol = {torch.float64: 1e-6 if "moe" in name else 1e-12, torch.float32: 2e-5, torch.bfloat16: 0.1}[dtype]
    with torch.no_grad():
        batch, _ = model(ids, attention_mask=mask)
        for row, p in zip(batch, prompts):
            alone, _ = model(p[None])
            torch.testing.assert_close(row[L - len(p):], alone[0], rtol=0, atol=atol)
    if dtype != torch.float32:  # generation once, in the dtype users run on CPU
        return
    out = model.generate(ids, 30, temperature=0, attention_mask=mask)
    assert torch.equal(out, model.generate(ids, 30, temperature=0, attention_mask=mask, use_cache=False))
    for row, p in zip(out, prompts):
        assert torch.equal(row[L - len(p):], model.generate(p[None], 30, temperature=0)[0])


def test_cache_on_the_fused_kernels():
    """The fused path (Triton; the interpreter on a CPU), read-ahead between chained connections included: the
    cached pieces give the reference path's full logits, and greedy with the cache equals greedy without."""
    from torch_mhc import ops

    model = make_model("mhc", torch.float32, max_seq_len=16)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference, _ = model(idx)
        with ops.use_backend("triton"):
            cache = KVCache()
            pieces = [model(idx[:, :6], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in (6, 7, 8)]
            cached = model.generate(idx[:, :5], 4, temperature=0)
            assert torch.equal(cached, model.generate(idx[:, :5], 4, temperature=0, use_cache=False))
    torch.testing.assert_close(torch.cat(pieces, 1), reference, rtol=0, atol=2e-5)


def test_cached_forward_checks_its_inputs():
    model = make_model("mhc", max_seq_len=16)
    cache = KVCache()
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long) + 5, cache=cache)
        with pytest.raises(ValueError, match="attention_mask covers 3 tokens, but there are 10 cached and 2 new"):
            model(torch.ones(1, 2, dtype=torch.long), cache=cache, attention_mask=torch.ones(1, 3))
        with pytest.raises(ValueError, match="position 16 is past max_seq_len 16"):
            model(torch.ones(1, 7, dtype=torch.long), cache=cache)


def test_training_forward_takes_the_plain_path(monkeypatch):
    """Without cache, mask or positions the forward builds no mask and no position tables (the training path)."""
    model = make_model("mhc")
    monkeypatch.setattr(DecoderLM, "attention_inputs", lambda *a: pytest.fail("training forward built inputs"))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 9)))


# -- the exported transformers model ---------------------------------------------------------------------------

def hf_model(name: str, max_seq_len: int = 24):
    pytest.importorskip("transformers", minversion="5.10")
    import torch_mhc.integrations  # noqa: F401 - registers the auto classes
    from torch_mhc.integrations.hf_model import TorchMhcConfig, TorchMhcForCausalLM

    torch.manual_seed(0)
    cfg = TorchMhcConfig(mhc=dict(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, max_seq_len=max_seq_len,
                                  init_std=0.25, **MODELS[name]))
    return TorchMhcForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["mhc", "mhc-moe", "mhc-v4-head", "hc"])
def test_hf_generate_with_left_padding_and_cache(name):
    """transformers' generate on the exported model: with the cache == without; a left-padded batch == each prompt
    alone == DecoderLM.generate; 26 new tokens after 11 run past max_seq_len=24 (the window is recomputed)."""
    model = hf_model(name)
    pad = VOCAB - 1  # a pad id no prompt holds: generate would read any such token as padding
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB - 1, (n,), generator=g) for n in (11, 4, 7)]
    ids, mask = left_padded(prompts, pad)
    kw = dict(max_new_tokens=26, do_sample=False, pad_token_id=pad)
    cached = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **kw))
    L = ids.shape[1]
    for row, p in zip(cached, prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)[0]
        assert torch.equal(row[L - len(p):], alone)
        assert torch.equal(alone, model.model.generate(p[None], 26, temperature=0)[0])


def test_hf_beam_search_and_sampling_with_the_cache():
    """Beam search (transformers reorders the DynamicCache between steps) and seeded sampling on a left-padded
    batch give the same tokens with the cache as without; return_dict_in_generate hands back the cache."""
    model = hf_model("mhc-moe")
    g = torch.Generator().manual_seed(9)
    ids, mask = left_padded([torch.randint(0, VOCAB - 1, (n,), generator=g) for n in (11, 4)], VOCAB - 1)
    kw = dict(max_new_tokens=8, pad_token_id=VOCAB - 1, attention_mask=mask)
    beams = model.generate(ids, num_beams=3, do_sample=False, **kw)
    assert torch.equal(beams, model.generate(ids, num_beams=3, do_sample=False, use_cache=False, **kw))
    torch.manual_seed(1)
    sampled = model.generate(ids, do_sample=True, top_k=5, **kw)
    torch.manual_seed(1)
    assert torch.equal(sampled, model.generate(ids, do_sample=True, top_k=5, use_cache=False, **kw))
    out = model.generate(ids, do_sample=False, return_dict_in_generate=True, **kw)
    assert out.cache.get_seq_length() == ids.shape[1] + 8 - 1  # the last token is never run


def test_hf_forward_with_dynamic_cache():
    """forward(cache=DynamicCache, attention_mask) step by step == one forward over the padded sequence; the
    returned cache is the one passed, grown; use_cache=True makes one."""
    from transformers import DynamicCache

    model = hf_model("mhc-moe")
    g = torch.Generator().manual_seed(6)
    ids, mask = left_padded([torch.randint(0, VOCAB, (n,), generator=g) for n in (12, 5)], pad=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        cache, pieces = out.cache, [out.logits]
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 8
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)
            assert out.cache is cache
            pieces.append(out.logits)
        assert model(ids).cache is None  # no cache unless asked
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[keep], full[keep], rtol=0, atol=1e-5)


# -- mhc sample ------------------------------------------------------------------------------------------------

def test_sample_streams_the_cached_generation(tmp_path, capsys):
    """``mhc sample`` prints the text as it comes: its output is the prompt and the greedy continuation that the
    model gives without the cache, and ``sample_run`` hands it on in pieces that join to what it returns."""
    from torch_mhc.cli import main
    from torch_mhc.train.data import get_tokenizer
    from torch_mhc.train.evaluate import load_run, sample_run

    args = ["train", "--set", f"out_dir={tmp_path}", "--set", "run_name=r"]
    for item in TINY + ["model.n_layers=2"]:
        args += ["--set", item]
    assert main(args) == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "def ", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    pieces = []
    text = sample_run(str(run), "def ", 40, on_text=pieces.append)
    assert printed == text + "\n" and "".join(pieces) == text and len(pieces) > 5
    model, cfg, _ = load_run(run, device="cpu")
    tok = get_tokenizer(cfg.tokenizer, cfg.data, run.parent / "cache", cfg.val_fraction)
    prompt = torch.as_tensor(tok.encode("def ").astype("int64"))[None]
    assert text == tok.decode(model.generate(prompt, 40, temperature=0, use_cache=False)[0].tolist())


def test_text_stream_holds_back_an_incomplete_character():
    from torch_mhc.train.data import ByteTokenizer
    from torch_mhc.train.evaluate import TextStream

    pieces = []
    stream = TextStream(ByteTokenizer().decode, [], pieces.append)
    for b in "a€b".encode():  # € is three bytes
        stream.add(torch.tensor([[b]]))
    assert stream.finish() == "a€b" and pieces == ["a", "€", "b"]


def test_bench_generate_runs(tmp_path, monkeypatch):
    """bench/bench_generate.py runs (tiny model and contexts) and records both modes per context."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_generate.py"
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--contexts", "8", "20", "--new", "3", "--reps", "1", "--dim", "32",
                                      "--layers", "1", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(out.read_text())
    assert result["command"] and result["device"] and result["torch"]
    assert [r["context"] for r in result["rows"]] == [8, 20]
    assert all(set(r["ms_per_token"]) == {"cache", "none"} for r in result["rows"])
