"""One writer per run directory, and files that survive kills and full disks.

A run directory is claimed with ``fcntl.flock`` on ``RUN_DIR/.lock`` for as long as the run trains;
the kernel releases the lock when the process ends in any way (also ``kill -9``), so a stale lock
never blocks a resume. A second ``mhc train`` on the same directory (a new run of the same
``run_name`` or a concurrent ``--resume``) stops with exit code 2 and the first one's pid.

A new run that fails before it logs anything (bad data, a wrong device, ...) removes the directory it
created, so failed starts leave nothing behind. Claiming an existing run for a resume removes what a
killed process left half-written: temporary checkpoint files and a partial last line of the JSONL logs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from datetime import datetime
from pathlib import Path

from torch_mhc.distributed.checkpoint import list_dcp_checkpoints
from torch_mhc.errors import write_error
from torch_mhc.train.checkpoint import _write_via_temp, clean_stale_files, list_checkpoints, raise_if_disk_full
from torch_mhc.train.config import UserError

LOCK_NAME = ".lock"
LOGS = ("metrics.jsonl", "diagnostics.jsonl", "grad_norms.jsonl", "resumes.jsonl")
# what a run writes in its directory: one that holds nothing else and no checkpoint (stopped before its first
# checkpoint) is started again by a new run of the same name
RUN_FILES = {LOCK_NAME, "config.json", "tokenizer.json", "tb", "checkpoints", *LOGS}


def check_dir_path(path: str | Path, key: str) -> Path:
    """UserError naming ``key`` when ``path`` or one of its parents exists and is not a directory
    (checked before any work, so a bad output path fails fast and creates nothing)."""
    path = Path(path)
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{key}={path} cannot be a directory: {blocker} is a file. Choose another {key}.")
    return path


def ensure_dir(path: str | Path, key: str) -> Path:
    """Create directory ``path`` (and parents); UserError naming ``key`` when it, or a parent, is a file."""
    path = check_dir_path(path, key)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        check_dir_path(path, key)
        raise
    except PermissionError as e:
        raise UserError(f"{key}={path}: cannot create the directory ({e.strerror}).") from None
    except OSError as e:
        raise_dir_error(e, path, key)
        raise
    return path


def raise_dir_error(error: OSError, path: Path, key: str) -> None:
    """UserError naming ``key`` when creating directory ``path`` failed on a full disk or a read-only file system."""
    if (e := write_error(error, path, "run the command again", "nothing was written")) is not None:
        raise UserError(f"{key}: {e}") from None
    if isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG:
        raise UserError(f"{key}={path}: a name in the path is too long for the file system "
                        f"({error.strerror}). Choose a shorter {key}.") from None


class RunDir:
    """A claimed run directory (a context manager): holds the lock until ``release`` or the end of the
    ``with`` block. ``new``: a new run (everything in the directory is this process's); ``made``: this
    process created the directory."""

    def __init__(self, path: Path, fd: int, new: bool, made: bool = False):
        self.path, self._fd, self.new, self.made = path, fd, new, made

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.new and not _has_results(self.path):  # a failed start leaves nothing
            if self.made:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                for p in self.path.iterdir():
                    if p.name != LOCK_NAME:
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the flock
            self._fd = -1


def _restartable(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run stopped before its first checkpoint: nothing in it but what a run writes
    (logs, config, TensorBoard events, temporary checkpoint files), and no checkpoint to resume from."""
    if list_checkpoints(run_dir) or list_dcp_checkpoints(run_dir):
        return False
    return all(p.name in RUN_FILES for p in run_dir.iterdir())


def _has_results(run_dir: Path) -> bool:
    """Whether a run directory holds anything worth keeping: a checkpoint or a logged record."""
    if list_checkpoints(run_dir):
        return True
    return any((run_dir / name).is_file() and (run_dir / name).stat().st_size > 0 for name in LOGS)


def _lock(run_dir: Path) -> int:
    """flock ``run_dir/.lock`` without waiting; returns the open descriptor. UserError naming the
    holder when another process has it."""
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise_if_disk_full(e, path)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"run directory {run_dir} is in use by {holder}: one process writes a run at a time. Wait for it "
                "to finish (or stop it), then --resume; or choose another run_name."
            ) from None
        try:  # the file we locked must still be the one at the path (another process may have removed it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = f"pid {os.getpid()} on {socket.gethostname()} (since {datetime.now().isoformat(timespec='seconds')})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return fd


def claim_new_run_dir(out_dir: str | Path, run_name: str, default_prefix: str) -> RunDir:
    """Create and lock a fresh run directory: ``out_dir/run_name``, or ``out_dir/PREFIX-TIMESTAMP[-k]``
    when ``run_name`` is empty. Never reuses a directory that holds files."""
    out = ensure_dir(out_dir, "out_dir")
    if run_name:
        run_dir = out / run_name
        try:
            run_dir.mkdir()
            made = True
        except FileExistsError:
            if not run_dir.is_dir():
                raise UserError(f"{run_dir} exists and is a file; choose another run_name.") from None
            made = False
        except OSError as e:
            raise_dir_error(e, run_dir, "out_dir")
            raise
        fd = _lock(run_dir)
        if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            if not _restartable(run_dir):
                os.close(fd)
                raise UserError(
                    f"run directory {run_dir} already exists and is not empty; nothing was overwritten. "
                    f"Continue it with --resume {run_dir}, or choose another run_name."
                )
            print(f"warning: run directory {run_dir} holds no checkpoint (the run was stopped before its first "
                  "one): starting it again from step 0; its earlier logs are replaced.", file=sys.stderr)
            for p in run_dir.iterdir():
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        return RunDir(run_dir, fd, new=True, made=made)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    k = 1
    while True:
        run_dir = out / (f"{default_prefix}-{stamp}" + (f"-{k}" if k > 1 else ""))
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            k += 1
        except OSError as e:
            raise_dir_error(e, run_dir, "out_dir")
            raise
    return RunDir(run_dir, _lock(run_dir), new=True, made=True)


def claim_run_dir(run_dir: str | Path) -> RunDir:
    """Lock an existing run directory for a resume and repair what a killed writer left: stale
    temporary checkpoint files and a partial last line of each JSONL log."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist.")
    claim = RunDir(run_dir, _lock(run_dir), new=False)
    clean_stale_files(run_dir)
    for name in LOGS:
        drop_partial_last_line(run_dir / name)
    return claim


def drop_partial_last_line(path: Path) -> bool:
    """Truncate a JSONL file after its last complete line (a kill or a full disk can leave half a
    record without its newline); returns whether anything was cut."""
    if not path.is_file():
        return False
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
    print(f"warning: dropped a partial last line of {path} ({size - keep} bytes, left by an interrupted write)",
          file=sys.stderr)
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file; a full disk is a UserError."""
    tmp = _write_via_temp(path, lambda f: f.write(text.encode()))
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush; a full disk is a UserError naming the file."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise_if_disk_full(e, path)
        raise
