"""mhc export: transformers directory, from_pretrained and generate equal the native model, with
torch_mhc imported (registered classes) and without it (trust_remote_code, torch_mhc blocked)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers", minversion="5.10",
                    reason="transformers >= 5.10 is not installed (pip install 'torch-mhc[hf]')")
pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install 'torch-mhc[hf]')")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import torch_mhc.integrations  # noqa: E402,F401 - registers the auto classes
from conftest import REPO, TINY  # noqa: E402
from torch_mhc.cli import main  # noqa: E402
from torch_mhc.integrations.hf_model import TorchMhcForCausalLM  # noqa: E402
from torch_mhc.train.data import get_tokenizer  # noqa: E402
from torch_mhc.train.evaluate import load_run  # noqa: E402

VARIANTS = {
    "mhc-head-bpe": ["model.merge=head", "tokenizer=bpe:300", "model.vocab_size=300"],
    "hc-tied-byte": ["model.connection=hc", "model.tie_embeddings=true", "model.n_layers=2"],
}
SHORT = ["model.max_seq_len=16", "seq_len=16", "steps=3"]
NEW_TOKENS = 16  # 6 prompt + 16 new tokens run past max_seq_len=16: the window is cropped as in DecoderLM.generate


def _train_and_export(root, text, name):
    args = ["train", "--set", f"data={text}", "--set", f"out_dir={root}", "--set", f"run_name={name}"]
    for item in TINY + SHORT + VARIANTS[name]:
        args += ["--set", item]
    assert main(args) == 0
    assert main(["export", str(root / name), str(root / f"{name}-hf")]) == 0
    return root / name, root / f"{name}-hf"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("".join(p.read_text() for p in sorted((REPO / "src" / "torch_mhc").rglob("*.py"))))
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("runs")
    return {name: _train_and_export(root, text, name) for name in sorted(VARIANTS)}


def _prompt_and_native(run_dir, text):
    native, cfg, _ = load_run(run_dir, device="cpu")
    tok = get_tokenizer(cfg.tokenizer, cfg.data, run_dir.parent / "cache", cfg.val_fraction)
    ids = torch.as_tensor(tok.encode(text.read_text()[1000:1200]).astype("int64"))
    batch = torch.stack([ids[:12], ids[12:24]])
    with torch.no_grad():
        logits, _ = native(batch)
    greedy = native.generate(batch[:1, :6], NEW_TOKENS, temperature=0)
    return native, tok, batch, logits, greedy


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_round_trip_with_torch_mhc(exports, text, name):
    run_dir, out = exports[name]
    native, tok, batch, logits, greedy = _prompt_and_native(run_dir, text)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out)  # no remote code: registered by torch_mhc.integrations
    assert isinstance(model, TorchMhcForCausalLM)
    for (name, p), q in zip(model.model.state_dict().items(), native.state_dict().values()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        out_logits = model(batch).logits
    assert torch.equal(out_logits, logits)
    gen = model.generate(batch[:1, :6], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(gen, greedy)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x  # naïve\n"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text).tolist()
    assert hf_tok.decode(tok.encode(text).tolist()) == text
    labels_loss = model(batch, labels=batch).loss
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(labels_loss, ref)


REMOTE = textwrap.dedent("""
    import json, sys
    sys.modules["torch_mhc"] = None  # any import of torch_mhc now fails
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    jobs, results = json.loads(sys.argv[1]), {}
    for name, (out, batch, new_tokens) in jobs.items():
        batch = torch.tensor(batch)
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        with torch.no_grad():
            logits = model(batch).logits
        gen = model.generate(batch[:1, :6], max_new_tokens=new_tokens, do_sample=False)
        tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        results[name] = {"logits": logits, "gen": gen, "module": type(model).__module__,
                         "ids": tok.encode("def f(x):", add_special_tokens=False)}
    assert not any(m.startswith("torch_mhc") for m in sys.modules if sys.modules[m] is not None)
    torch.save(results, sys.argv[2])
