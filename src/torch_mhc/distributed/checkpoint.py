"""Distributed checkpoints through ``torch.distributed.checkpoint`` (DCP), with a crash-safe commit.

Layout: ``RUN_DIR/checkpoints/dcp_step_XXXXXXX/`` holds DCP's shard files and ``.metadata`` for the
model and optimizer (keys are parameter names, so a checkpoint saved on N ranks loads on M ranks
and on any mesh: DCP reshards), plus ``trainer.pt`` (step, scheduler, config, RNG, layout).

Commit: every rank writes into ``.dcp_step_XXXXXXX.tmp/``; when DCP's save has returned on all
ranks (its metadata is written last, by rank 0, after every shard), rank 0 writes ``trainer.pt``,
fsyncs and renames the directory to its final name. A crash at any point before the rename leaves
only a ``.tmp`` directory, which is ignored (and removed by the next save): the previous checkpoint
stays the latest one. Needs a file system every rank can see (as DCP's file writer does).

Integrity and safety, as for single-process checkpoints: before the rename, ``checksums.sha256``
(``sha256sum -c`` format) records the SHA-256 of every file in the directory (the hashing shared
among the ranks); a load verifies every file against it first (shared among the ranks again) and
refuses a directory with a changed, missing or unlisted file. Nothing is unpickled with code:
``.metadata`` (which DCP reads with plain ``pickle``) through an allowlist of DCP's own metadata
classes, ``trainer.pt`` and DCP's byte items with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from torch_mhc.distributed.tensor_parallel import shard_like, whole_tensor
from torch_mhc.errors import UserError
from torch_mhc.serialization import file_sha256, load_torch_file, restricted_unpickle, write_atomically

DCP_RE = re.compile(r"^dcp_step_(\d+)$")
TRAINER_FILE = "trainer.pt"
MANIFEST = "checksums.sha256"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when there is no process group; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gathered(local: dict) -> dict:
    """The union of every rank's ``local`` dict (``local`` itself without a process group)."""
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


# ------------------------------------------------------------------ loading without running code
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


