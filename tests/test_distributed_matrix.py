"""configs/paper-mini.toml (the 27B config's structure at a tiny width: MoE after one dense layer, the
deepseek-v4 variant with the head merge, n = 4, 4 blocks) through ``mhc train`` on 4 gloo ranks, as a run moves
between layouts: FSDP2 x EP, then TP x FSDP, then PP x FSDP (1F1B over the step's 2 micro-batches), then one
process; each distributed segment goes through a diagnostics step, an eval and a checkpoint, is killed with
``kill -9`` and resumed on the next layout. The whole curve (training and validation loss, a diagnostic) is the
one-process curve to float32 rounding, and ``mhc eval`` / ``mhc export-weights`` read the result. Tiny shapes,
10 steps: measured 205 s on this 2-core machine at load average ~18 (other sessions running)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from torch_mhc.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = str(REPO / "configs" / "paper-mini.toml")
STEPS = 10


def sets(*pairs):
    return [a for s in pairs for a in ("--set", s)]


def launch(args, nproc, log):
    """``mhc ARGS`` on ``nproc`` processes (torchrun) or one; stderr into the file ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "torch_mhc", *args]
    else:
        cmd = [sys.executable, "-m", "torch_mhc", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)


def checkpoints(run_dir) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name.rsplit("_", 1)[1].removesuffix(".pt")) for p in d.iterdir()
                  if p.name.startswith(("dcp_step_", "step_"))) if d.is_dir() else []


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_9(proc) -> None:
    """SIGKILL to the launcher and every worker at once, then wait until all of them are gone."""
    tree = process_tree(proc.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in tree[1:]):
        assert time.monotonic() < deadline, "workers still alive after SIGKILL"
        time.sleep(0.05)


def wait_unlocked(run_dir) -> None:
    """Until no process holds the run's lock (the kernel drops it when its holder is gone). A worker outside
    the launcher's tree at the kill (seen once, under PP) still holding it is killed by the pid the lock names."""
    import fcntl

    deadline = time.monotonic() + 30
    with open(run_dir / ".lock", "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                f.seek(0)
                holder = f.read().split()
                if time.monotonic() > deadline - 20 and len(holder) > 1 and holder[1].isdigit():
                    cmdline = Path(f"/proc/{holder[1]}/cmdline")
                    if cmdline.exists() and str(run_dir.parent).encode() in cmdline.read_bytes():
                        print(f"killing {holder[1]}, which still holds {run_dir}/.lock")
                        os.kill(int(holder[1]), signal.SIGKILL)  # one of this test's workers
                assert time.monotonic() < deadline, f"{run_dir} still locked by {holder}"
                time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def kill_after_checkpoint(proc, run_dir, after: int, timeout: float = 240) -> int:
    """``kill -9`` the run (launcher and workers) as soon as a checkpoint newer than step ``after`` is
    committed; returns its step. Fails if the run ends first (it must die mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newer = [s for s in checkpoints(run_dir) if s > after]
        if newer:
            kill_9(proc)
            wait_unlocked(run_dir)
            return max(s for s in checkpoints(run_dir))
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before a checkpoint after step {after}")
        time.sleep(0.05)
    kill_9(proc)
    pytest.fail("no checkpoint in time")


def metrics(run_dir, key):
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = r  # a step logged again after a resume: the resumed run's record
    return {s: r[key] for s, r in sorted(records.items()) if key in r}


def test_paper_mini_across_layouts_with_kill_and_resume(tmp_path, small_text, capsys):
    out = tmp_path / "runs"
    # two micro-batches per step (grad_accum) for the pipeline's schedule, from the start: they define the run
    base = [f"data={small_text}", f"out_dir={out}", f"steps={STEPS}", "grad_accum=2", "batch_size=4"]
    assert main(["train", "--config", CONFIG, *sets(*base, "run_name=one")]) == 0
    one, run = out / "one", out / "moved"

    # FSDP2 x EP on 4 ranks, killed after its first checkpoint (step 2: diagnostics, eval, checkpoint)
    proc = launch(["train", "--config", CONFIG, *sets(*base, "run_name=moved", "parallel.ep=2")], 4,
                  tmp_path / "ep.log")
    first = kill_after_checkpoint(proc, run, 0)
    assert proc.returncode == -signal.SIGKILL and first < STEPS
    # TP x FSDP on 4 ranks from the EP checkpoint, killed after its own first checkpoint
    proc = launch(["train", "--resume", str(run), *sets("parallel.ep=1", "parallel.tp=2", "parallel.dp_shard=2")], 4,
                  tmp_path / "tp.log")
    second = kill_after_checkpoint(proc, run, first)
    assert proc.returncode == -signal.SIGKILL and second < STEPS
    # PP x FSDP on 4 ranks from the TP x FSDP checkpoint, killed after its own first checkpoint
    proc = launch(["train", "--resume", str(run), *sets("parallel.tp=1", "parallel.pp=2", "parallel.dp_shard=2")], 4,
                  tmp_path / "pp.log")
    third = kill_after_checkpoint(proc, run, second)
    assert proc.returncode == -signal.SIGKILL and third < STEPS
    # one process to the end, from the PP x FSDP checkpoint
    assert main(["train", "--resume", str(run), *sets("parallel.pp=1", "parallel.dp_shard=-1")]) == 0

    for key in ("loss", "val_loss", "max_composite_fwd_gain"):
        ref, got = metrics(one, key), metrics(run, key)
        assert ref.keys() == got.keys() and len(ref) >= 4, key
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(ref.values())), rtol=1e-5,
                                   atol=0, msg=lambda m, k=key: f"{k}: {m}")
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [(r["from_step"], r["checkpoint"]) for r in resumes] == [
        (s, f"dcp_step_{s:07d}") for s in (first, second, third)]
    assert resumes[0]["changes"].keys() >= {"parallel.ep", "parallel.tp"}
    assert resumes[1]["changes"].keys() >= {"parallel.tp", "parallel.pp"}

    capsys.readouterr()
    evaluated = []
    for r in (run, one):
        assert main(["eval", str(r), "--max-batches", "4"]) in (0, None)
        out = capsys.readouterr().out
        evaluated.append(json.loads(out[out.index("{"):]))
    assert evaluated[0].keys() == evaluated[1].keys() and "val_loss" in evaluated[0]
    assert evaluated[0]["val_loss"] == pytest.approx(evaluated[1]["val_loss"], rel=1e-5)
    weights = tmp_path / "w.safetensors"
    assert main(["export-weights", str(run), str(weights)]) in (0, None)
    from safetensors.torch import load_file

    from torch_mhc.train.checkpoint import load_checkpoint

    exported = load_file(str(weights))
    ref_state = load_checkpoint(sorted((one / "checkpoints").glob("step_*.pt"))[-1])["model"]
    assert exported.keys() == ref_state.keys()
    for k, v in ref_state.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")
