"""Training configuration: one dataclass with the model's nested inside, loaded from TOML or JSON
files and ``key=value`` overrides (``lr=3e-4``, ``model.connection=hc``)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch_mhc.distributed.mesh import ParallelConfig
from torch_mhc.errors import UserError
from torch_mhc.models.decoder import ModelConfig


class DivergedError(UserError):
    """Training produced a non-finite loss, gradient norm or weights at ``step``. Nothing non-finite
    was saved: the run's newest checkpoint (if any) holds the last finite weights."""

    def __init__(self, step: int, problem: str, config, note: str = ""):
        self.step = step
        cfg = config if isinstance(config, dict) else config.to_dict()
        lr, clip = cfg.get("lr"), cfg.get("grad_clip")
        hints = [f"lower lr (it is {lr:g}; e.g. lr={lr / 4:g})"] if isinstance(lr, (int, float)) else []
        if clip == 0:
            hints.append("turn gradient clipping on (grad_clip=1.0)")
        elif cfg.get("warmup") == 0:
            hints.append("add a warmup (e.g. warmup=100)")
        model = cfg.get("model", {})
        kind = model.get("connection", "this")
        super().__init__(
            f"training diverged at step {step}: {problem} ({kind} model){'; ' + note if note else ''}. "
            "Non-finite weights are never saved, so the newest checkpoint holds the "
            f"last finite ones. To continue, {' or '.join(hints) or 'change the settings'} and resume "
            "(`mhc train --resume RUN_DIR --set lr=...`), or start a new run."
        )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dim=128, n_layers=3, n_heads=4, max_seq_len=128))
    # start from a transformers model directory ('mhc convert' output, or a Llama/Qwen/Mistral one, converted with
    # model.n_streams); its dimensions then replace the model section. Needs the [hf] extra.
    init_from: str = ""
    # data
    data: str = ""  # file, .gz file, directory or prepared .npy tokens; empty: the Python standard library
    tokenizer: str = "byte"  # byte | gpt2 | bpe:VOCAB (trained on the data, cached) | PATH to tokenizer.json
    val_fraction: float = 0.02
    test_fraction: float = 0.0  # >0: the last fraction of the tokens is a held-out test split (mhc compare)
    # batch
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1200
    # optimiser (paper recipe: AdamW (0.9, 0.95), wd 0.1, warmup, step decay at 80% and 90%)
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "step"  # step | cosine | constant
    warmup: int = 60
    min_lr_ratio: float = 0.1  # cosine floor
    grad_clip: float = 1.0
    connection_lr_scale: float = 1.0  # lr multiplier for the connections' own parameters (phi, bias, alpha)
    # bookkeeping
    eval_every: int = 150
    eval_batches: int = 8
    log_every: int = 25
    ckpt_every: int = 300
    keep_ckpts: int = 2
    diag_every: int = 150  # 0: off
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    out_dir: str = "runs"
    run_name: str = ""  # empty: <connection>-<timestamp>
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        errors = []
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "log_every",
                     "ckpt_every", "keep_ckpts"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            errors.append(f"lr must be > 0 (got {self.lr})")
        if self.connection_lr_scale <= 0:
            errors.append(f"connection_lr_scale must be > 0 (got {self.connection_lr_scale})")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.model.rope_theta <= 0:
            errors.append(f"model.rope_theta must be > 0 (got {self.model.rope_theta})")
        if self.model.moe and self.model.n_routed_experts < 1:
            errors.append(f"model.n_routed_experts must be >= 1 with model.moe (got {self.model.n_routed_experts})")
        if not DEVICE_RE.match(self.device):
            errors.append(f"device must be auto, cpu, mps, cuda or cuda:N (got {self.device!r})")
        if not self.out_dir:
            errors.append("out_dir must not be empty")
        if "/" in self.run_name or self.run_name in (".", ".."):
            errors.append(f"run_name must be a plain directory name, not a path (got {self.run_name!r})")
        if not 0 < self.val_fraction < 1:
            errors.append(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            errors.append(f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1 "
                          f"(got {self.test_fraction})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1) (got {self.betas})")
        if self.schedule not in ("step", "cosine", "constant"):
            errors.append(f"schedule must be step, cosine or constant (got {self.schedule!r})")
        if not self.tokenizer or (self.tokenizer.startswith("bpe:") and not self.tokenizer[4:].isdigit()):
            errors.append(f"tokenizer must be byte, gpt2, bpe:VOCAB or the path of a tokenizer.json "
                          f"(got {self.tokenizer!r})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            errors.append(f"dtype must be auto, float32 or bfloat16 (got {self.dtype!r})")
        if self.seq_len > self.model.max_seq_len and not self.init_from:
            errors.append(f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        try:
            self.model.validate()
        except ValueError as e:
            errors.append(str(e))
        for problem in [*_number_errors(self), *_number_errors(self.model, "model.")]:
            name = problem.split(" must", 1)[0]
            if not any(f"{name} must" in e or f"{name.removeprefix('model.')} must" in e for e in errors):
                errors.append(problem)
        from torch_mhc.distributed.mesh import static_errors

        errors += static_errors(self.parallel, self.model.n_heads, self.batch_size)
        if errors:
            raise UserError("invalid config: " + "; ".join(errors) + ".")

    def to_dict(self) -> dict:
        return asdict(self)


DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# integer settings that may be negative; every other integer setting must be >= 0
SIGNED_INTS = {"seed"}
# float settings that may be negative; every other float setting must be >= 0 (and all must be finite)
SIGNED_FLOATS = {"alpha_init"}


def _number_errors(obj, prefix: str = "") -> list[str]:
    """Every number of a config section: finite, and >= 0 unless listed as signed."""
    errors = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values = v if isinstance(v, list) else [v]
        for x in values:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if not math.isfinite(x):
                errors.append(f"{prefix}{f.name} must be a finite number (got {v})")
            elif x < 0 and f.name not in SIGNED_INTS | SIGNED_FLOATS:
                errors.append(f"{prefix}{f.name} must be >= 0 (got {v})")
    return errors


def _type_name(typ) -> str:
    if typing.get_origin(typ) is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(typing.get_args(typ)[0], "values")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, str(typ))


def _typed(value, typ, key: str):
    """``value`` (a string from --set, or a TOML/JSON value) as the field's type; UserError naming the key."""
    if isinstance(value, str) and typ is not str:
        value = _convert(value, typ, key)
    origin = typing.get_origin(typ)
    if origin is list and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(typ)
        return [_typed(v, item, key) for v in value]
    ok = (typ is bool and isinstance(value, bool)) or (typ is str and isinstance(value, str)) or (
        typ is int and isinstance(value, int) and not isinstance(value, bool)) or (
        typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise UserError(f"config key '{key}' must be {_type_name(typ)}, got {type(value).__name__} {value!r}.")
    if typ is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value}.")
    return value


def _convert(value: str, typ, key: str):
    """Parse an override string into the field's type."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if origin is list:
            (item,) = typing.get_args(typ)
            parts = [p for p in value.strip("[]").split(",") if p.strip()]
            return [_convert(p.strip().strip("'\""), item, key) for p in parts]
    except ValueError:
        raise UserError(f"cannot read {key}={value!r} as {getattr(typ, '__name__', typ)}.") from None
    return value


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise UserError(
                f"unknown config key '{prefix}{key}'. Known keys: {', '.join(sorted(prefix + n for n in names))}."
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key '{prefix}{key}' is a section; give its keys as {prefix}{key}.NAME.")
            _apply(current, value, f"{prefix}{key}.")
        elif isinstance(value, dict):
            inner = ", ".join(f"'{prefix}{key}.{k}'" for k in value)
            raise UserError(f"config key '{prefix}{key}' is a single value, not a section: {inner} does not exist.")
        else:
            setattr(obj, key, _typed(value, hints[key], prefix + key))


def _nest(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r} conflicts with --set {'.'.join(parents[: depth + 1])}=...: "
                                "a key cannot be both a value and a section.")
        if isinstance(node.get(leaf), dict):
            raise UserError(f"--set {item!r} conflicts with another --set of {key.strip()}.NAME.")
        node[leaf] = value
    return nested


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise UserError(f"config file {path} is not valid {kind}: {e}.") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a table of settings, got {type(values).__name__}.")
    return values


def build_config(
    base: dict | None = None, config_file: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Defaults <- ``base`` dict <- config file <- ``key=value`` overrides; validated."""
    cfg = TrainConfig()
    for layer in (base or {}, read_config_file(config_file) if config_file else {}, _nest(overrides or [])):
        _apply(cfg, layer)
    cfg.validate()
    return cfg


def config_from_dict(values: dict) -> TrainConfig:
    """Rebuild a TrainConfig from ``to_dict()`` output (as stored in runs and checkpoints)."""
    cfg = TrainConfig()
    _apply(cfg, values)
    return cfg


# Settings a resumed run may change: they are applied (the optimizer's param groups and the schedule
# follow lr, weight_decay, connection_lr_scale, schedule, warmup, min_lr_ratio and steps) and recorded.
# Everything else (model shape, data, tokenizer, batch, seed, betas, ...) defines the run: changing it
# on resume is refused; start a new run instead.
RESUME_MAY_CHANGE = (
    "steps", "lr", "weight_decay", "grad_clip", "connection_lr_scale", "schedule", "warmup", "min_lr_ratio",
    "eval_every", "eval_batches", "log_every", "ckpt_every", "keep_ckpts", "diag_every", "device", "dtype", "compile",
    # the layout: distributed (DCP) checkpoints reshard onto any number of processes
    "parallel.dp_shard", "parallel.dp_replicate", "parallel.tp", "parallel.pp", "parallel.dp_mode",
)


def flatten(values: dict, prefix: str = "") -> dict:
    """``{"model": {"dim": 3}}`` -> ``{"model.dim": 3}``."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_changes(old: TrainConfig, new: TrainConfig) -> dict[str, list]:
    """``{key: [old, new]}`` for every setting that differs; UserError naming the keys a resumed run
    may not change (``out_dir`` and ``run_name`` name the run and are ignored)."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    changes = {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k) and k not in ("out_dir", "run_name")}
    refused = [k for k in changes if k not in RESUME_MAY_CHANGE]
    if refused:
        detail = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise UserError(
            f"a resumed run cannot change {detail}: these define the run. Start a new run for them. "
            f"On resume you may change: {', '.join(RESUME_MAY_CHANGE)}."
        )
    return changes
