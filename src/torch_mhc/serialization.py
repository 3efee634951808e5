"""Loading files without running their code.

A pickle can call any function while it loads, and a checksum only proves that a file is the one that
was written, not that it is safe: checkpoints get shared. So every file torch-mhc unpickles goes
through one of two doors:

- :func:`load_torch_file`: ``torch.load(weights_only=True)`` with an allowlist of exactly the
  non-tensor types torch-mhc writes (numpy's RNG state: an ``ndarray`` of ``uint32``);
- :func:`restricted_unpickle`: a ``pickle.Unpickler`` whose ``find_class`` answers only the names a
  caller allows (DCP's ``.metadata``, which torch itself reads with plain ``pickle.load``).

Anything else in a file is refused with a :class:`UserError` naming the file and the global it asked for.
:func:`write_atomically` is the matching door out: a file appears whole or not at all, with the usual mode.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from torch_mhc.errors import UserError, discard, write_error

#: The globals a torch-mhc checkpoint may hold besides tensors and plain Python values: numpy's
#: ``RandomState.get_state()`` (an ``ndarray`` of ``uint32``) in single-process checkpoints.
_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
CHECKPOINT_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
                      (_reconstruct, "numpy.core.multiarray._reconstruct")]  # as numpy 1.x pickles name it

_UNSUPPORTED = re.compile(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)")  # torch's two wordings


def refused(path: str | Path, what: str) -> UserError:
    """The error for a file that asks to run or build something torch-mhc never writes."""
    return UserError(
        f"{path} was not loaded: it asks for {what}, which a torch-mhc file never holds, and loading it could run "
        "code. A checksum only shows the file is the one that was written, not that it is safe: load checkpoints "
        "only from people you trust, and delete or move this one aside."
    )


def load_torch_file(source, what: str = "checkpoint", name: str | Path | None = None):
    """``torch.load(source, weights_only=True)`` on the CPU with :data:`CHECKPOINT_GLOBALS` allowed;
    ``source`` is a path or a binary file (then ``name`` says what it is in messages).

    UserError naming the file when it asks for any other global (nothing of it runs) or cannot be
    read (truncated, corrupt)."""
    name = source if name is None else name
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = _UNSUPPORTED.search(str(e))
            raise refused(name, f"the Python global {found.group(1)}" if found else "a Python object") from None
        raise _unreadable(name, what, e) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise many types
        raise _unreadable(name, what, e) from None


def _unreadable(path, what: str, e: Exception) -> UserError:
    return UserError(f"{what} {path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}). "
                     "Delete it to fall back on an earlier checkpoint of the run, or start a new run.")


def restricted_unpickle(file, allowed: Callable[[str, str], bool], path: str | Path):
    """``pickle.load(file)`` where a global ``module.name`` resolves only when ``allowed(module, name)``;
    UserError naming ``path`` (and the global) otherwise, before anything is called."""

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if not allowed(module, name):
                raise refused(path, f"the Python global {module}.{name}")
            return super().find_class(module, name)

    try:
        return _Restricted(file).load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}).") from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def usual_permissions(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a new file or folder gets: 0666 / 0777
    less the umask (0644 / 0755 usually), not the 0600 that some writers (safetensors) create files with."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_atomically(path: str | Path, write, then: str = "run the command again",
                     note: str = "nothing was written") -> Path:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix, so numpy adds none), renamed to
    ``path``. On any failure the temporary file is removed; a full disk or a read-only file system,
    whatever the writing library raised, is a UserError naming ``path`` (``note``: what state things
    are in; ``then``: what to run once there is space)."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        error = write_error(e, path, then, note)
        discard(tmp)  # after write_error: a full disk is seen full
        if error is not None:
            raise error from None
        raise
    return path
