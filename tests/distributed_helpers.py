"""Run a function on N gloo processes (CPU) for the distributed tests; results come back per rank."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_mhc.models import DecoderLM, ModelConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done before any tears its gloo connections down: a rank destroying its group while the other
        # still finished a collective was seen once to abort the other ("terminate called without an active
        # exception", SIGABRT) in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # a finished rank skips interpreter shutdown, where gloo's leftover work can abort it (cli.run)


def spawn(fn, world: int, tmp_path, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes in one gloo group; returns each rank's result."""
    out = tmp_path / f"results-{fn.__name__}-{world}"
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, free_port(), fn, args, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, n_streams=4, sinkhorn_iters=5)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(tiny_config(**overrides))


def batches(steps: int, batch: int, seq: int, vocab: int = 64, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Fresh random global batches (inputs, targets) ``[batch, seq]`` each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        t = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def torchrun(*args, nproc: int = 2, script=None, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` of ``mhc`` (or of ``script``) with ``args`` on ``nproc`` CPU ranks, one thread each."""
    target = [str(script)] if script else ["-m", "torch_mhc"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def records(run_dir, name: str = "metrics.jsonl") -> dict[int, dict]:
    """A run's JSONL records by step, in order (a resumed step's record replaces the earlier one)."""
    out = {}
    for line in (run_dir / name).read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r
    return dict(sorted(out.items()))


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every number of a nested diagnostics record, by path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{prefix}/{i}").items()}
    return {prefix: float(tree)} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def assert_same_numbers(got: dict, ref: dict, rel_tol: float, abs_tol: float = 1e-6) -> None:
    """Two diagnostics records hold the same numbers (more than 100 of them) by path, each within ``rel_tol``;
    ``abs_tol`` for those that are float32 noise themselves (``res_row_err`` ~1e-6 after Sinkhorn)."""
    a, b = numbers(got), numbers(ref)
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=rel_tol, abs_tol=abs_tol), (k, a[k], b[k])
