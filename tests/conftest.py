import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter; it must be on before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


class CountLaunches:
    """Stands in for a Triton kernel: records each ``kernel[grid](...)`` launch (its grid and keyword arguments)
    and runs it. ``launches`` counts them."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.kwargs = kernel, [], []

    @property
    def launches(self) -> int:
        return len(self.grids)

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (CI has ../shared beside the repository)")
    return path


def write_small_text(path: Path) -> Path:
    """Write a few KB of varied real text to ``path``: this repository's own Python source."""
    path.write_text("".join(p.read_text() for p in sorted((REPO / "src" / "torch_mhc").rglob("*.py"))))
    return path


@pytest.fixture
def small_text(tmp_path) -> Path:
    return write_small_text(tmp_path / "small.txt")


TINY = [
    "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "seq_len=32", "batch_size=4",
    "steps=6", "warmup=2", "log_every=2", "eval_every=3", "eval_batches=2", "ckpt_every=3", "diag_every=3",
]


def cli_env() -> dict:
    """The environment for ``python -m torch_mhc`` subprocesses: this process's import path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def cli(args, cwd, timeout=300):
    """``mhc ARGS`` in a fresh process (where the process boundary matters: tracebacks, locks, signals)."""
    return subprocess.run([sys.executable, "-m", "torch_mhc", *args], capture_output=True, cwd=cwd, env=cli_env(),
                          timeout=timeout)


def expect_error(capsys, args, message):
    """``mhc ARGS`` (through ``main``) exits 2 with ``message`` in its one-paragraph error, no traceback."""
    from torch_mhc.cli import main

    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, (args, err)
    return err