""")


def test_export_round_trip_without_torch_mhc(exports, text, tmp_path):
    native = {name: _prompt_and_native(run_dir, text) for name, (run_dir, _) in exports.items()}
    jobs = {name: (str(out), native[name][2].tolist(), NEW_TOKENS) for name, (_, out) in exports.items()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    result = tmp_path / "remote.pt"
    proc = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(jobs), str(result)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result)
    for name, (_, tok, _, logits, greedy) in native.items():
        assert got[name]["module"].startswith("transformers_modules")
        assert torch.equal(got[name]["logits"], logits)
        assert torch.equal(got[name]["gen"], greedy)
        assert got[name]["ids"] == tok.encode("def f(x):").tolist()


def test_export_refuses_non_empty_output(exports, tmp_path, capsys):
    run_dir, out = exports["hc-tied-byte"]
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", str(run_dir), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "new")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", 
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "transformers" in err and "pip install 'torch-mhc[hf]'" in err


def test_byte_and_bpe_exports_have_end_and_pad_tokens(exports, text):
    """byte and bpe:VOCAB exports name eos <|endoftext|> and pad <|pad|> on bytes 0xFF / 0xFE (never in UTF-8
    text): the model's config and generation config carry their ids, and any text encodes as the run's
    tokenizer does, those bytes' neighbours included."""
    from torch_mhc.integrations.export import END_OF_TEXT, PAD

    sample = "def f(x):\n    return x  # naïve ÿ þ Ā \x00 \U0001f600\n"
    for name, (run_dir, out) in exports.items():
        native, tok = _prompt_and_native(run_dir, text)[:2]
        hf_tok = AutoTokenizer.from_pretrained(out)
        assert (hf_tok.eos_token, hf_tok.pad_token) == (END_OF_TEXT, PAD), name
        assert hf_tok.eos_token_id != hf_tok.pad_token_id
        if name.endswith("byte"):
            assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (0xFF, 0xFE)
        ids = hf_tok.encode(sample, add_special_tokens=False)
        assert ids == tok.encode(sample).tolist() and hf_tok.decode(ids) == sample, name
        assert hf_tok.eos_token_id not in ids and hf_tok.pad_token_id not in ids
        assert hf_tok.decode([*ids, hf_tok.eos_token_id], skip_special_tokens=True) == sample
        model = AutoModelForCausalLM.from_pretrained(out)
        for config in (model.config, model.generation_config):
            assert (config.eos_token_id, config.pad_token_id) == (hf_tok.eos_token_id, hf_tok.pad_token_id)


def test_export_model_card_and_permissions(exports):
    """README.md says what the model is, how it was trained (steps, tokens, the last losses of metrics.jsonl)
    and how to load it; every exported file is 0666 less the umask (0644 here), none the 0600 of temp files."""
    for name, (run_dir, out) in exports.items():
        card = (out / "README.md").read_text()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_train = [r for r in records if "loss" in r][-1]
        last_val = [r for r in records if "val_loss" in r][-1]
        assert f"steps: {last_train['step']:,} ({last_train['tokens']:,} tokens)" in card
        assert f"final training loss (step {last_train['step']:,}): {last_train['loss']:.4f} nats/token" in card
        assert f"final validation loss (step {last_val['step']:,}): {last_val['val_loss']:.4f} nats/token" in card
        connection = "hyper-connection (HC)" if name.startswith("hc") else "manifold-constrained"
        assert connection in card and "AutoModelForCausalLM.from_pretrained" in card
        assert "trust_remote_code=True" in card and '"connection"' in card
    mask = os.umask(0)
    os.umask(mask)
    for name, (_, out) in exports.items():
        assert out.stat().st_mode & 0o777 == 0o777 & ~mask
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert {"model.safetensors", "README.md", "tokenizer.json", "modeling_torch_mhc.py"} <= modes.keys()
        assert set(modes.values()) == {0o666 & ~mask}, (name, modes)


