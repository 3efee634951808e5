"""Issue 11: no silent corruption, no non-finite checkpoints, one writer per run, every bad argument a
clear error, logs that survive kills and full disks. CLI behaviour is checked through ``main`` (exit
code and message) and, where the process boundary matters (tracebacks, locks, argv bytes), through
subprocesses."""

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, cli, cli_env, expect_error
from torch_mhc.cli import main
from torch_mhc.reports.plots import plot_runs, read_jsonl, run_labels
from torch_mhc.train import checkpoint as ckpt
from torch_mhc.train.config import DivergedError, UserError, build_config
from torch_mhc.train.data import ByteTokenizer, load_tokens
from torch_mhc.train.rundir import claim_new_run_dir, claim_run_dir, drop_partial_last_line


def sets(tmp_path, data, *extra):
    return [a for s in [*TINY, f"data={data}", f"out_dir={tmp_path / 'runs'}", *extra] for a in ("--set", s)]


def tiny_state(tmp_path, steps=(1, 2, 3), keep=5):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        with torch.no_grad():
            model.weight.add_(0.1)
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"lr": 1e-3, "model": {"connection": "mhc"}}, {}, keep)
    return model, opt, sched


def flip_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    path.write_bytes(bytes(data))


def forget_verified():
    ckpt._verified.clear()  # what a fresh process knows


# ------------------------------------------------------------------ 1. integrity
def test_flipped_bytes_are_caught_and_named(tmp_path):
    tiny_state(tmp_path)
    first, second, newest = ckpt.list_checkpoints(tmp_path)
    size = newest.stat().st_size
    assert ckpt.hash_path(newest).read_text().split() == [ckpt.file_sha256(newest), newest.name]  # sha256sum -c
    flip_middle(newest)
    assert newest.stat().st_size == size  # not truncated: only a checksum sees it
    forget_verified()
    with pytest.raises(UserError, match="is corrupt") as e:
        ckpt.load_checkpoint(newest)
    assert str(newest) in str(e.value) and str(second) in str(e.value)  # names the older one that verifies
    assert ckpt.load_checkpoint(second)["step"] == 2
    ckpt.hash_path(first).unlink()
    with pytest.raises(UserError, match="no checksum file"):
        ckpt.load_checkpoint(first)


