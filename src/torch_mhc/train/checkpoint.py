"""Atomic, verified checkpoints.

``checkpoints/step_XXXXXXX.pt`` is written to a temporary file in the same directory and flushed to
disk; its SHA-256 goes to ``step_XXXXXXX.pt.sha256`` (``sha256sum`` format, written atomically
first), then the temporary file is renamed over the final name. So every finished checkpoint has a
checksum, a crash mid-write leaves the previous checkpoints intact, and a later bit flip is caught:
``load_checkpoint`` verifies the checksum before it unpickles anything, and unpickles with
``weights_only=True`` (``serialization.load_torch_file``): a file that asks to run code is refused.
A checkpoint without a valid checksum is never loaded, and pruning never counts it as one of the
``keep`` newest.

A checkpoint holds the model, optimizer, scheduler, step, RNG states and the run's config. Only
finite weights are saved (``save_checkpoint`` raises ``DivergedError`` otherwise), so the newest
checkpoint of a diverged run is the last good one.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from torch_mhc.distributed.checkpoint import DCP_RE, list_dcp_checkpoints
from torch_mhc.errors import discard, write_error
from torch_mhc.serialization import file_sha256, load_torch_file
from torch_mhc.train.config import DivergedError, UserError

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
TEMP_RE = re.compile(r"^\.(step_\d+\.pt(\.sha256)?)\.tmp\d+$")
HASH_SUFFIX = ".sha256"

# (path, size, mtime_ns) -> True for files this process hashed and found valid: a checkpoint is read
# in full at most once per process (when it is written, or on its first load).
_verified: set[tuple[str, int, int]] = set()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary and checksum files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def hash_path(path: Path) -> Path:
    return path.with_name(path.name + HASH_SUFFIX)


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_via_temp(path: Path, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` and fsync it; returns the temporary
    path (the caller renames it). Removes the temporary file on any failure; a full disk or a
    read-only file system is a UserError naming the path, whatever the writing library raised."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        error = disk_error(e, path)  # before the temporary file goes: a full disk is seen full
        discard(tmp)
        if error is not None:
            raise error from None
        raise
    return tmp


def disk_error(error: BaseException, path: str | Path) -> UserError | None:
    """The UserError for a write of ``path`` that failed on a full disk, an exhausted quota or a
    read-only file system (None otherwise), whatever the library that wrote raised (torch.save's
    "unexpected pos", numpy's "N requested and M written", safetensors' SafetensorError)."""
    return write_error(error, path, "continue with --resume",
                       "nothing finished was lost: the previous checkpoints are intact and a partly written log "
                       "line is dropped on resume")


def raise_if_disk_full(error: BaseException, path: str | Path) -> None:
    """Turn a full disk, an exhausted quota or a read-only file system while writing ``path`` into a UserError."""
    if (e := disk_error(error, path)) is not None:
        raise e from None


def atomic_save(obj, path: Path) -> str:
    """torch.save to ``path`` through a temporary file, a checksum file and an atomic rename;
    returns the SHA-256 of the bytes written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_if_disk_full(e, path.parent)
        raise
    tmp = _write_via_temp(path, lambda f: torch.save(obj, f))
    try:
        digest = file_sha256(tmp)
        write_hash_file(path, digest)
        try:
            os.replace(tmp, path)
        except BaseException as e:
            if not path.exists():
                hash_path(path).unlink(missing_ok=True)
            raise_if_disk_full(e, path)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    _verified.add(_stat_key(path))
    return digest