def _llama_with_tokenizer(hf_dir, tokenizer_config: bool):
    """A tiny Llama whose tokenizer has <s>, </s>, <unk>, <pad> (ids 256-259) after the 256 bytes."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    from torch_mhc.integrations.export import byte_hf_tokenizer

    backend = byte_hf_tokenizer()
    backend.add_special_tokens(["<s>", "</s>", "<unk>", "<pad>"])
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
                                      pad_token_id=259)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    roles = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    PreTrainedTokenizerFast(tokenizer_object=backend, **(roles if tokenizer_config else {})).save_pretrained(hf_dir)
    return roles


@pytest.mark.parametrize("where", ["tokenizer_config", "model_config"])
def test_converted_then_trained_export_keeps_special_tokens(tmp_path, text, where):
    """mhc convert -> mhc train --init-from -> mhc export: the tokenizer's bos/eos/pad/unk come through,
    from its tokenizer_config.json, or (without one) from the ids the model's config names."""
    roles = _llama_with_tokenizer(tmp_path / "llama", tokenizer_config=where == "tokenizer_config")
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "mhc"), "--streams", "2"]) == 0
    args = ["train", "--init-from", str(tmp_path / "mhc"), "--set", f"data={text}", "--set",
            f"tokenizer={tmp_path / 'mhc'}", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "run_name=ft"]
    for item in ["seq_len=16", "batch_size=2", "steps=2", "eval_every=2", "eval_batches=1", "log_every=1",
                 "ckpt_every=2", "diag_every=0", "warmup=1", "val_fraction=0.1"]:
        args += ["--set", item]
    assert main(args) == 0
    assert main(["export", str(tmp_path / "runs" / "ft"), str(tmp_path / "out")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    got = {r: getattr(hf_tok, r) for r in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if where == "model_config":  # the Llama config names bos, eos and pad ids; nothing names unk
        roles = {**roles, "unk_token": None}
    assert got == roles
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 259)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{tmp_path / 'mhc'}` (a transformers model converted to mHC with 2 residual streams)" in card
    assert "load_converted" in card


REMOTE_FEATURES = textwrap.dedent("""
    import sys
    sys.modules["torch_mhc"] = None  # any import of torch_mhc now fails
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    for out in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        cls, config = type(model), AutoConfig.from_pretrained(out, trust_remote_code=True)
        x = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))

        # meta build + to_empty (NaN) + init_weights == eager construction from one seed
        torch.manual_seed(3)
        eager = cls(config)
        torch.manual_seed(3)
        with torch.device("meta"):
            meta = cls(config)
        meta.to_empty(device="cpu")
        with torch.no_grad():
            for t in list(meta.parameters()) + list(meta.buffers()):
                t.fill_(float("nan"))
        meta.init_weights()
        want = dict(eager.named_buffers()) | eager.state_dict()
        got = dict(meta.named_buffers()) | meta.state_dict()
        assert got.keys() == want.keys()
        for k, v in got.items():
            assert torch.isfinite(v).all() and torch.equal(v, want[k]), k

        # gradient checkpointing: each attention again in backward, equal gradients
        model.train()
        calls = []
        for m in model.modules():
            if type(m).__name__ == "Attention":
                m.register_forward_pre_hook(lambda *_: calls.append(1))
        model(x, labels=x).loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        assert len(calls) == config.num_hidden_layers, len(calls)
        model.zero_grad()
        calls.clear()
        model.gradient_checkpointing_enable()
        model(x, labels=x).loss.backward()
        assert len(calls) == 2 * config.num_hidden_layers, len(calls)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-6, atol=1e-8)

        # save_pretrained / from_pretrained: exact
        model.eval().save_pretrained(sys.argv[1] + "/" + out.replace("/", "_"))
        again = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/" + out.replace("/", "_"),
                                                     trust_remote_code=True)
        assert type(again).__module__.startswith("transformers_modules")
        for k, v in (dict(model.named_buffers()) | model.state_dict()).items():
            assert torch.equal((dict(again.named_buffers()) | again.state_dict())[k], v), k
        with torch.no_grad():
            assert torch.equal(again(x).logits, model(x).logits)
        print("checked", type(model).__module__, config.num_hidden_layers)
    assert not any(m.startswith("torch_mhc") for m in sys.modules if sys.modules[m] is not None)
""")


def test_export_without_torch_mhc_init_weights_checkpointing_and_save(exports, tmp_path):
    """The exported code alone (trust_remote_code, torch_mhc blocked): a meta build + init_weights() equals
    eager construction, gradient checkpointing recomputes each attention with equal gradients, and
    save_pretrained/from_pretrained is exact."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    outs = [str(out) for _, out in exports.values()]
    proc = subprocess.run([sys.executable, "-c", REMOTE_FEATURES, str(tmp_path), *outs],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checked transformers_modules") == len(outs), proc.stdout
