"""Tokenizers through the ``tokenizers`` library: bpe:VOCAB training and caching, PATH loading, bits per byte."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install 'torch-mhc[hf]')")

from torch_mhc.cli import main  # noqa: E402
from torch_mhc.train.config import UserError, build_config  # noqa: E402
from torch_mhc.train.data import ByteTokenizer, TokenData, bytes_per_token, get_tokenizer, load_tokens  # noqa: E402
from torch_mhc.train.trainer import evaluate  # noqa: E402


def test_bpe_training_is_deterministic_and_lossless(small_text, tmp_path):
    a = get_tokenizer("bpe:400", str(small_text), tmp_path / "c1", 0.1)
    b = get_tokenizer("bpe:400", str(small_text), tmp_path / "c2", 0.1)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.vocab_size == 400 and a.dtype == np.uint16
    text = small_text.read_text()
    ids = a.encode(text)
    assert ids.size < 0.7 * len(text.encode())  # merges were learned
    assert a.decode(ids) == text


def test_bpe_cache_reused_and_keyed_by_corpus_and_vocab(small_text, tmp_path):
    cache = tmp_path / "cache"
    first = get_tokenizer("bpe:300", str(small_text), cache, 0.1)
    mtime = first.path.stat().st_mtime_ns
    again = get_tokenizer("bpe:300", str(small_text), cache, 0.1)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    other_vocab = get_tokenizer("bpe:320", str(small_text), cache, 0.1)
    assert other_vocab.path != first.path and other_vocab.vocab_size == 320
    small_text.write_text(small_text.read_text() + "\nclass Changed:\n    pass\n")
    changed = get_tokenizer("bpe:300", str(small_text), cache, 0.1)
    assert changed.path != first.path
    assert len(list(cache.glob("bpe-*/tokenizer.json"))) == 3


def test_bpe_trains_only_on_the_training_part(tmp_path):
    train_text = "abc def ghi " * 400
    val_text = "zzzzqqqq " * 400  # 3600 of 8400 characters: inside the last half, no merge may hold z or q
    path = tmp_path / "t.txt"
    path.write_text(train_text + val_text)
    tok = get_tokenizer("bpe:300", str(path), tmp_path / "c", 0.5)
    merged = [t for t in tok._tok.get_vocab() if len(t) > 1]
    assert merged and not any("z" in t or "q" in t for t in merged)


def test_token_cache_keyed_by_tokenizer_content(small_text, tmp_path):
    cache = tmp_path / "cache"
    t300, m300 = load_tokens(str(small_text), get_tokenizer("bpe:300", str(small_text), cache, 0.1), cache)
    t320, m320 = load_tokens(str(small_text), get_tokenizer("bpe:320", str(small_text), cache, 0.1), cache)
    assert not m300["cached"] and not m320["cached"] and t300.size != t320.size
    _, again = load_tokens(str(small_text), get_tokenizer("bpe:300", str(small_text), cache, 0.1), cache)
    assert again["cached"]


class _Uniform(torch.nn.Module):
    """Logits all zero: loss ln(V) nats per token, whatever the tokenizer."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        logits = torch.zeros(*x.shape, self.vocab) + 0 * self.dummy
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.reshape(-1))


@pytest.mark.parametrize("multi_file", [False, True])
def test_bits_per_byte_against_the_byte_tokenizer(small_text, tmp_path, multi_file):
    source = small_text
    if multi_file:
        source = tmp_path / "d"
        source.mkdir()
        (source / "a.txt").write_text(small_text.read_text()[:3000])
        (source / "b.txt").write_text("ünïcode — text\n" * 50)
    cache = tmp_path / "cache"
    byte_tok, bpe_tok = ByteTokenizer(), get_tokenizer("bpe:300", str(source), cache, 0.1)
    byte_tokens, byte_meta = load_tokens(str(source), byte_tok, cache)
    bpe_tokens, bpe_meta = load_tokens(str(source), bpe_tok, cache)
    # the same text: its byte count is the byte tokenizer's token count, for both tokenizers
    assert byte_meta["bytes"] == bpe_meta["bytes"] == byte_tokens.size
    assert bytes_per_token(byte_meta, byte_tok) == 1.0
    assert bytes_per_token(bpe_meta, bpe_tok) == pytest.approx(byte_tokens.size / bpe_tokens.size)
    assert bpe_tok.decode(np.asarray(bpe_tokens)).encode() == bytes(np.asarray(byte_tokens))
    # uniform predictions: log2(V) bits per token, i.e. log2(V) / (bytes per token) bits per byte
    for tok, tokens, meta in ((byte_tok, byte_tokens, byte_meta), (bpe_tok, bpe_tokens, bpe_meta)):
        data = TokenData.from_tokens(tokens, 16, 0.1, bytes_per_token(meta, tok))
        batches = data.val_batches(4, 2)
        out = evaluate(_Uniform(tok.vocab_size), batches, torch.device("cpu"), None, data.bytes_per_token)
        assert out["val_bpb"] == pytest.approx(math.log2(tok.vocab_size) * tokens.size / byte_tokens.size, rel=1e-6)