def write_hash_file(path: Path, digest: str) -> None:
    """``path.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it), written atomically."""
    target = hash_path(path)
    tmp = _write_via_temp(target, lambda f: f.write(f"{digest}  {path.name}\n".encode()))
    try:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def verify_checkpoint(path: str | Path) -> None:
    """Raise UserError unless ``path`` exists and matches its ``.sha256`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    if _stat_key(path) in _verified:
        return
    sidecar = hash_path(path)
    if not sidecar.is_file():
        raise UserError(
            f"checkpoint {path} has no checksum file {sidecar.name}, so it cannot be trusted (an interrupted save, a "
            f"copied file or an older torch-mhc).{_older_hint(path)} If you know the file is good, record its "
            f"checksum with `sha256sum {path.name} > {sidecar.name}` in {path.parent}."
        )
    expected = sidecar.read_text().split()[:1]
    actual = file_sha256(path)
    if expected != [actual]:
        raise UserError(
            f"checkpoint {path} is corrupt: its SHA-256 ({actual[:16]}...) does not match {sidecar.name} "
            f"({(expected or ['nothing'])[0][:16]}...); it was not loaded.{_older_hint(path)}"
        )
    _verified.add(_stat_key(path))


def is_verified(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except UserError:
        return False
    return True


def _older_hint(path: Path) -> str:
    """Name the newest older checkpoint of the same run that verifies (what a resume could use)."""
    if not CKPT_RE.match(path.name):
        return ""
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    good = next((p for p in reversed(older) if is_verified(p)), None)
    if good is None:
        return " No older checkpoint of this run verifies."
    return (f" The newest older checkpoint that verifies is {good}; to continue from it, move the bad file "
            f"aside (e.g. `mv {path} {path}.bad`) and run the command again.")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_finite_state(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (one device sync)."""
    flags = [torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, config: dict, extra: dict, keep: int) -> Path:
    """Write ``checkpoints/step_XXXXXXX.pt`` atomically with its checksum and keep the newest ``keep``
    verified checkpoints. Refuses (DivergedError) to save non-finite weights."""
    if not is_finite_state(model):
        raise DivergedError(step, "the model weights are not finite", config, "no checkpoint was written")
    path = checkpoint_dir(run_dir) / f"step_{step:07d}.pt"
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "config": config,
        **extra,
    }
    atomic_save(state, path)
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete checkpoints older than the newest ``keep`` that verify. A checkpoint that does not verify
    is never counted, so a bad newer file never costs a good older one; one without a checksum file
    (not written by this code) is never deleted."""
    kept, removed = 0, []
    for p in reversed(list_checkpoints(run_dir)):
        if kept < keep:
            kept += is_verified(p)
            continue
        if hash_path(p).is_file():  # checksummed: ours; an unchecked file is left for the user to judge
            p.unlink()
            hash_path(p).unlink(missing_ok=True)
            removed.append(p)
    return removed


def clean_stale_files(run_dir) -> list[Path]:
    """Remove what a killed save leaves in ``checkpoints/``: temporary files and checksum files whose
    checkpoint was never renamed into place. Call only while holding the run directory."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    removed = []
    for p in d.iterdir():
        orphan_hash = p.name.endswith(HASH_SUFFIX) and not p.with_name(p.name[: -len(HASH_SUFFIX)]).exists()
        if TEMP_RE.match(p.name) or orphan_hash:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """Load a checkpoint file after checking its checksum; UserError with what to do when it is
    missing, unverified or unreadable."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    elif not path.is_file():
        raise UserError(f"checkpoint {path} does not exist.")
    state = load_torch_file(path)  # weights_only: nothing in the file runs
    if not isinstance(state, dict) or not {"step", "model", "config"} <= state.keys():
        raise UserError(f"{path} is not a torch-mhc checkpoint (missing step, model or config).")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist.")
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(
            f"run directory {run_dir} has no checkpoint (looked for {checkpoint_dir(run_dir)}/step_*.pt). "
            "Start a new run instead of --resume, or point at the right directory."
        )
    return found[-1]


def load_model_state(model, state_dict: dict, path) -> None:
    """load_state_dict with a readable error when the checkpoint is of another model shape."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        raise UserError(
            f"checkpoint {path} does not fit this model (another model shape or connection): {detail}. "
            "Resume with the config the run was started with, or start a new run."
        ) from None


def latest_any_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run: a single-process ``step_*.pt`` file or a distributed
    ``dcp_step_*`` directory (UserError, as for single-process runs, when there is none)."""
    dcps = list_dcp_checkpoints(run_dir)
    if not dcps:
        return latest_checkpoint(run_dir)
    pts = list_checkpoints(run_dir)
    if pts and int(CKPT_RE.match(pts[-1].name).group(1)) > int(DCP_RE.match(dcps[-1].name).group(1)):
        return pts[-1]
    return dcps[-1]
