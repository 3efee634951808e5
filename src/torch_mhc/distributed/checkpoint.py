"""Distributed checkpoints through ``torch.distributed.checkpoint`` (DCP), with a crash-safe commit.

Layout: ``RUN_DIR/checkpoints/dcp_step_XXXXXXX/`` holds DCP's shard files and ``.metadata`` for the
model and optimizer (keys are parameter names, so a checkpoint saved on N ranks loads on M ranks
and on any mesh: DCP reshards), plus ``trainer.pt`` (step, scheduler, config, RNG, layout).

Commit: every rank writes into ``.dcp_step_XXXXXXX.tmp/``; when DCP's save has returned on all
ranks (its metadata is written last, by rank 0, after every shard), rank 0 writes ``trainer.pt``,
fsyncs and renames the directory to its final name. A crash at any point before the rename leaves
only a ``.tmp`` directory, which is ignored (and removed by the next save): the previous checkpoint
stays the latest one. Needs a file system every rank can see (as DCP's file writer does).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from torch_mhc.errors import UserError

DCP_RE = re.compile(r"^dcp_step_(\d+)$")
TRAINER_FILE = "trainer.pt"


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
    """DCP does not store ``_StridedShard`` layouts (the tensor-parallel fused qkv): gather those
    tensors whole (one layer's qkv each), so the file layout is the plain global tensor."""
    return _map_tensors(tree, lambda v: v.full_tensor() if _is_strided(v) else v)


def _restrided(loaded, like):
    """Scatter the whole tensors of :func:`_unstrided` back into ``like``'s strided layouts."""
    if isinstance(like, dict):
        return {k: _restrided(loaded[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_restrided(a, b) for a, b in zip(loaded, like)]
    if _is_strided(like):
        return distribute_tensor(loaded, like.device_mesh, like.placements)
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
    if _rank() == 0:
        state = {**trainer_state, "step": step, "rng": torch.get_rng_state(),
                 "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        with open(tmp / TRAINER_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
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
    """``trainer.pt`` of a committed checkpoint directory (UserError when it is not one)."""
    path = Path(path)
    if not (path / TRAINER_FILE).is_file() or not (path / ".metadata").is_file():
        raise UserError(f"{path} is not a committed distributed checkpoint (no {TRAINER_FILE} or .metadata).")
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise UserError(f"{path / TRAINER_FILE} is corrupt ({type(e).__name__}: {e}).") from None


def tensor_shapes(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor a DCP checkpoint holds, by flattened key (``model.embed.weight``)."""
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the DCP metadata of {path} ({type(e).__name__}: {e}).") from None
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def check_model_fits(path: str | Path, model_sd: dict) -> None:
    """UserError naming the first keys whose shapes differ between the checkpoint and the model."""
    saved = {k[len("model."):]: v[0] for k, v in tensor_shapes(path).items() if k.startswith("model.")}
    mine = {k: tuple(v.shape) for k, v in model_sd.items()}
    problems = [f"{k}: missing in the checkpoint" for k in mine if k not in saved]
    problems += [f"{k}: not in this model" for k in saved if k not in mine]
    problems += [f"{k}: checkpoint {saved[k]} vs model {mine[k]}" for k in mine if k in saved and saved[k] != mine[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"checkpoint {path} does not fit this model (another model shape or connection): "
                        f"{'; '.join(problems[:3])}{more}. Resume with the config the run was started with.")


def load_distributed(path: str | Path, model, optimizer=None) -> dict:
    """Collective: load a DCP checkpoint into ``model`` (and ``optimizer``) on any number of ranks and
    any mesh; returns the trainer state (step, scheduler, config, ...)."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    opts = StateDictOptions(strict=True)
    if optimizer is None:
        like = {"model": get_state_dict(model, [])[0]}
        check_model_fits(path, like["model"])
        state = _unstrided(like)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        state = _restrided(state, like)
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={}, options=opts)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        check_model_fits(path, model_sd)
        like = {"model": model_sd, "optim": optim_sd}
        state = _unstrided(like)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        state = _restrided(state, like)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)
    return trainer_state


def export_weights(path: str | Path, out: str | Path) -> Path:
    """Gather the model tensors of a DCP checkpoint into one safetensors file (one process, no model needed)."""
    path, out = Path(path), Path(out)
    shapes = {k: v for k, v in tensor_shapes(path).items() if k.startswith("model.")}
    if not shapes:
        raise UserError(f"{path} holds no model tensors.")
    state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    tensors = {k[len("model."):]: v.contiguous() for k, v in state.items()}
    return save_safetensors(tensors, out, {"format": "pt", "source": str(path)})


def save_safetensors(tensors: dict, out: str | Path, metadata: dict) -> Path:
    """``safetensors.torch.save_file`` through a temporary file beside ``out``, renamed into place: nothing
    half-written is left, and a full disk or a read-only file system (safetensors raises SafetensorError)
    is a UserError naming ``out``. ``out`` must not be a directory."""
    from safetensors.torch import save_file

    from torch_mhc.errors import discard, write_error

    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a directory; export-weights writes one .safetensors file: give its path "
                        f"(e.g. {out / 'model.safetensors'}). Nothing was written.")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    except Exception as e:
        error = write_error(e, out, "run the command again", "nothing was written")
        discard(tmp)  # after write_error: a full disk is seen full
        if error is not None:
            raise error from None
        raise
    return out