def test_bad_newer_checkpoint_never_costs_a_good_one(tmp_path):
    model, opt, sched = tiny_state(tmp_path, steps=(1, 2), keep=5)
    flip_middle(ckpt.list_checkpoints(tmp_path)[-1])
    forget_verified()
    ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {}, {}, keep=2)
    # step 3 and step 1 are the two newest that verify; step 2 (corrupt) is neither counted nor deleted
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001.pt", "step_0000002.pt",
                                                                  "step_0000003.pt"]
    ckpt.save_checkpoint(tmp_path, 4, model, opt, sched, {}, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003.pt", "step_0000004.pt"]
    (ckpt.checkpoint_dir(tmp_path) / "step_0000000.pt").write_bytes(b"no checksum: not ours to delete")
    ckpt.save_checkpoint(tmp_path, 5, model, opt, sched, {}, {}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000000.pt", "step_0000005.pt"]


def test_token_cache_is_verified_and_rebuilt(small_text, tmp_path, capsys):
    tok = ByteTokenizer()
    t1, m1 = load_tokens(str(small_text), tok, tmp_path / "cache")
    expected = np.asarray(t1).copy()
    (cache,) = (tmp_path / "cache").glob("tokens-*.npy")
    del t1
    flip_middle(cache)
    t2, m2 = load_tokens(str(small_text), tok, tmp_path / "cache")
    assert not m2["cached"] and "is corrupt" in capsys.readouterr().err
    assert np.array_equal(np.asarray(t2), expected) and m2["sha256"] == m1["sha256"]
    cache.write_bytes(cache.read_bytes()[:100])  # truncated: the header is unreadable
    t3, m3 = load_tokens(str(small_text), tok, tmp_path / "cache")
    assert not m3["cached"] and np.array_equal(np.asarray(t3), expected)
    _, m4 = load_tokens(str(small_text), tok, tmp_path / "cache")
    assert m4["cached"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "cache" / f".tmp{int(dead.stdout)}.tokens-0123.npy"  # a killed tokenisation's leftover
    stale.write_bytes(b"half")
    small_text.write_text(small_text.read_text() + "x")
    load_tokens(str(small_text), tok, tmp_path / "cache")
    assert not stale.exists()


# ------------------------------------------------------------------ 2. divergence (checkpoint side)
def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt, sched = tiny_state(tmp_path, steps=(1,))
    before = {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path).iterdir()}
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(DivergedError, match="diverged at step 2") as e:
        ckpt.save_checkpoint(tmp_path, 2, model, opt, sched, {"lr": 0.5, "grad_clip": 0.0,
                                                              "model": {"connection": "residual"}}, {}, keep=1)
    assert e.value.step == 2 and "lr=0.125" in str(e.value) and "grad_clip=1.0" in str(e.value)
    assert {p.name: p.read_bytes() for p in ckpt.checkpoint_dir(tmp_path).iterdir()} == before
    assert not ckpt.is_finite_state(model)


# ------------------------------------------------------------------ 4. one writer per run
def test_run_directory_lock(tmp_path):
    with claim_new_run_dir(tmp_path / "runs", "a", "mhc") as first:
        (first.path / "metrics.jsonl").write_text('{"step": 1}\n')
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            claim_new_run_dir(tmp_path / "runs", "a", "mhc")
        with pytest.raises(UserError, match="in use"):
            claim_run_dir(first.path)
    tiny_state(tmp_path / "runs" / "a", steps=(1,))  # a run with a checkpoint is never started again
    with pytest.raises(UserError, match="already exists and is not empty"):
        claim_new_run_dir(tmp_path / "runs", "a", "mhc")
    claim_run_dir(tmp_path / "runs" / "a").release()  # free again once released
    # a failed start removes the directory it created; a started one with results stays
    with pytest.raises(RuntimeError):
        with claim_new_run_dir(tmp_path / "runs", "b", "mhc"):
            raise RuntimeError("failed start")
    assert not (tmp_path / "runs" / "b").exists()
    # timestamped names never collide
    with claim_new_run_dir(tmp_path / "runs", "", "hc") as x, claim_new_run_dir(tmp_path / "runs", "", "hc") as y:
        assert x.path != y.path


def test_lock_is_released_by_kill_9(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from torch_mhc.train.rundir import claim_new_run_dir
        claim = claim_new_run_dir({str(tmp_path / 'runs')!r}, "k", "mhc")
        print("claimed", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert p.stdout.readline().strip() == "claimed"
        with pytest.raises(UserError, match=f"in use by pid {p.pid}"):
            claim_run_dir(tmp_path / "runs" / "k")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    claim_run_dir(tmp_path / "runs" / "k").release()


def test_stale_temporary_files_are_removed_on_claim(tmp_path):
    tiny_state(tmp_path / "run", steps=(1,))
    d = ckpt.checkpoint_dir(tmp_path / "run")
    stale = [d / ".step_0000002.pt.tmp99999", d / ".step_0000002.pt.sha256.tmp99999", d / "step_0000002.pt.sha256"]
    for p in stale:
        p.write_bytes(b"half")
    claim_run_dir(tmp_path / "run").release()
    assert sorted(p.name for p in d.iterdir()) == ["step_0000001.pt", "step_0000001.pt.sha256"]


# ------------------------------------------------------------------ 5. every argument validated
@pytest.mark.parametrize("overrides, message", [
    (["model.dim.x=3"], "'model.dim' is a single value, not a section"),
    (["model=3", "model.dim=4"], "a key cannot be both a value and a section"),
    (["device=tpu"], "device must be auto, cpu, mps, cuda or cuda:N (got 'tpu')"),
    (["device=cuda:x"], "device must be"),
    (["model.mlp_hidden=-5"], "model.mlp_hidden must be >= 0"),
    (["model.n_shared_experts=-1"], "model.n_shared_experts must be >= 0"),
    (["warmup=-1"], "warmup must be >= 0"),
    (["lr=nan"], "config key 'lr' must be a finite number"),
    (["grad_clip=inf"], "config key 'grad_clip' must be a finite number"),
    (["min_lr_ratio=2"], "min_lr_ratio must be in [0, 1]"),
    (["steps=3.5"], "cannot read steps='3.5'"),
    (["compile=maybe"], "cannot read compile='maybe'"),
    (["run_name=a/b"], "run_name must be a plain directory name"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        build_config(overrides=overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("toml, message", [
    ("steps = 3.5", "config key 'steps' must be an integer, got float 3.5"),
    ("steps = [1, 2]", "config key 'steps' must be an integer, got list"),
    ("lr = true", "config key 'lr' must be a number, got bool"),
    ("betas = 0.9", "config key 'betas' must be a list of numbers, got float"),
    ("betas = [0.9, \"x\"]", "cannot read betas='x'"),
    ("[model]\ndim = \"big\"", "cannot read model.dim='big'"),
    ("[model]\nlearn = 3", "config key 'model.learn' must be a list of strings, got int 3"),
    ("[model.dim]\nx = 3", "'model.dim' is a single value, not a section"),
    ("lr = nan", "config key 'lr' must be a finite number"),
    ("seq_len = -4", "seq_len must be >= 1"),
])
def test_bad_toml_values_name_the_key(tmp_path, toml, message):
    (tmp_path / "c.toml").write_text(toml + "\n")
    with pytest.raises(UserError) as e:
        build_config(config_file=str(tmp_path / "c.toml"))
    assert message in str(e.value)


def test_bad_data_files(tmp_path, small_text, capsys):
    np.save(tmp_path / "neg.npy", np.array([5, -1, 7] * 400, dtype=np.int32))
    with pytest.raises(UserError, match="negative token id -1"):
        load_tokens(str(tmp_path / "neg.npy"), ByteTokenizer(), tmp_path / "c")
    raw = gzip.compress(small_text.read_bytes())
    bad = bytearray(raw)
    bad[len(bad) // 2 : len(bad) // 2 + 16] = b"\x00" * 16  # a corrupt deflate stream, not a truncation
    (tmp_path / "bad.txt.gz").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="corrupt or truncated gzip"):
        load_tokens(str(tmp_path / "bad.txt.gz"), ByteTokenizer(), tmp_path / "c")
    (tmp_path / "cut.txt.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or truncated gzip"):
        load_tokens(str(tmp_path / "cut.txt.gz"), ByteTokenizer(), tmp_path / "c")


def test_output_paths_that_are_files(tmp_path, small_text, capsys):
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, ["train", *sets(tmp_path, small_text, f"out_dir={tmp_path / 'afile' / 'runs'}")],
                 f"out_dir={tmp_path / 'afile' / 'runs'} cannot be a directory: {tmp_path / 'afile'} is a file")
    expect_error(capsys, ["plot", str(tmp_path), "--out", str(tmp_path / "afile")], "is a file")
    expect_error(capsys, ["compare", "--out", str(tmp_path / "afile" / "report")], "is a file")
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------ 6. logs survive faults
def test_partial_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert "metrics.jsonl:3 is not a complete record" in capsys.readouterr().err
    assert drop_partial_last_line(path)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert not drop_partial_last_line(path)


def test_plot_runs_sharing_a_name(tmp_path):
    dirs = []
    for i, (cmp, loss) in enumerate([("cmp1", 2.0), ("cmp2", 3.0)]):
        d = tmp_path / cmp / "runs" / "mhc"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss, "grad_norm": 1.0}) + "\n")
        dirs.append(d)
    assert run_labels(dirs) == ["cmp1/runs/mhc", "cmp2/runs/mhc"]
    assert run_labels([tmp_path / "cmp1" / "runs" / "mhc", tmp_path / "x"]) == ["mhc", "x"]
    with pytest.raises(UserError, match="given twice"):
        run_labels([dirs[0], dirs[0]])
    assert {p.name for p in plot_runs([str(d) for d in dirs], tmp_path / "plots")} >= {"loss.png", "grad_norm.png"}


# ------------------------------------------------------------------ CLI level: a trained tiny run, copied per test
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step mhc run with checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data.txt"
    data.write_text("".join(p.read_text() for p in sorted((REPO / "src" / "torch_mhc").rglob("*.py"))))
    assert main(["train", *sets(root, data, "run_name=r")]) == 0
    return root / "runs" / "r", data


def copy_run(trained, tmp_path):
    import shutil

    run_dir, data = trained
    dst = tmp_path / "runs" / "r"
    shutil.copytree(run_dir, dst)
    shutil.copy(data, tmp_path / "data.txt")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["data"] == str(data)
    return dst


def snapshot(run_dir):
    return {p: p.read_bytes() for p in sorted(ckpt.checkpoint_dir(run_dir).iterdir())}


def test_cli_refuses_a_corrupt_checkpoint_everywhere(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    older, newest = ckpt.list_checkpoints(run_dir)
    flip_middle(newest)
    before = snapshot(run_dir)
    forget_verified()
    r = cli(["train", "--resume", str(run_dir), "--set", "steps=9"], tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2 and "is corrupt" in err and str(older) in err and "Traceback" not in err, err
    for args in (["eval", str(run_dir)], ["sample", str(run_dir), "--max-new-tokens", "2"], ["diagnose", str(run_dir)]):
        forget_verified()
        expect_error(capsys, args, f"checkpoint {newest} is corrupt")
    assert snapshot(run_dir) == before  # nothing pruned, nothing rewritten
    assert not (run_dir / "resumes.jsonl").exists()


def test_divergence_stops_cleanly_for_every_model_type(tmp_path, small_text, capsys):
    for connection in ("residual", "hc", "mhc"):
        name = f"div-{connection}"
        err = expect_error(capsys, ["train", *sets(tmp_path, small_text, f"run_name={name}", "lr=1e30", "grad_clip=0",
                                                   "warmup=0", f"model.connection={connection}", "ckpt_every=1",
                                                   "steps=12")], "training diverged at step")
        assert f"({connection} model)" in err and "grad_clip=1.0" in err and "lr=2.5e+29" in err, err
        run_dir = tmp_path / "runs" / name
        for path in ckpt.list_checkpoints(run_dir):
            state = ckpt.load_checkpoint(path)
            assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
        step = int(err.split("diverged at step ")[1].split(":")[0])
        saved = [ckpt.load_checkpoint(p)["step"] for p in ckpt.list_checkpoints(run_dir)]
        assert all(s < step for s in saved) and len(saved) == min(2, step - 1), (saved, step)


def test_resume_applies_what_may_change_and_refuses_the_rest(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    before = snapshot(run_dir)
    for key, message in (("batch_size=8", "batch_size (4 -> 8)"), ("model.dim=64", "model.dim (32 -> 64)"),
                         ("seed=3", "seed (1337 -> 3)")):
        expect_error(capsys, ["train", "--resume", str(run_dir), "--set", "steps=9", "--set", key], message)
    assert snapshot(run_dir) == before and not (run_dir / "resumes.jsonl").exists()
    assert main(["train", "--resume", str(run_dir), "--set", "steps=8", "--set", "lr=0.01",
                 "--set", "weight_decay=0.05", "--set", "connection_lr_scale=0.5"]) == 0
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    groups = state["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert {round(g["initial_lr"], 12) for g in groups} == {0.01, 0.005}
    assert state["scheduler"]["base_lrs"] == [g["initial_lr"] for g in groups]
    recorded = json.loads((run_dir / "config.json").read_text())
    assert (recorded["lr"], recorded["weight_decay"], recorded["steps"]) == (0.01, 0.05, 8)
    (history,) = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert history["from_step"] == 6 and history["changes"]["lr"] == [0.003, 0.01]
    assert history["changes"]["steps"] == [6, 8]


def test_resume_on_changed_data(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    data = trained[1]
    original = data.read_bytes()
    try:
        data.write_bytes(original.replace(b"def ", b"DEF "))
        expect_error(capsys, ["train", "--resume", str(run_dir), "--set", "steps=7"], "the training data changed")
        assert main(["train", "--resume", str(run_dir), "--set", "steps=7", "--allow-data-change"]) == 0
    finally:
        data.write_bytes(original)
    (history,) = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert "training data changed" in history["data_changed"]


def test_cli_one_writer(trained, tmp_path, small_text):
    run_dir = copy_run(trained, tmp_path)
    with claim_run_dir(run_dir):
        r = cli(["train", "--resume", str(run_dir), "--set", "steps=9"], tmp_path)
        assert r.returncode == 2 and f"in use by pid {os.getpid()}" in r.stderr.decode(), r.stderr
    with claim_new_run_dir(tmp_path / "runs", "fresh", "mhc"):
        r = cli(["train", *sets(tmp_path, small_text, "run_name=fresh")], tmp_path)
        assert r.returncode == 2 and "in use" in r.stderr.decode() and b"Traceback" not in r.stderr
    assert [p.name for p in (tmp_path / "runs" / "fresh").iterdir()] == [".lock"]  # the second wrote nothing


def test_failed_starts_leave_no_directory(tmp_path, small_text, capsys):
    expect_error(capsys, ["train", *sets(tmp_path, tmp_path / "missing.txt", "run_name=a")], "does not exist")
    expect_error(capsys, ["train", *sets(tmp_path, small_text, "device=cuda:7")], "device=cuda:7")
    assert not (tmp_path / "runs").exists() or [p.name for p in (tmp_path / "runs").iterdir()] in ([], ["cache"])


def test_cli_argument_errors(trained, tmp_path, capsys):
    run_dir, data = trained
    for args, message in [
        (["eval", str(run_dir), "--max-batches", "0"], "max_batches (--max-batches) must be an integer >= 1"),
        (["sample", str(run_dir), "--top-k", "-1"], "top_k (--top-k) must be an integer >= 1"),
        (["sample", str(run_dir), "--top-k", "0"], "top_k (--top-k) must be an integer >= 1"),
        (["sample", str(run_dir), "--temperature", "nan"], "temperature (--temperature) must be finite"),
        (["sample", str(run_dir), "--temperature", "inf"], "temperature (--temperature) must be finite"),
        (["diagnose", str(run_dir), "--out", str(data)], "is a file"),
    ]:
        expect_error(capsys, args, message)
    np.save(tmp_path / "big.npy", np.array([1, 2, 300] * 1000, dtype=np.int32))
    expect_error(capsys, ["eval", str(run_dir), "--data", str(tmp_path / "big.npy")],
                 "holds token id 300, outside [0, 256)")
    expect_error(capsys, ["train", *sets(tmp_path, tmp_path / "big.npy")], "holds token id 300, outside [0, 256)")
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3] * 400, dtype=np.int64))
    expect_error(capsys, ["eval", str(run_dir), "--data", str(tmp_path / "neg.npy")], "negative token id -2")
    r = subprocess.run([sys.executable.encode(), b"-m", b"torch_mhc", b"sample", str(run_dir).encode(), b"--prompt",
                        b"caf\xff"], capture_output=True, env=cli_env(), timeout=300)
    assert r.returncode == 2 and b"the prompt (--prompt) is not valid text" in r.stderr, r.stderr
    assert b"Traceback" not in r.stderr


def test_partial_metrics_line_on_resume_and_plot(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2, "gra')  # what a kill or a full disk leaves
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "plots")]) == 0
    assert "is not a complete record" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "--set", "steps=8"]) == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] for line in lines)  # every line a record
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [2, 3, 4, 6, 8]
