"""What a resumed run may change, and how the change reaches the optimizer and the record.

``config.RESUME_MAY_CHANGE`` lists the settings a ``--resume`` may change; ``resume_changes`` refuses
the rest by name. The optimizer's param groups take the new lr, weight_decay and
connection_lr_scale explicitly (a loaded optimizer state would otherwise keep the old ones), and
every resume appends what changed to ``RUN_DIR/resumes.jsonl`` while ``config.json`` is rewritten
with the settings in force, so the run's record tells the truth.

The token data is fingerprinted (SHA-256 of the token values, stored in each checkpoint): a resume
whose data differs from the run's is refused unless ``--allow-data-change`` is given.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from torch_mhc.train.config import UserError

SCHEDULE_KEYS = ("lr", "weight_decay", "connection_lr_scale", "schedule", "warmup", "min_lr_ratio", "steps")


def apply_optimizer_settings(optimizer, scheduler, new_groups: list[dict], factor: float) -> None:
    """Give a loaded optimizer the lr and weight decay of ``new_groups`` (fresh param groups of the
    current config, in the same order) and set each group's current lr to its base lr x ``factor``
    (the schedule's multiplier at the resumed step)."""
    if len(new_groups) != len(optimizer.param_groups) or any(
        len(g["params"]) != len(n["params"]) for g, n in zip(optimizer.param_groups, new_groups)
    ):
        raise UserError("the checkpoint's optimizer has other parameter groups than this model; "
                        "resume with the config the run was started with.")
    for i, (group, new) in enumerate(zip(optimizer.param_groups, new_groups)):
        group["weight_decay"] = new["weight_decay"]
        group["initial_lr"] = new["lr"]
        group["lr"] = new["lr"] * factor
        scheduler.base_lrs[i] = new["lr"]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def data_fingerprint(meta: dict, source: str) -> dict:
    """What identifies the training tokens: the source as configured, the count and their SHA-256."""
    return {"source": source, "tokens": meta.get("tokens"), "sha256": meta.get("sha256")}


def check_data(saved: dict | None, current: dict, allow_change: bool) -> str | None:
    """None when the data is what the run trained on (or the checkpoint predates fingerprints); else
    a note of the change when ``allow_change``, a UserError otherwise."""
    if not saved or not saved.get("sha256") or saved.get("sha256") == current.get("sha256"):
        return None
    note = (f"the training data changed since the checkpoint was written: {saved.get('source') or 'default corpus'} "
            f"had {saved.get('tokens')} tokens (sha256 {saved['sha256'][:12]}...), now {current.get('tokens')} "
            f"(sha256 {str(current.get('sha256'))[:12]}...)")
    if not allow_change:
        raise UserError(f"{note}. Resuming on other data would not continue the same run; restore the data, "
                        "or pass --allow-data-change to continue on the new data (recorded in resumes.jsonl).")
    return note


def record_resume(run_dir: Path, from_step: int, checkpoint: Path, changes: dict, data_note: str | None) -> None:
    """Append one line to ``resumes.jsonl``: when, from which checkpoint, and what changed."""
    from torch_mhc.train.rundir import append_jsonl

    record = {"time": datetime.now().isoformat(timespec="seconds"), "from_step": from_step,
              "checkpoint": checkpoint.name, "changes": changes}
    if data_note:
        record["data_changed"] = data_note
    append_jsonl(Path(run_dir) / "resumes.jsonl", record)
