"""A run's tokenizer belongs to the run: ``RUN_DIR/tokenizer.json``, written once when the run starts and
checked against the SHA-256 in its checkpoints, is the only tokenizer eval, sample, export, diagnose,
resume and compare use for it, whatever happens to the data file or the BPE cache afterwards."""

import json

import pytest
import torch

pytest.importorskip("tokenizers", reason="the tokenizers package is not installed (pip install 'torch-mhc[hf]')")

from conftest import SHARED_DATA, TINY  # noqa: E402
from torch_mhc.cli import main  # noqa: E402
from torch_mhc.train.checkpoint import atomic_save, latest_checkpoint, load_checkpoint  # noqa: E402
from torch_mhc.train.data import (  # noqa: E402
    RUN_TOKENIZER,
    TokenData,
    bytes_per_token,
    get_tokenizer,
    load_tokens,
    split_off_test,
)
from torch_mhc.train.evaluate import evaluate_run, load_run, sample_run  # noqa: E402

BPE = ["tokenizer=bpe:300", "model.vocab_size=300"]
SHORT = ["model.max_seq_len=16", "seq_len=16", "steps=3", "val_fraction=0.05"]


@pytest.fixture
def corpus(tmp_path, shakespeare):
    """120 KB of Shakespeare in a file of its own (the tests make it grow); not the default corpus."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare.read_text()[:120_000])
    return path


def _grow(path):
    """Append different text (Wikipedia articles): a BPE trained on the file now is another one."""
    wiki = SHARED_DATA / "wikitext-2-valid.txt"
    if not wiki.is_file():
        pytest.skip(f"{wiki} not found")
    with open(path, "a") as f:
        f.write(wiki.read_text()[:150_000])


def _train(root, data, name, *extra):
    args = ["train", "--set", f"data={data}", "--set", f"out_dir={root}", "--set", f"run_name={name}"]
    for item in [*TINY, *SHORT, *extra]:
        args += ["--set", item]
    assert main(args) == 0
    return root / name


def test_compare_measures_test_loss_with_the_runs_tokenizer(tmp_path, corpus, capsys):
    """compare with bpe:300 on Shakespeare: the run stores the BPE trained on Shakespeare, and its test loss is the
    loss of the run's checkpoint on the test split tokenised with that BPE (not one trained on the stdlib)."""
    from torch_mhc.reports.compare import TEST_BATCHES_PER_EVAL_BATCH, compare
    from torch_mhc.train.trainer import evaluate

    out = tmp_path / "cmp"
    sets = [*TINY, *SHORT, *BPE, f"data={corpus}", "test_fraction=0.05"]
    compare(None, ["residual"], sets, str(out), seeds=[1], lrs=[1e-3], log=lambda *_: None)
    row = json.loads((out / "summary.json").read_text())["runs"][0]
    run_dir = out / "runs" / row["name"]

    own = get_tokenizer("bpe:300", str(corpus), tmp_path / "own-cache", 0.05)  # trained afresh on the run's data
    assert (run_dir / RUN_TOKENIZER).read_text() == own._tok.to_str(pretty=True)
    tokens, meta = load_tokens(str(corpus), own, tmp_path / "own-cache")
    _, test = split_off_test(tokens, 0.05)
    split = TokenData(test[:0], test, 16, bytes_per_token(meta, own))
    model, cfg, _ = load_run(run_dir)
    expected = evaluate(model, split.val_batches(cfg.batch_size, TEST_BATCHES_PER_EVAL_BATCH * cfg.eval_batches),
                        torch.device("cpu"), None, split.bytes_per_token)
    assert row["test_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert row["test_bpb"] == pytest.approx(expected["val_bpb"], rel=1e-6)

    (run_dir / "result.json").unlink()  # --resume measures the test loss again: with a changed tokenizer, never
    (run_dir / RUN_TOKENIZER).write_text((run_dir / RUN_TOKENIZER).read_text() + "\n")  # still valid JSON
    assert main(["compare", "--resume", str(out)]) == 2
    assert str(run_dir / RUN_TOKENIZER) in capsys.readouterr().err


def test_a_grown_data_file_changes_nothing_of_a_finished_run(tmp_path, corpus, capsys):
    """After the data file grows (a BPE trained on it now differs), export writes the same tokenizer.json and
    eval and sample give the same results: all use the tokenizer stored in the run."""
    run_dir = _train(tmp_path / "runs", corpus, "bpe", *BPE)
    stored = (run_dir / RUN_TOKENIZER).read_bytes()
    assert load_checkpoint(latest_checkpoint(run_dir))["tokenizer"]["name"] == "bpe:300"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text()[500_000:520_000])

    def use():
        out = tmp_path / f"hf{len(list(tmp_path.glob('hf*')))}"
        assert main(["export", str(run_dir), str(out)]) == 0
        return ((out / "tokenizer.json").read_bytes(), evaluate_run(str(run_dir), data=str(held_out), max_batches=4),
                sample_run(str(run_dir), "ROMEO:", max_new_tokens=20))

    before = use()
    _grow(corpus)
    retrained = get_tokenizer("bpe:300", str(corpus), tmp_path / "runs" / "cache", 0.05)
    assert retrained._tok.to_str(pretty=True).encode() != stored  # the growth really changes the BPE
    after = use()
    assert after[0] == before[0]
    assert after[1] == before[1]
    assert after[2] == before[2]
    assert (run_dir / RUN_TOKENIZER).read_bytes() == stored
    capsys.readouterr()
    # the grown file's validation split, with the run's tokenizer
    assert main(["eval", str(run_dir), "--max-batches", "2"]) == 0
    assert main(["diagnose", str(run_dir), "--out", str(tmp_path / "diag")]) == 0


