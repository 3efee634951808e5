"""Issue 20: real faults and hostile inputs, each a clear error (exit 2, one paragraph) or handled.

Full disks are real small tmpfs mounts, filled to leave a chosen number of bytes free; read-only file
systems are tmpfs mounts remounted read-only (``mount`` needs root: these tests skip where it is not
permitted). Signals are real signals to real ``python -m torch_mhc`` processes."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, cli, cli_env, expect_error
from torch_mhc.cli import main
from torch_mhc.reports.plots import read_jsonl
from torch_mhc.train import checkpoint as ckpt
from torch_mhc.train.config import UserError, build_config
from torch_mhc.train.data import ByteTokenizer, load_tokens
from torch_mhc.train.trainer import MetricsWriter


def sets(out_dir, data, *extra):
    return [a for s in [*TINY, f"data={data}", f"out_dir={out_dir}", *extra] for a in ("--set", s)]


# ------------------------------------------------------------------ real small file systems
class Mount:
    """A tmpfs mounted at ``path``: ``fill(leave)`` leaves ``leave`` bytes free, ``free_up()`` removes the
    filler, ``read_only()`` remounts it read-only."""

    def __init__(self, path):
        self.path, self.filler = path, path / ".filler"

    def fill(self, leave: int) -> None:
        n = shutil.disk_usage(self.path).free - leave
        assert n > 0, (shutil.disk_usage(self.path), leave)
        with open(self.filler, "ab") as f:
            f.write(b"\0" * n)  # written, not sparse: tmpfs counts only written pages

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount tmpfs file systems (``tmpfs(size)``) under tmp_path; all are unmounted at the end."""
    mounts = []

    def make(size: str = "16m") -> Mount:
        path = tmp_path / f"mnt{len(mounts)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {r.stderr.decode().strip()}")
        mounts.append(path)
        return Mount(path)

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield make
    for path in reversed(mounts):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step mhc run (checkpoints at steps 3 and 6) on the ordinary disk, and its data."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data.txt"
    data.write_text("".join(p.read_text() for p in sorted((REPO / "src" / "torch_mhc").rglob("*.py"))))
    assert main(["train", *sets(root / "runs", data, "run_name=r")]) == 0
    return root / "runs" / "r", data


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_jsonl(run_dir / "metrics.jsonl")]