def test_tokenizer_from_path(small_text, tmp_path):
    trained = get_tokenizer("bpe:300", str(small_text), tmp_path / "c", 0.1)
    out = tmp_path / "tok"
    out.mkdir()
    trained.save(out / "tokenizer.json")
    text = "def f(x):\n    return x  # ok\n"
    for spec in (str(out), str(out / "tokenizer.json")):
        loaded = get_tokenizer(spec)
        assert loaded.vocab_size == 300 and np.array_equal(loaded.encode(text), trained.encode(text))
    with pytest.raises(UserError, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no tokenizer.json"):
        get_tokenizer(str(tmp_path / "c"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        get_tokenizer(str(tmp_path / "bad.json"))


def test_bad_bpe_settings(tmp_path):
    with pytest.raises(UserError, match="bpe:VOCAB"):
        build_config(overrides=["tokenizer=bpe:lots"])
    with pytest.raises(UserError, match="VOCAB >= 257"):
        get_tokenizer("bpe:100", "", tmp_path, 0.1)
    np.save(tmp_path / "t.npy", np.zeros(10, np.uint16))
    with pytest.raises(UserError, match="prepared token file"):
        get_tokenizer("bpe:300", str(tmp_path / "t.npy"), tmp_path, 0.1)


def test_train_eval_sample_with_bpe(small_text, tmp_path, capsys):
    from conftest import TINY

    args = ["train", "--set", f"data={small_text}", "--set", "tokenizer=bpe:300", "--set", "model.vocab_size=300",
            "--set", f"out_dir={tmp_path}", "--set", "run_name=bpe"]
    for item in TINY:
        args += ["--set", item]
    assert main(args + ["--set", "steps=3"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "bpe"), "--max-batches", "1"]) == 0
    assert "val_bpb" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "bpe"), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    small = args[:]
    small[small.index("model.vocab_size=300")] = "model.vocab_size=256"
    small[small.index("run_name=bpe")] = "run_name=small"
    assert main(small) == 2
    assert "model.vocab_size=300" in capsys.readouterr().err


def test_export_end_tokens_keep_every_encoding(small_text, tmp_path):
    """The exported byte and bpe:VOCAB tokenizers name <|endoftext|> / <|pad|> the tokens of bytes 0xFF / 0xFE:
    ids and vocabulary size unchanged, every text (random Unicode included) encodes and decodes as the run's
    tokenizer does; a tokenizer whose merges use those bytes gets no such roles (nothing renamed)."""
    import json
    import random

    from tokenizers import Tokenizer

    from torch_mhc.integrations.export import (
        END_OF_TEXT,
        PAD,
        _with_end_tokens,
        byte_hf_tokenizer,
        bytes_to_unicode,
        tokenizer_roles,
    )
    from torch_mhc.train.config import TrainConfig

    rng = random.Random(0)
    texts = [small_text.read_text()[:3000], "ÿþ Ā \x00\x7f naïve \U0001f600 <|pad|>x",
             "".join(chr(rng.choice([rng.randrange(32, 0x2FF), rng.randrange(0x370, 0xD7FF),
                                     rng.randrange(0x10000, 0x10FFFF)])) for _ in range(3000))]
    bpe = get_tokenizer("bpe:300", str(small_text), tmp_path / "c", 0.1)
    for name, run_tok, backend in (("byte", ByteTokenizer(), byte_hf_tokenizer()), ("bpe:300", bpe, bpe._tok)):
        cfg = TrainConfig(tokenizer=name)
        tok, roles = tokenizer_roles(cfg, run_tok)
        assert roles == {"eos_token": END_OF_TEXT, "pad_token": PAD}
        assert tok.get_vocab_size() == backend.get_vocab_size() == run_tok.vocab_size
        chars = bytes_to_unicode()
        assert tok.token_to_id(END_OF_TEXT) == backend.token_to_id(chars[0xFF])
        assert tok.token_to_id(PAD) == backend.token_to_id(chars[0xFE])
        for text in texts:
            plain = text.replace("<|pad|>", "")  # a special token's text is that token, as in any HF tokenizer
            ids = tok.encode(plain, add_special_tokens=False).ids
            assert ids == run_tok.encode(plain).tolist() and tok.decode(ids) == plain
        assert tok.encode("a<|endoftext|>", add_special_tokens=False).ids[-1] == tok.token_to_id(END_OF_TEXT)
    data = json.loads(bpe._tok.to_str())
    data["model"]["merges"].append(["ÿ", "þ"])  # a tokenizer that does use those bytes
    data["model"]["vocab"]["ÿþ"] = len(data["model"]["vocab"])
    clash = Tokenizer.from_str(json.dumps(data))
    same, roles = _with_end_tokens(clash)
    assert roles == {} and same is clash


def test_path_tokenizer_roles_only_while_the_source_holds_the_run_tokenizer(small_text, tmp_path):
    """A PATH tokenizer's roles come from the tokenizer_config.json beside it, and only while that directory's
    tokenizer.json is still the run's tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from torch_mhc.integrations.export import tokenizer_roles
    from torch_mhc.train.config import TrainConfig

    trained = get_tokenizer("bpe:300", str(small_text), tmp_path / "c", 0.1)
    trained._tok.add_special_tokens(["<s>", "</s>"])
    src = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=trained._tok, bos_token="<s>", eos_token="</s>").save_pretrained(src)
    run_tok = get_tokenizer(str(src))
    cfg = TrainConfig(tokenizer=str(src))
    assert tokenizer_roles(cfg, run_tok)[1] == {"bos_token": "<s>", "eos_token": "</s>"}
    other = get_tokenizer("bpe:320", str(small_text), tmp_path / "c", 0.1)
    other.save(src / "tokenizer.json")  # the directory now holds another tokenizer: its config says nothing
    assert tokenizer_roles(cfg, run_tok)[1] == {}
