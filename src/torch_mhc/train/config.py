"""Training configuration: one dataclass with the model's nested inside, loaded from TOML or JSON
files and ``key=value`` overrides (``lr=3e-4``, ``model.connection=hc``)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch_mhc.models.decoder import ModelConfig


class UserError(Exception):
    """A problem with the user's input (config, data, run directory, checkpoint): reported in one
    paragraph, exit code 2, no traceback."""


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
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup < 0 or self.diag_every < 0:
            errors.append("weight_decay, grad_clip, warmup and diag_every must be >= 0")
        if not 0 < self.val_fraction < 1:
            errors.append(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
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
        if errors:
            raise UserError("invalid config: " + "; ".join(errors) + ".")

    def to_dict(self) -> dict:
        return asdict(self)


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
        elif isinstance(value, str) and hints[key] is not str:
            setattr(obj, key, _convert(value, hints[key], prefix + key))
        else:
            setattr(obj, key, value)


def _nest(overrides: list[str]) -> dict:
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}.")
        key, value = item.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist.")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise UserError(f"config file {path} is not valid {kind}: {e}.") from None


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
