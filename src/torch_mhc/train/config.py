"""Training configuration: one dataclass with the model's nested inside, loaded from TOML or JSON
files and ``key=value`` overrides (``lr=3e-4``, ``model.connection=hc``)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import re
import textwrap
import tokenize
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
    """Every setting of a run. The comment on (or just above) a field is its help text: ``mhc config`` prints it
    with the field's type and default (:func:`settings`), so a new setting documents itself there."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dim=128, n_layers=3, n_heads=4, max_seq_len=128))
    # start from a transformers model directory ('mhc convert' output, or a Llama/Qwen/Mistral one, converted with
    # model.n_streams); its dimensions then replace the model section. Needs the [hf] extra.
    init_from: str = ""
    # data
    data: str = ""  # file, .gz file, directory or prepared .npy tokens; empty: the Python standard library
    tokenizer: str = "byte"  # byte | gpt2 | bpe:VOCAB (trained on the data, cached) | PATH to tokenizer.json
    val_fraction: float = 0.02  # the last fraction of the tokens (before any test split) is the validation split
    test_fraction: float = 0.0  # >0: the last fraction of the tokens is a held-out test split (mhc compare)
    # batch
    seq_len: int = 128  # tokens per training sequence (at most model.max_seq_len)
    batch_size: int = 16  # sequences per micro-batch (an optimizer step sees batch_size x grad_accum)
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    steps: int = 1200  # optimizer steps to train for
    # optimiser (paper recipe: AdamW (0.9, 0.95), wd 0.1, warmup, step decay at 80% and 90%)
    lr: float = 3e-3  # peak learning rate (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW beta1, beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # AdamW weight decay, on matrices (not norm gains, not the connections' bias and alpha)
    schedule: str = "step"  # step (lr x0.316 from 80% of the steps, x0.1 from 90%) | cosine | constant
    warmup: int = 60  # steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: off
    connection_lr_scale: float = 1.0  # lr multiplier for the connections' own parameters (phi, bias, alpha)
    # bookkeeping
    eval_every: int = 150  # steps between validation losses
    eval_batches: int = 8  # batches per validation loss
    log_every: int = 25  # steps between metrics.jsonl records (grad norms are logged every step)
    ckpt_every: int = 300  # steps between checkpoints
    keep_ckpts: int = 2  # newest checkpoints kept (older ones are deleted)
    diag_every: int = 150  # steps between connection diagnostics (gains, H_res); 0: off
    seed: int = 1337  # seed of the weights' initialisation and of the batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    out_dir: str = "runs"  # where run directories are made
    run_name: str = ""  # empty: <connection>-<timestamp>
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # multi-GPU layout (torchrun)

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
        errors += _name_errors(self.run_name, self.out_dir)
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
        elif self.tokenizer.startswith("bpe:") and not 257 <= int(self.tokenizer[4:]) <= MAX_BPE_VOCAB:
            errors.append(f"tokenizer=bpe:VOCAB needs 257 <= VOCAB <= {MAX_BPE_VOCAB:,} (got {self.tokenizer[4:]})")
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
MAX_BPE_VOCAB = 2**24  # far above any useful BPE vocabulary; token ids are stored as uint32 at most
NAME_MAX = 255  # bytes in one file name (Linux, macOS)