def test_a_changed_or_missing_stored_tokenizer_is_refused(tmp_path, corpus, capsys):
    run_dir = _train(tmp_path / "runs", corpus, "bpe", *BPE)
    path = run_dir / RUN_TOKENIZER
    other = get_tokenizer("bpe:300", str(SHARED_DATA / "wikitext-2-valid.txt"), tmp_path / "other", 0.05)
    path.write_text(other._tok.to_str(pretty=True))  # a valid tokenizer.json, but not the run's
    commands = [["eval", str(run_dir)], ["sample", str(run_dir)], ["export", str(run_dir), str(tmp_path / "hf")],
                ["diagnose", str(run_dir)], ["train", "--resume", str(run_dir), "--set", "steps=6"]]
    for args in commands:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert str(path) in err and "does not match the SHA-256" in err, (args, err)
    assert not (tmp_path / "hf").exists()  # refused before anything was written
    path.unlink()
    for args in commands:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert str(path) in err and "is missing" in err, (args, err)


def test_byte_runs_store_only_the_name(tmp_path, small_text):
    run_dir = _train(tmp_path / "runs", small_text, "byte")
    assert not (run_dir / RUN_TOKENIZER).exists()
    assert load_checkpoint(latest_checkpoint(run_dir))["tokenizer"] == {"name": "byte"}
    assert sample_run(str(run_dir), "def ", max_new_tokens=5)


def test_a_run_from_before_stored_tokenizers(tmp_path, corpus, capsys):
    """A bpe run without a stored tokenizer (written by an older version): used only while the rebuilt BPE
    reproduces the run's training tokens (the checkpoint's data fingerprint); a resume then stores it."""
    run_dir = _train(tmp_path / "runs", corpus, "old", *BPE)
    expected = evaluate_run(str(run_dir), max_batches=4)
    ckpt = latest_checkpoint(run_dir)
    state = load_checkpoint(ckpt)
    del state["tokenizer"]
    atomic_save(state, ckpt)  # with its checksum file, as an older version wrote it
    (run_dir / RUN_TOKENIZER).unlink()
    assert evaluate_run(str(run_dir), max_batches=4) == expected  # the data is unchanged: the rebuilt BPE is the run's

    saved = corpus.read_bytes()
    _grow(corpus)
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "predates stored tokenizers" in err and "bpe:300" in err
    corpus.write_bytes(saved)  # the data restored (a new mtime: the BPE is retrained, and is the same)
    assert main(["train", "--resume", str(run_dir), "--set", "steps=6"]) == 0
    assert (run_dir / RUN_TOKENIZER).is_file()
    assert load_checkpoint(latest_checkpoint(run_dir))["tokenizer"]["sha256"]
    _grow(corpus)
    # from now on the stored tokenizer, whatever the data
    assert main(["sample", str(run_dir), "--max-new-tokens", "5"]) == 0