def _metadata_global(module: str, name: str) -> bool:
    """What DCP's ``.metadata`` may name: its own metadata dataclasses, storage info, sizes, paths and
    torch's dtypes, layouts and memory formats; nothing that runs code."""
    if (module, name) in _METADATA_GLOBALS:
        return True
    obj = getattr(sys.modules.get(module), name, None)
    if module == _METADATA_MODULE:
        return isinstance(obj, type) and obj.__module__ == module
    return module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` unpickled through :func:`_metadata_global` (torch uses
    plain ``pickle.load``). Tensors are read as DCP reads them (``weights_only=True``)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = restricted_unpickle(f, _metadata_global, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with its byte items (the optimizer's hyperparameters) unpickled with
    ``weights_only=True`` (DCP itself unpickles them with no allowlist)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.refusal = path, None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = load_torch_file(value, "distributed checkpoint", f"{self.path} (item {read_item.dest_index.fqn})")
        except UserError as e:
            self.refusal = e  # DCP wraps what its readers raise: _load raises this one
            raise
        vetted = io.BytesIO()
        torch.save(obj, vetted)  # DCP's own bookkeeping, on bytes made from the vetted object
        vetted.seek(0)
        super().load_bytes(read_item, vetted)


def _load(state: dict, path: Path, no_dist: bool) -> None:
    planner = SafePlanner(path)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=SafeReader(path), planner=planner, no_dist=no_dist)
    except BaseException:  # DCP's CheckpointException is a BaseException
        if planner.refusal is not None:
            raise planner.refusal from None
        raise


# ------------------------------------------------------------------ integrity
def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MANIFEST)


def _hash_shared(path: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of ``path/name`` for every name, each rank hashing every world-size-th file."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return _gathered({n: file_sha256(path / n) for n in names[rank::_world()]})


def _read_manifest(path: Path) -> dict[str, str]:
    """``{file name: SHA-256}`` from ``path/checksums.sha256``; UserError when it is missing or unreadable."""
    try:
        lines = (path / MANIFEST).read_text().splitlines()
        return {name: digest for digest, name in (line.split(None, 1) for line in lines if line.strip())}
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(
            f"distributed checkpoint {path} has no readable {MANIFEST}, so it cannot be verified (an interrupted "
            f"or older torch-mhc save, or a copy). If you know it is good, record its checksums with "
            f"`sha256sum .metadata * > {MANIFEST}` in {path}.") from None


def _committed(path: str | Path) -> Path:
    path = Path(path)
    if not (path / TRAINER_FILE).is_file() or not (path / ".metadata").is_file():
        raise UserError(f"{path} is not a committed distributed checkpoint (no {TRAINER_FILE} or .metadata).")
    return path


def verify_dcp_checkpoint(path: str | Path) -> None:
    """Collective under a process group: raise UserError (on every rank) unless every file of the
    checkpoint directory ``path`` matches ``checksums.sha256`` and no file is missing or unlisted."""
    path = _committed(path)
    expected = _read_manifest(path)  # every rank sees the same shared directory: all raise, or all go on
    present = _files(path)
    actual = _hash_shared(path, [n for n in sorted(expected) if n in present])
    problems = [f"{n}: missing" for n in sorted(expected) if n not in present]
    problems += [f"{n}: not listed in {MANIFEST}" for n in present if n not in expected]
    problems += [f"{n}: SHA-256 differs" for n in sorted(actual) if actual[n] != expected[n]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"distributed checkpoint {path} is corrupt: {'; '.join(problems[:3])}{more}. It was not "
                        "loaded; delete it (or move it aside) to fall back on an earlier checkpoint of the run.")


def dcp_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"dcp_step_{step:07d}"


def list_dcp_checkpoints(run_dir: str | Path) -> list[Path]:
    """Committed distributed checkpoints of a run, oldest first (``.tmp`` directories are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := DCP_RE.match(p.name)) and (p / TRAINER_FILE).is_file() and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """The one atomic step: the fully written ``tmp`` directory becomes ``final``."""
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _is_strided(v) -> bool:
    return isinstance(v, DTensor) and any(isinstance(p, _StridedShard) for p in v.placements)


def _map_tensors(tree, fn):
    """``tree`` (nested dicts / lists of a state dict) with every tensor leaf replaced by ``fn(leaf)``."""
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_tensors(v, fn) for v in tree]
    return fn(tree) if isinstance(tree, torch.Tensor) else tree


def _unstrided(tree):
    """DCP does not store ``_StridedShard`` layouts (the tensor-parallel fused qkv, and FSDP over
    tensor parallel): gather those tensors whole (one weight each), so the file layout is the plain
    global tensor."""
    return _map_tensors(tree, lambda v: whole_tensor(v) if _is_strided(v) else v)


def _restrided(loaded, like):
    """Cut the whole tensors of :func:`_unstrided` back into ``like``'s strided layouts."""
    if isinstance(like, dict):
        return {k: _restrided(loaded[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_restrided(a, b) for a, b in zip(loaded, like)]
    if _is_strided(like):
        return shard_like(loaded, like)
    return loaded


def save_distributed(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Writes ``dcp_step_<step>`` and keeps the newest ``keep``."""
    final = dcp_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = _unstrided({"model": model_sd, "optim": optim_sd})
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    digests = _hash_shared(tmp, _files(tmp))  # DCP's shards and .metadata, all written when dcp.save returns
    if _rank() == 0:
        state = {**trainer_state, "step": step, "rng": torch.get_rng_state(), "world_size": _world()}
        with open(tmp / TRAINER_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digests[TRAINER_FILE] = file_sha256(tmp / TRAINER_FILE)
        (tmp / MANIFEST).write_text("".join(f"{d}  {n}\n" for n, d in sorted(digests.items())))
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _commit(tmp, final)
        for old in list_dcp_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def read_trainer_state(path: str | Path) -> dict:
    """``trainer.pt`` of a committed checkpoint directory, checked against ``checksums.sha256`` and
    loaded with ``weights_only=True`` (UserError when it is not one, or does not verify)."""
    path = _committed(path)
    if _read_manifest(path).get(TRAINER_FILE) != file_sha256(path / TRAINER_FILE):
        raise UserError(f"distributed checkpoint {path} is corrupt: {TRAINER_FILE}: SHA-256 differs from "
                        f"{MANIFEST} (or is not listed). It was not loaded.")
    return _trainer_state(path)


def _trainer_state(path: Path) -> dict:
    """``trainer.pt`` loaded with ``weights_only=True``, once its checksum has been checked."""
    trainer = path / TRAINER_FILE
    state = load_torch_file(trainer, "distributed checkpoint file")
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{trainer} is not a torch-mhc trainer state (no step).")
    return state


def tensor_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor a DCP checkpoint holds, by flattened key (``model.embed.weight``)."""
    try:
        meta = SafeReader(str(path)).read_metadata()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the DCP metadata of {path} ({type(e).__name__}: {e}).") from None
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def check_model_fits(path: str | Path, model_sd: dict, model_keys: set | None = None) -> None:
    """UserError naming the first keys whose shapes differ between the checkpoint and the model. ``model_keys``:
    the whole model's keys when ``model_sd`` is a part of it (a pipeline stage's); default ``model_sd``'s."""
    saved = {k[len("model."):]: v[0] for k, v in tensor_shapes(path).items() if k.startswith("model.")}
    mine = {k: tuple(v.shape) for k, v in model_sd.items()}
    problems = [f"{k}: missing in the checkpoint" for k in mine if k not in saved]
    problems += [f"{k}: not in this model" for k in saved if k not in (mine if model_keys is None else model_keys)]
    problems += [f"{k}: checkpoint {saved[k]} vs model {mine[k]}" for k in mine if k in saved and saved[k] != mine[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path} does not fit this model (another model shape or connection): "
                        f"{'; '.join(problems[:3])}{more}. Resume with the config the run was started with.")


def load_distributed(path: str | Path, model, optimizer=None, model_keys: set | None = None) -> dict:
    """Collective: load a DCP checkpoint into ``model`` (and ``optimizer``) on any number of ranks and
    any mesh; returns the trainer state (step, scheduler, config, ...). ``model``: also one rank's part of
    the model (pipeline stages), which loads its own keys; ``model_keys`` then names the whole model's."""
    path = Path(path)
    verify_dcp_checkpoint(path)  # every file, trainer.pt included
    trainer_state = _trainer_state(path)
    opts = StateDictOptions(strict=True)
    if optimizer is None:
        like = {"model": get_state_dict(model, [])[0]}
        check_model_fits(path, like["model"], model_keys)
        state = _unstrided(like)
        _load(state, path, no_dist=not dist.is_initialized())
        state = _restrided(state, like)
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=opts)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_model_fits(path, model_sd, model_keys)
        like = {"model": model_sd, "optim": optim_sd}
        state = _unstrided(like)
        _load(state, path, no_dist=not dist.is_initialized())
        state = _restrided(state, like)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)
    return trainer_state


def export_weights(path: str | Path, out: str | Path) -> Path:
    """Gather the model tensors of a DCP checkpoint into one safetensors file (one process, no model needed)."""
    path, out = Path(path), Path(out)
    verify_dcp_checkpoint(path)
    _trainer_state(path)  # a torch-mhc checkpoint through and through, or refused as any load would
    shapes = {k: v for k, v in tensor_shapes(path).items() if k.startswith("model.")}
    if not shapes:
        raise UserError(f"{path} holds no model tensors.")
    state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    _load(state, path, no_dist=True)
    tensors = {k[len("model."):]: v.contiguous() for k, v in state.items()}
    return save_safetensors(tensors, out, {"format": "pt", "source": str(path)})


def save_safetensors(tensors: dict, out: str | Path, metadata: dict) -> Path:
    """``safetensors.torch.save_file`` through a temporary file beside ``out``, renamed into place: nothing
    half-written is left, and a full disk or a read-only file system (safetensors raises SafetensorError)
    is a UserError naming ``out``. ``out`` must not be a directory."""
    from safetensors.torch import save_file

    out = check_weights_file(out)
    return write_atomically(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def check_weights_file(out: str | Path) -> Path:
    """``out`` as a Path; UserError when it is a directory (export-weights writes one file)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; export-weights writes one .safetensors file: give its path "
                        f"(e.g. {out / 'model.safetensors'}). Nothing was written.")
    return out
