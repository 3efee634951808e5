"""convert_to_mhc on tiny random Llama and Qwen3 models: equal logits at step 0, training moves the
connections and lowers the loss, save/load, mhc convert, mhc train --init-from, mhc export."""

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.10",
                                   reason="transformers >= 5.10 is not installed (pip install 'torch-mhc[hf]')")
pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install 'torch-mhc[hf]')")

from conftest import TINY  # noqa: E402
from torch_mhc.cli import main  # noqa: E402
from torch_mhc.integrations.convert import (  # noqa: E402
    convert_to_mhc,
    load_converted,
    mhc_connections,
    save_converted,
)
from torch_mhc.nn import ManifoldHyperConnection  # noqa: E402
from torch_mhc.train.config import UserError  # noqa: E402

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny(arch, seed=0, vocab=64, dtype=torch.float64):
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(seed)
    return model_cls(config).to(dtype)


def batch(vocab=64, seed=1):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_equal_at_step_zero(arch):
    original = tiny(arch)
    ids = batch()
    with torch.no_grad():
        ref = original(ids).logits
        converted = convert_to_mhc(copy.deepcopy(original), n=4)
        out = converted(ids).logits
        exact = convert_to_mhc(copy.deepcopy(original), n=3, eps=0.0)(ids).logits
    conns = mhc_connections(converted)
    assert len(conns) == 6 and all(isinstance(c, ManifoldHyperConnection) and c.n == 4 for c in conns)
    assert conns[0].phi.dtype == torch.float64  # fp64 model: fp64 connections (fp32 otherwise)
    # the Sinkhorn eps makes each row sum s / (s + eps): about 1e-6 relative per sublayer
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=1e-12)  # eps = 0: the residual network exactly
    assert not torch.equal(out, ref)  # the connections are really in the computation
    with torch.no_grad():
        conns[2].bias[4:8] += 1.0  # H_post = 2 sigmoid(1) != 1: the output must move
        assert (converted(ids).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_step_moves_connections_and_lowers_loss(arch):
    model = convert_to_mhc(tiny(arch, dtype=torch.float32), n=4)
    ids = batch()
    conn_params = {n: p for n, p in model.named_parameters() if "_mhc." in n}
    assert conn_params and all(p.dtype == torch.float32 for p in conn_params.values())
    before = {n: p.detach().clone() for n, p in conn_params.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss0 = model(ids, labels=ids).loss
    loss0.backward()
    assert all(conn_params[n].grad is not None for n in conn_params)
    opt.step()
    with torch.no_grad():
        loss1 = model(ids, labels=ids).loss
    assert loss1 < loss0
    for name in conn_params:
        if name.endswith((".phi", ".bias")):
            assert not torch.equal(conn_params[name], before[name]), name
    # the connections alone (plain SGD on their parameters only) also lower the loss
    model = convert_to_mhc(tiny(arch, dtype=torch.float32), n=4)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "_mhc." in n], lr=0.5)
    loss0 = model(ids, labels=ids).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss0


def test_save_load_and_generate(tmp_path):
    model = convert_to_mhc(tiny("qwen3"), n=4)
    with torch.no_grad():
        for c in mhc_connections(model):  # as if trained: values no initialisation reproduces
            c.phi.normal_(0, 0.1)
            c.bias.normal_(0, 1.0)
    ids = batch()
    save_converted(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["mhc_conversion"]["n"] == 4
    loaded = load_converted(tmp_path / "m", dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    gen = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)  # with the KV cache
    no_cache = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert gen.shape == (1, 10) and torch.equal(gen, no_cache)


def test_directory_identity_and_older_directories(tmp_path):
    """A converted directory says mhc_qwen3 / MhcQwen3ForCausalLM; one written before (qwen3 plus
    mhc_conversion) still loads through load_converted with its connections; one whose connection weights
    are missing is refused."""
    from safetensors.torch import load_file, save_file

    model = convert_to_mhc(tiny("qwen3"), n=2)
    with torch.no_grad():
        for c in mhc_connections(model):
            c.bias.normal_(0, 1.0)
    save_converted(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mhc_qwen3", ["MhcQwen3ForCausalLM"])
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])  # as written before
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    older = load_converted(tmp_path / "m", dtype=torch.float64)
    assert type(older).__name__ == "MhcQwen3ForCausalLM" and older.config.model_type == "mhc_qwen3"
    with torch.no_grad():
        torch.testing.assert_close(older(batch()).logits, model(batch()).logits, rtol=0, atol=0)
    save_converted(model, tmp_path / "cut")
    weights = load_file(tmp_path / "cut" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp_mhc" not in k}, tmp_path / "cut" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="lack 3 connection parameters"):
        load_converted(tmp_path / "cut")


def test_bad_inputs():
    with pytest.raises(ValueError, match="supports transformers models of type"):
        convert_to_mhc(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    with pytest.raises(ValueError, match="n >= 2"):
        convert_to_mhc(tiny("llama"), n=1)
    model = convert_to_mhc(tiny("llama"))
    with pytest.raises(ValueError, match="already converted"):
        convert_to_mhc(model)


def _byte_tokenizer_files(out_dir):
    from transformers import PreTrainedTokenizerFast

    from torch_mhc.integrations.export import byte_hf_tokenizer

    PreTrainedTokenizerFast(tokenizer_object=byte_hf_tokenizer()).save_pretrained(out_dir)


def test_cli_convert_train_init_from_and_export(tmp_path, small_text, capsys):
    hf_dir = tmp_path / "llama"
    original = tiny("llama", vocab=256, dtype=torch.float32)
    original.save_pretrained(hf_dir)
    _byte_tokenizer_files(hf_dir)
    assert main(["convert", str(hf_dir), str(tmp_path / "mhc"), "--streams", "2"]) == 0
    assert (tmp_path / "mhc" / "tokenizer.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "mhc").iterdir()} == {0o666 & ~mask}  # not safetensors' 0600
    ids = batch(256)
    converted = load_converted(tmp_path / "mhc")
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)
    args = ["train", "--init-from", str(tmp_path / "mhc"), "--set", f"data={small_text}",
            "--set", f"tokenizer={tmp_path / 'mhc'}", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "run_name=ft"]
    for item in TINY + ["steps=3", "lr=1e-3"]:
        if not item.startswith("model."):
            args += ["--set", item]
    assert main(args) == 0
    assert "bits per byte" in capsys.readouterr().out
    run = tmp_path / "runs" / "ft"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["init_from"] == str(tmp_path / "mhc") and cfg["model"]["n_streams"] == 2 and cfg["model"]["dim"] == 32
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"grad_norm_connection", "grad_norm_attn", "grad_norm_ffn", "grad_norm_embed"} <= record.keys()
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    assert main(["sample", str(run), "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert main(["export", str(run), str(tmp_path / "exported")]) == 0
    from torch_mhc.train.evaluate import load_run

    trained, _, _ = load_run(run, device="cpu")
    reloaded = load_converted(tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained.hf(ids).logits, rtol=0, atol=0)
        assert not torch.equal(reloaded(ids).logits, converted(ids).logits)  # training changed the model
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", str(hf_dir), str(tmp_path / "mhc")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["train", "--init-from", str(tmp_path / "missing"), "--set", f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "no config.json" in capsys.readouterr().err