def leftovers(root):
    """Temporary files and directories anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


def test_full_disk_during_training_then_exact_resume(trained, tmpfs, capsys):
    """The disk fills in the middle of the step-6 checkpoint (torch.save raises 'unexpected pos'): exit 2
    naming the file, nothing half-written, and once space is freed the resume gives the uninterrupted run."""
    ref, data = trained
    size = ckpt.list_checkpoints(ref)[0].stat().st_size
    cache = sum(p.stat().st_size for p in (ref.parent / "cache").iterdir())
    m = tmpfs("16m")
    m.fill(cache + size + size // 2 + 128 * 1024)  # room for the cache, one checkpoint and half of the next
    err = expect_error(capsys, ["train", *sets(m.path / "runs", data, "run_name=r")], "the disk is full")
    run_dir = m.path / "runs" / "r"
    assert str(ckpt.checkpoint_dir(run_dir) / "step_0000006.pt") in err and "--resume" in err, err
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000003.pt"]
    assert leftovers(m.path) == []
    m.free_up()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert losses(run_dir) == losses(ref)
    mine, theirs = (ckpt.load_checkpoint(ckpt.list_checkpoints(d)[-1])["model"] for d in (run_dir, ref))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_full_disk_while_writing_the_token_cache(small_text, tmpfs, tmp_path):
    """numpy's 'N requested and M written' (no errno) is a full disk too: a UserError naming the cache file,
    no temporary file left; with space the same call caches the same tokens."""
    expected, _ = load_tokens(str(small_text), ByteTokenizer(), tmp_path / "ref")
    m = tmpfs("4m")
    m.fill(expected.nbytes // 2)
    with pytest.raises(UserError, match="the disk is full") as e:
        load_tokens(str(small_text), ByteTokenizer(), m.path / "cache")
    assert "tokens-" in str(e.value) and ".npy" in str(e.value)
    assert [p.name for p in (m.path / "cache").iterdir()] == []
    m.free_up()
    tokens, meta = load_tokens(str(small_text), ByteTokenizer(), m.path / "cache")
    assert not meta["cached"] and np.array_equal(tokens, expected)
    assert load_tokens(str(small_text), ByteTokenizer(), m.path / "cache")[1]["cached"]


def test_full_disk_in_metrics_and_tensorboard(tmpfs, tmp_path, capsys, monkeypatch):
    """TensorBoard's writer thread meets the full disk: the next call names the tb folder and the thread prints
    no traceback (its error reaches threading.excepthook no more); metrics.jsonl on a full disk names itself."""
    pytest.importorskip("tensorboard")
    import threading

    thread_errors = []  # what threading would print as "Exception in thread ..." with a traceback
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    m = tmpfs("1m")
    run_dir = m.path / "run"
    run_dir.mkdir()
    w = MetricsWriter(run_dir)
    w.path = tmp_path / "metrics.jsonl"  # the log on a disk with room: only TensorBoard meets the full one
    w.write({"step": 1, "loss": 1.0})
    m.fill(0)
    with pytest.raises(UserError, match="the disk is full") as e:
        for step in range(2, 20000):
            w.write({"step": step, **{f"k{i}": float(i) for i in range(20)}})
            time.sleep(0)  # let the writer thread run
        w.close()
    assert str(run_dir / "tb") in str(e.value) and thread_errors == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    w2 = MetricsWriter.__new__(MetricsWriter)
    w2.path, w2.tb = run_dir / "metrics.jsonl", None
    with pytest.raises(UserError, match="the disk is full") as e:
        w2.write({"step": 1, "loss": 1.0, "text": "x" * 8192})
    assert str(run_dir / "metrics.jsonl") in str(e.value)


@pytest.mark.parametrize("command", ["export", "export-weights"])
def test_full_disk_while_exporting(trained, tmpfs, capsys, command):
    """safetensors' SafetensorError on a full disk: exit 2 naming the output, nothing half-written left (a
    retry is not refused as 'not empty'), and the retry with space succeeds."""
    if command == "export":
        pytest.importorskip("transformers")
    run_dir, _ = trained
    size = ckpt.list_checkpoints(run_dir)[-1].stat().st_size
    m = tmpfs("8m")
    out = m.path / ("exported" if command == "export" else "w.safetensors")
    m.fill(size // 8)
    err = expect_error(capsys, [command, str(run_dir), str(out)], "the disk is full")
    assert str(out) in err and "nothing" in err, err
    assert sorted(p.name for p in m.path.iterdir()) == [".filler"]
    m.free_up()
    assert main([command, str(run_dir), str(out)]) == 0
    if command == "export":
        assert {"config.json", "model.safetensors", "tokenizer.json", "modeling_torch_mhc.py"} <= {
            p.name for p in out.iterdir()}
    else:
        from safetensors.torch import load_file

        assert load_file(out).keys() == ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])["model"].keys()
    assert leftovers(m.path) == []


def test_read_only_file_system(trained, tmpfs, capsys):
    """A run on read-only media: eval works (the token cache is kept in memory); train --resume, diagnose, a new
    out_dir or run, export and export-weights there are clear errors naming the path; nothing is changed."""
    run_dir, data = trained
    m = tmpfs("8m")
    shutil.copytree(run_dir, m.path / "runs" / "r")
    m.read_only()
    ro = m.path / "runs" / "r"
    assert main(["eval", str(ro), "--max-batches", "1"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["step"] == 6 and "read-only file system" in out.err, out.err
    err = expect_error(capsys, ["train", "--resume", str(ro), "--set", "steps=8"], "read-only file system")
    assert str(ro / ".lock") in err, err
    err = expect_error(capsys, ["diagnose", str(ro)], "read-only")
    assert str(ro / "diagnose") in err, err
    err = expect_error(capsys, ["train", *sets(m.path / "new", data, "run_name=x")], "read-only file system")
    assert "out_dir" in err and str(m.path / "new") in err, err
    err = expect_error(capsys, ["train", *sets(m.path, data, "run_name=x")], "read-only file system")
    assert str(m.path / "x") in err, err
    err = expect_error(capsys, ["export-weights", str(ro), str(m.path / "w.safetensors")], "read-only file system")
    assert str(m.path / "w.safetensors") in err, err
    if importlib.util.find_spec("transformers") is not None:
        err = expect_error(capsys, ["export", str(ro), str(m.path / "exported")], "read-only file system")
        assert str(m.path / "exported") in err, err
    assert sorted(p.name for p in m.path.iterdir()) == ["runs"]


# ------------------------------------------------------------------ input probes
def test_data_that_is_not_a_regular_file(tmp_path):
    """A FIFO (which blocked the read until a writer came) and /dev/zero (which never ends) are refused at once."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for data, kind in ((fifo, "a named pipe (FIFO)"), ("/dev/zero", "a character device")):
        r = cli(["train", *sets(tmp_path / "runs", data)], tmp_path, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2 and kind in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists() or [p.name for p in (tmp_path / "runs").iterdir()] in ([], ["cache"])


@pytest.mark.parametrize("overrides", [["model.n_layers=200000", "model.dim=256"], ["model.dim=1000000"],
                                       ["model.vocab_size=10000000000"], ["batch_size=100000000"],
                                       ["model.max_seq_len=20000000000"]])
def test_model_too_large_for_memory(small_text, tmp_path, capsys, overrides):
    """Checked against the memory available before anything is allocated (n_layers=200000 built for minutes,
    the others failed in the allocator), with the estimate shown."""
    t0 = time.perf_counter()
    err = expect_error(capsys, ["train", *sets(tmp_path / "runs", small_text, *overrides)], "does not fit in memory")
    assert time.perf_counter() - t0 < 30
    assert "GiB" in err and "Nothing was allocated" in err and overrides[0] in err, err
    assert not (tmp_path / "runs").exists() or [p.name for p in (tmp_path / "runs").iterdir()] in ([], ["cache"])


def test_parameter_count_without_building_the_model():
    """The estimate's parameter count, extrapolated from models of a few layers on the meta device, is exact."""
    from torch_mhc.models.decoder import DecoderLM
    from torch_mhc.train.config import count_parameters

    for extra in ([], ["model.moe=true", "model.first_dense_layers=1"]):
        cfg = build_config(overrides=[*TINY, "model.n_layers=5", *extra])
        model = DecoderLM(cfg.model)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        assert count_parameters(cfg.model) == (model.num_params(), buffers), extra
    big = build_config(overrides=[*TINY, "model.n_layers=200000"]).model
    t0 = time.perf_counter()
    params, _ = count_parameters(big)
    assert time.perf_counter() - t0 < 10 and params > 200000 * 32 * 32


@pytest.mark.parametrize("override, message", [
    ("run_name=" + "a" * 300, "run_name must be at most 255 bytes"),
    ("run_name=a/b", "run_name must be a plain directory name"),
    ("run_name=..", "run_name must be a plain directory name"),
    ("run_name=a\\b", "run_name must be a plain directory name"),
    ("run_name=a\nb", "run_name must not hold control characters"),
    ("out_dir=/tmp/" + "o" * 300, "out_dir has a part longer than 255 bytes"),
    ("tokenizer=bpe:99999999999999999999", "tokenizer=bpe:VOCAB needs 257 <= VOCAB <= 16,777,216"),
    ("tokenizer=bpe:100", "tokenizer=bpe:VOCAB needs 257 <= VOCAB"),
])
def test_names_and_tokenizer_sizes_are_validated(override, message, small_text, tmp_path, capsys):
    with pytest.raises(UserError, match="invalid config") as e:
        build_config(overrides=[override])
    assert message in str(e.value)
    expect_error(capsys, ["train", "--set", override, "--set", f"data={small_text}",
                          *(["--set", f"out_dir={tmp_path}"] if "out_dir" not in override else [])], message)


def test_export_weights_into_a_directory_is_refused(trained, tmp_path, capsys):
    run_dir, _ = trained
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    for target in (tmp_path / "d", tmp_path):
        expect_error(capsys, ["export-weights", str(run_dir), str(target)], f"{target} is a directory")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]


def test_sigterm_before_the_first_checkpoint(small_text, tmp_path, capsys):
    """A run killed (real SIGTERM) before its first checkpoint: the same `mhc train` starts it again from step 0
    (before, it was refused as 'not empty' while --resume said there was no checkpoint)."""
    out = tmp_path / "runs"
    args = sets(out, small_text, "run_name=t")
    run_dir = out / "t"
    p = subprocess.Popen([sys.executable, "-m", "torch_mhc", "train", *args, "--set", "steps=100000",
                          "--set", "ckpt_every=100000", "--set", "log_every=1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=cli_env())
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size):
            assert p.poll() is None and time.time() < deadline, p.stderr.read()
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == -signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert (run_dir / "metrics.jsonl").is_file() and not ckpt.list_checkpoints(run_dir)
    expect_error(capsys, ["train", "--resume", str(run_dir)], "has no checkpoint")
    assert main(["train", *args]) == 0
    assert "holds no checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [2, 3, 4, 6]
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000003.pt", "step_0000006.pt"]
    (run_dir / "notes.txt").write_text("a file that is not the run's")
    for c in ckpt.list_checkpoints(run_dir):
        c.unlink()
    expect_error(capsys, ["train", *args], "already exists and is not empty")
