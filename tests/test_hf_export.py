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