def _name_errors(run_name: str, out_dir: str) -> list[str]:
    """``run_name``: one plain directory name the file system accepts; ``out_dir``: no part too long."""
    errors = []
    if "/" in run_name or "\\" in run_name or run_name in (".", ".."):
        errors.append(f"run_name must be a plain directory name, not a path (got {run_name!r})")
    elif any(ord(c) < 32 or ord(c) == 127 for c in run_name):
        errors.append(f"run_name must not hold control characters (got {run_name!r})")
    elif len(run_name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        errors.append(f"run_name must be at most {NAME_MAX} bytes, a file system's limit for one name "
                      f"(got {len(run_name.encode('utf-8', 'surrogateescape'))}: {run_name[:40]!r}...)")
    long = [p for p in Path(out_dir).parts if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX]
    if "\x00" in out_dir or "\x00" in run_name:
        errors.append("out_dir and run_name must not hold NUL characters")
    if long:
        errors.append(f"out_dir has a part longer than {NAME_MAX} bytes, a file system's limit ({long[0][:40]!r}...)")
    return errors
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


def field_help(cls) -> dict[str, str]:
    """Field name -> its help text in ``cls``'s source: the comment ending its line, else the comment lines
    right above it ("" for neither, or where the source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}  # line -> (the comment's text, whether the line holds nothing else)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text, alone = comments.get(node.end_lineno, ("", True))
            if alone:
                above, line = [], node.lineno - 1
                while line in comments and comments[line][1]:
                    above.insert(0, comments[line][0])
                    line -= 1
                text = " ".join(above)
            docs[node.target.id] = text
    return docs


@dataclass
class Setting:
    key: str  # "model.dim"
    type: str  # "int", "list[str]", ...
    default: object
    help: str


def _type_label(typ) -> str:
    if typing.get_origin(typ) is list:
        return f"list[{typing.get_args(typ)[0].__name__}]"
    return getattr(typ, "__name__", str(typ))


def settings(obj=None, prefix: str = "") -> list[Setting]:
    """Every setting of ``TrainConfig`` (sections flattened: ``model.dim``, ``parallel.tp``) with its type,
    default and help text, in the order of the dataclasses' fields; ``obj``: the section to describe."""
    obj = TrainConfig() if obj is None else obj
    hints, docs, out = typing.get_type_hints(type(obj)), field_help(type(obj)), []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += settings(value, f"{prefix}{f.name}.")
        else:
            out.append(Setting(prefix + f.name, _type_label(hints[f.name]), value, docs.get(f.name, "")))
    return out


def format_default(value) -> str:
    """A default as it is written in TOML or with ``--set`` (strings quoted, so an empty one shows)."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (str, list)) else f"{value:g}" if isinstance(value, float) else str(
        value)


def describe(setting: Setting) -> str:
    """``lr (float, default 0.003): peak learning rate (AdamW)``."""
    return f"{setting.key} ({setting.type}, default {format_default(setting.default)}): {setting.help}"


def close_settings(key: str, n: int = 4) -> list[Setting]:
    """The settings whose name (the part after any section: ``n_streams`` of ``model.n_streams``) is most like
    ``key``'s, best first; none when nothing is close."""
    leaf = key.rsplit(".", 1)[-1]
    scored = []
    for s in settings():
        score = difflib.SequenceMatcher(None, leaf, s.key.rsplit(".", 1)[-1]).ratio()
        if score >= 0.7:
            scored.append((-score, s.key, s))
    return [s for *_, s in sorted(scored)[:n]]


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
            sections = [n for n in names if dataclasses.is_dataclass(getattr(obj, n))]
            close = [f"the section {prefix}{n} ({prefix}{n}.KEY)" for n in difflib.get_close_matches(key, sections, 1,
                                                                                                    0.7)]
            close += map(describe, close_settings(prefix + key))
            section = f" of {prefix.rstrip('.')}" if prefix else ""
            hint = ("Did you mean: " + "; ".join(close) + "?" if close else
                    f"Keys{section}: {', '.join(sorted(prefix + n for n in names))}.")
            raise UserError(f"unknown config key '{prefix}{key}'. {hint} `mhc config` lists every setting with its "
                            "type, default and meaning.")
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
    "parallel.dp_shard", "parallel.dp_replicate", "parallel.tp", "parallel.pp", "parallel.dp_mode", "parallel.ep",
    "parallel.pp_schedule",
    # activation checkpointing recomputes the same forward: the same numbers, less memory
    "model.activation_checkpoint",
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


# Model settings that only some connections read: set on another, they do nothing (a comparison's base config
# sets them for its mHC arms and its residual arm inherits them, so they are noted, not refused).
STREAM_SETTINGS = ("n_streams", "dynamic", "learn", "merge", "recompute", "recompute_every")  # n > 1: hc and mhc
MHC_SETTINGS = ("sinkhorn_iters", "mhc_eps", "alpha_init", "bias_init", "identity_gap", "phi_init_std", "variant",
                "h_res", "batch_invariant")


def ignored_model_settings(model: ModelConfig) -> list[str]:
    """``model.KEY=value`` for each setting that differs from its default and that ``model.connection`` does not
    read (the residual network reads neither group above, HC not the mHC group)."""
    names = {"residual": STREAM_SETTINGS + MHC_SETTINGS, "hc": MHC_SETTINGS}.get(model.connection, ())
    default = ModelConfig()
    return [f"model.{k}={getattr(model, k)!r}" for k in names if getattr(model, k) != getattr(default, k)]


GIB = 2**30


def _available_memory(device) -> tuple[int | None, str]:
    """Bytes of memory free for a run on ``device`` (None when unknown) and where."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "available in RAM (MemAvailable)"
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available in RAM"
        except (OSError, ValueError):
            return None, ""


def count_parameters(model) -> tuple[int, int]:
    """Parameters and buffer bytes of a ``ModelConfig``'s model, from models of at most a few layers built on
    the meta device (nothing allocated; the per-layer count is extrapolated to ``model.n_layers``)."""
    import torch

    from torch_mhc.models.decoder import DecoderLM

    def count(n: int) -> tuple[int, int]:
        with torch.device("meta"):
            m = DecoderLM(dataclasses.replace(model, n_layers=n))
        return m.num_params(), sum(b.numel() * b.element_size() for b in m.buffers())

    layers = model.n_layers
    base = min(layers, (model.first_dense_layers if model.moe else 0) + 2)
    p0, b0 = count(base)
    if base == layers:
        return p0, b0
    p1, b1 = count(base + 1)
    return p0 + (layers - base) * (p1 - p0), b0 + (layers - base) * (b1 - b0)


def check_memory(cfg: TrainConfig, device, bytes_per_value: int = 4) -> None:
    """UserError, before anything is allocated, when one process's training of ``cfg`` on ``device`` needs
    more memory than is free there: weights, gradients and AdamW state (16 bytes per parameter), buffers,
    saved activations (the ``mhc memory`` estimate per token, scaled to ``bytes_per_value``) and the logits
    with their gradient, for ``batch_size`` x ``seq_len`` tokens. An estimate; the message shows it."""
    from torch_mhc.distributed.memory import activation_bytes_per_token

    free, where = _available_memory(device)
    if free is None:
        return
    m = cfg.model
    tokens = cfg.batch_size * cfg.seq_len
    logits = 12 * tokens * m.vocab_size
    floor = 16 * (m.vocab_size * m.dim + 2 * m.n_layers * m.dim * m.dim)  # embedding + attention q, o: a lower bound
    if floor + logits > free:
        params, buffers, states, activations, exact = None, 0, floor, 0, False
    else:
        params, buffers = count_parameters(m)
        states = 16 * params
        activations = tokens * activation_bytes_per_token(m) * bytes_per_value / 2
        exact = True
    need = states + buffers + activations + logits
    if need <= free:
        return
    what = (f"{params:,} parameters: weights, gradients and AdamW state {states / GIB:,.1f} GiB, buffers "
            f"{buffers / GIB:,.1f} GiB, activations {activations / GIB:,.1f} GiB" if exact else
            f"more than {floor // 16:,} parameters: weights, gradients and AdamW state alone over "
            f"{states / GIB:,.1f} GiB")
    raise UserError(
        f"this model does not fit in memory: training it needs about {need / GIB:,.1f} GiB ({what}, logits "
        f"{logits / GIB:,.1f} GiB for batch_size={cfg.batch_size} x seq_len={cfg.seq_len} tokens; model.dim="
        f"{m.dim}, model.n_layers={m.n_layers}, model.vocab_size={m.vocab_size}, model.max_seq_len={m.max_seq_len}), "
        f"but only {free / GIB:,.1f} GiB is {where}. Nothing was allocated. Choose a smaller model, batch_size or "
        "seq_len (`mhc memory CONFIG LAYOUT` estimates multi-GPU layouts)."
    )
