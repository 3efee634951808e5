"""The training loop: AdamW, warmup + step decay or cosine, clipping, accumulation, bf16 autocast on
GPU, periodic evaluation, diagnostics, JSONL/TensorBoard logs and atomic checkpoints.

:func:`setup` builds a :class:`Training` (data, model, optimizer, schedule), :func:`train_step` runs
one optimizer step (the part pipeline parallelism replaces), :func:`train` is setup, loop, teardown."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from torch_mhc.diagnostics.collect import collect_diagnostics, diagnostic_batch, grad_norms_by_group
from torch_mhc.distributed import checkpoint as dcp_ckpt
from torch_mhc.distributed import runtime
from torch_mhc.distributed.parallelize import apply_activation_checkpoint, clip_grad_norm_, sync_moe_load
from torch_mhc.distributed.pipeline import Pipeline, build_pipeline
from torch_mhc.models.decoder import DecoderLM
from torch_mhc.nn import chained_backward
from torch_mhc.train.checkpoint import (
    latest_any_checkpoint,
    load_checkpoint,
    load_model_state,
    raise_if_disk_full,
    save_checkpoint,
    set_rng_state,
)
from torch_mhc.train.config import (
    DivergedError,
    TrainConfig,
    UserError,
    build_config,
    check_memory,
    config_from_dict,
    ignored_model_settings,
    resume_changes,
)
from torch_mhc.train.data import (
    TokenData,
    bytes_per_token,
    check_token_range,
    get_tokenizer,
    load_tokens,
    run_tokenizer,
    split_off_test,
    store_run_tokenizer,
    tokenizer_record,
)
from torch_mhc.train.resume import SCHEDULE_KEYS, apply_optimizer_settings, check_data, data_fingerprint, record_resume
from torch_mhc.train.rundir import append_jsonl, atomic_write_text, claim_new_run_dir, claim_run_dir

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then constant, the paper's
    step decay (x0.316 from 80% of the steps, x0.1 from 90%) or cosine down to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = step / cfg.steps
    if cfg.schedule == "step":
        return 1.0 if progress < 0.8 else 0.316 if progress < 0.9 else 0.1
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return 1.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but CUDA is not available here; use device=cpu or auto.")
    return dev


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def model_flops_per_token(model: DecoderLM, seq_len: int) -> float:
    """6 N (weights) + 12 L T C (attention scores), per token, forward + backward (PaLM appendix)."""
    cfg = model.cfg
    return 6 * model.num_params(exclude_embedding=True) + 12 * cfg.n_layers * seq_len * cfg.dim


# The loader of ``init_from`` models. It lives in a room above train/ (``integrations.convert``, optional
# [hf] extra), which registers it when imported; the ``mhc`` command registers it before it trains, evaluates
# or samples. So nothing in train/ imports integrations/.
_init_from_loader: Callable[[str, int], torch.nn.Module] | None = None


def register_init_from(loader: Callable[[str, int], torch.nn.Module]) -> None:
    """Set the function ``(directory, n_streams) -> model`` that ``init_from`` runs use."""
    global _init_from_loader
    _init_from_loader = loader


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """``DecoderLM(cfg.model)``; with ``init_from`` the model the registered loader makes of that directory
    (a converted transformers model), whose description then replaces ``cfg.model``."""
    if not cfg.init_from:
        return DecoderLM(cfg.model)
    if _init_from_loader is None:
        raise UserError("init_from needs the Hugging Face integration: import torch_mhc.integrations.convert "
                        "first (the mhc command does).")
    model = _init_from_loader(cfg.init_from, cfg.model.n_streams)
    cfg.model = model.cfg
    return model


def load_data(cfg: TrainConfig, cache_dir: Path, log=print, tokenizer=None) -> tuple[TokenData, object]:
    """The run's tokens, split; ``tokenizer``: the run's own (``data.run_tokenizer``), or None for a new run's
    (``get_tokenizer``: a ``bpe:VOCAB`` is trained on the data, or taken from the cache)."""
    if tokenizer is None:
        tokenizer = get_tokenizer(cfg.tokenizer, cfg.data, cache_dir, cfg.val_fraction)
    tokens, meta = load_tokens(cfg.data, tokenizer, cache_dir)
    if cfg.test_fraction:  # the held-out test split (mhc compare): neither training nor validation reads it
        tokens, _ = split_off_test(tokens, cfg.test_fraction)
    what = "the default corpus" if not cfg.data else f"data {cfg.data}"
    data = TokenData.from_tokens(tokens, cfg.seq_len, cfg.val_fraction, bytes_per_token(meta, tokenizer), what=what)
    data.fingerprint = data_fingerprint(meta, cfg.data)
    how = "read from the cache" if meta["cached"] else "tokenised and cached"
    log(f"tokens: {tokens.size:,} ({tokenizer.name}; {how} in {cache_dir}); "
        f"{data.train.size:,} train / {data.val.size:,} validation")
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                        f"{tokenizer.vocab_size}; set model.vocab_size={tokenizer.vocab_size}.")
    check_token_range(tokens, cfg.model.vocab_size, what)
    return data, tokenizer


@torch.no_grad()
def evaluate(model, batches, device, autocast_dtype, bytes_per_token: float | None,
             ctx: runtime.DistContext | None = None, pipe: Pipeline | None = None) -> dict:
    """Mean loss (nats/token) over the given batches ``(x, y [B, T])`` and bits per byte when known. Under
    torchrun (``ctx``) each rank evaluates its rows of every global batch, as in training, and the loss
    sums are reduced over the ranks (a collective). Pipelined (``pipe``): the rows go through the stages in
    order and the ranks with the last stage hold the sums."""
    if pipe is not None:
        total, count = pipe.loss_sums(batches, ctx.rows, autocast_dtype)
    else:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for x, y in batches:
            if ctx is not None:
                x, y = x[ctx.rows], y[ctx.rows]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() * y.numel()
            count += y.numel()
        model.train(was_training)
    if ctx is not None:
        total, count = runtime.sum_over_ranks(total, count)
    loss = total / max(1, count)
    out = {"val_loss": loss}
    if bytes_per_token:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token
    return out


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) plus TensorBoard events when tensorboard is installed.
    A full disk or a read-only file system is a UserError naming the file or the TensorBoard folder,
    also when TensorBoard's writer thread meets it (the thread prints nothing; its error is reported
    by the next call here)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb"
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.tb = None
        else:
            _quiet_tensorboard_thread()
            self.tb = self._tb(lambda: SummaryWriter(str(self.tb_dir)))

    def _tb(self, call):
        """A TensorBoard call; a full disk (raised here or by its writer thread's last write) names the folder."""
        try:
            return call()
        except Exception as e:
            raise_if_disk_full(e, self.tb_dir)
            raise

    def write(self, record: dict) -> None:
        append_jsonl(self.path, record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb(lambda k=k, v=v: self.tb.add_scalar(k, v, record["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self._tb(self.tb.flush)  # reports an error of the writer thread (close does not)
            self._tb(self.tb.close)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread keeps a write error for the main thread's next call (which reports it)
    and also raises it in the thread, where ``threading`` would print its traceback: print nothing for it."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, Exception):
            return  # kept in the thread's .exception and raised by the writer's next write or flush
        previous(args)

    hook.quiet_tensorboard = True
    threading.excepthook = hook


@dataclass
class Training:
    """Everything one training run holds between steps (built by :func:`setup`)."""

    cfg: TrainConfig
    device: torch.device
    autocast_dtype: torch.dtype | None
    data: TokenData
    model: DecoderLM
    step_model: torch.nn.Module  # the model as called in the step (compiled or not)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_step: int = 0
    dist: runtime.DistContext | None = None  # None: one process, the plain run
    pipe: Pipeline | None = None  # parallel.pp > 1: this rank's stages and the schedule (``model`` is mostly meta)
    tokenizer: dict | None = None  # the run's tokenizer record (data.tokenizer_record), in every checkpoint


def setup(cfg: TrainConfig, run_dir: Path, resume_state: dict | None = None, log=print) -> Training:
    """Data, model, optimizer and schedule for ``cfg``; restored from ``resume_state`` when given."""
    device = resolve_device(cfg.device)
    autocast_dtype = None
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda"):
        autocast_dtype = torch.bfloat16
    ctx = runtime.distributed_context(cfg, device)
    if ctx is not None and cfg.init_from:
        raise UserError("init_from (a converted transformers model) is not supported under torchrun yet; "
                        "start from it with one process.")
    torch.manual_seed(cfg.seed)
    if ctx is None and not cfg.init_from:  # before anything is allocated
        check_memory(cfg, device, bytes_per_value=2 if autocast_dtype is not None else 4)
    pipe = None
    if ctx is None:
        model = build_model(cfg).to(device)  # before load_data: init_from sets cfg.model (vocabulary size)
        apply_activation_checkpoint(model, cfg.model.activation_checkpoint)  # as parallelize() does under torchrun
    elif ctx.dims.pp > 1:
        pipe = build_pipeline(cfg, ctx.dims, ctx.mesh, device, param_dtype=autocast_dtype)
        model = pipe.model
    else:
        model = runtime.build_model(cfg.model, ctx, device, compile=cfg.compile, param_dtype=autocast_dtype)
    cache = Path(run_dir).parent / "cache"
    # a resumed run goes on with the tokenizer it started with; a new run stores its own once, here
    tokenizer = runtime.main_first(run_tokenizer, run_dir, cfg, resume_state) if resume_state is not None else None
    data, tokenizer = runtime.main_first(load_data, cfg, cache, log, tokenizer)
    stored = resume_state is not None and resume_state.get("tokenizer") is not None
    tokenizer_rec = tokenizer_record(tokenizer)
    if runtime.is_main_process() and not stored:
        store_run_tokenizer(run_dir, tokenizer)
    owner = pipe if pipe is not None else model  # what holds this rank's parameters
    groups = owner.param_groups(cfg.weight_decay, cfg.lr, cfg.connection_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start_step = 0
    if resume_state is not None and "dcp_path" in resume_state:  # a distributed checkpoint, on any world size
        if pipe is None:
            state = runtime.agree(dcp_ckpt.load_distributed, resume_state["dcp_path"], model, optimizer)
        else:  # this rank's slice of the model; the checkpoint's keys checked against the whole model's
            state = runtime.agree(dcp_ckpt.load_distributed, resume_state["dcp_path"], pipe.parts, optimizer,
                                  model_keys=set(model.state_dict()))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_step = state["step"]
    elif resume_state is not None:  # a one-process checkpoint (step_*.pt); under torchrun every rank keeps its shards
        if pipe is not None:
            raise UserError("a one-process checkpoint (step_*.pt) cannot be resumed with parallel.pp > 1 yet: resume "
                            "it under torchrun without parallel.pp (its checkpoints are then distributed ones, which "
                            "a pipelined run resumes), or with one process.")
        if ctx is None:
            load_model_state(model, resume_state["model"], "of this run")
            optimizer.load_state_dict(resume_state["optimizer"])
        else:
            runtime.agree(runtime.load_full_state, model, optimizer, resume_state["model"], resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"])
        start_step = resume_state["step"]
    if resume_state is not None:
        changes = resume_state.get("changes", {})
        if set(changes) & set(SCHEDULE_KEYS):  # a loaded optimizer keeps its old lr and weight decay otherwise
            apply_optimizer_settings(optimizer, scheduler, owner.param_groups(cfg.weight_decay, cfg.lr,
                                                                              cfg.connection_lr_scale),
                                     lr_factor(start_step, cfg))
        data_note = check_data(resume_state.get("data"), data.fingerprint, resume_state.get("allow_data_change", False))
        if "path" in resume_state and runtime.is_main_process():
            record_resume(run_dir, start_step, resume_state["path"], changes, data_note)
    if pipe is not None and resume_state is not None:  # the saved base lrs are those of rank 0's groups
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    step_model = torch.compile(model) if cfg.compile and ctx is None else model
    model.train()
    return Training(cfg, device, autocast_dtype, data, model, step_model, optimizer, scheduler, start_step, ctx,
                    pipe=pipe, tokenizer=tokenizer_rec)


def forward_backward(t: Training, x: torch.Tensor, y: torch.Tensor, accum: int) -> float:
    """One micro-batch ``x, y [B, T]`` of ``accum``: forward, backward of ``loss / accum``; returns the loss.
    Under ``chained_backward``: nothing here asks for the gradient of a state between two sublayers."""
    try:
        with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None), \
                chained_backward():
            _, loss = t.step_model(x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True))
    except ValueError as e:  # HC / mHC check their coefficients (nn.functional.check_finite)
        if not str(e).startswith("non-finite values"):
            raise
        raise DivergedError(t.scheduler.last_epoch + 1, "the connection coefficients are not finite", t.cfg) from None
    (loss / accum).backward()
    return loss.item()


def pipelined_forward_backward(t: Training, step: int) -> float:
    """Forward and backward of step ``step``'s ``grad_accum`` micro-batches (this rank's rows of each) through
    the pipeline schedule: the micro-batches of one process's accumulation, the same mean loss (returned,
    averaged over the data-parallel ranks; a collective)."""
    cfg = t.cfg
    batches = [t.data.train_batch(step, cfg.batch_size, cfg.seed, micro) for micro in range(cfg.grad_accum)]
    x = torch.cat([x[t.dist.rows] for x, _ in batches])  # [grad_accum * rows, T]: micro-batch i, rows i*rows..
    y = torch.cat([y[t.dist.rows] for _, y in batches])
    try:
        with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None), \
                chained_backward():
            loss = t.pipe.step(x, y)
    except ValueError as e:  # HC / mHC check their coefficients (nn.functional.check_finite)
        if not str(e).startswith("non-finite values"):
            raise
        raise DivergedError(t.scheduler.last_epoch + 1, "the connection coefficients are not finite", t.cfg) from None
    return runtime.sum_over_ranks(loss or 0.0)[0] / t.dist.dims.dp  # one rank per pipeline holds its loss


def train_step(t: Training, step: int, group_norms: bool = False) -> dict:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches, clipping, AdamW, schedule and
    MoE balancing. Returns ``loss`` (mean over micro-batches), ``grad_norm`` (before clipping) and,
    when asked, the per-role gradient norms (``grad_norm_<role>``)."""
    cfg = t.cfg
    if t.pipe is not None:
        loss = pipelined_forward_backward(t, step)
    else:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y = t.data.train_batch(step, cfg.batch_size, cfg.seed, micro)
            if t.dist is not None:  # this rank's rows of the global batch
                x, y = x[t.dist.rows], y[t.dist.rows]
            loss_sum += forward_backward(t, x, y, cfg.grad_accum)
        loss = loss_sum / cfg.grad_accum
    if t.dist is not None and t.pipe is None:
        runtime.after_backward(t.model, t.dist)
        loss = runtime.mean_over_ranks(loss)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    if t.pipe is not None:  # norms over every stage's parameters
        norms = t.pipe.grad_norms_by_group() if group_norms else {}
        grad_norm = t.pipe.clip_grad_norm_(max_norm)
    else:
        norms = grad_norms_by_group(t.model) if group_norms else {}
        clip = torch.nn.utils.clip_grad_norm_ if t.dist is None else clip_grad_norm_
        grad_norm = float(clip(t.model.parameters(), max_norm))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # stop before the update spoils the weights
        problem = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        raise DivergedError(step + 1, problem, cfg)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    if t.pipe is not None:
        t.pipe.sync_moe_load()
    elif t.dist is not None:
        sync_moe_load(t.model, t.dist.mesh)
    for moe in (t.pipe or t.model).moe_layers():
        moe.update_bias()
    return {"loss": loss, "grad_norm": grad_norm, **norms}


def train(cfg: TrainConfig, run_dir: Path, resume_state: dict | None = None, log=print) -> dict:
    """Train ``cfg`` into ``run_dir``; returns the last metrics record."""
    main = runtime.is_main_process()  # metrics, logs and plots: rank 0 only
    log = log if main else (lambda *args, **kwargs: None)
    t = setup(cfg, run_dir, resume_state, log)
    model, data, device = t.model, t.data, t.device
    if main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsWriter(run_dir) if main else None
    diag_idx = diagnostic_batch(data, cfg.batch_size).to(device) if cfg.diag_every else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)
    flops_per_token = model_flops_per_token(model, cfg.seq_len)
    n_params = model.num_params()
    log(f"model: {cfg.model.connection} (n={cfg.model.streams}), {n_params / 1e6:.2f}M parameters, device {device}"
        f"{', bf16 autocast' if t.autocast_dtype else ''}; {cfg.steps} steps of {tokens_per_step} tokens")
    ignored = ignored_model_settings(cfg.model)
    if ignored:
        log(f"note: connection={cfg.model.connection} does not read {', '.join(ignored)}: no effect on this run")

    bar = None
    if sys.stderr.isatty() and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=t.start_step, desc="train", unit="step", dynamic_ncols=True)
    last: dict = {}
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(t.start_step, cfg.steps):
        done = step + 1
        is_last = done == cfg.steps
        diag_now = bool(cfg.diag_every) and (done % cfg.diag_every == 0 or is_last)
        log_now = done % cfg.log_every == 0 or done % cfg.eval_every == 0 or diag_now or is_last
        result = train_step(t, step, group_norms=log_now)
        tokens_since += tokens_per_step
        loss_val = result["loss"]
        if main:  # every step's norm (the same on every rank), for the spike statistic
            append_jsonl(run_dir / "grad_norms.jsonl", {"step": done, "grad_norm": result["grad_norm"]})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}")
        if log_now:
            now = time.perf_counter()
            tok_s = tokens_since / max(now - t_last, 1e-9)
            record = {"step": done, "tokens": done * tokens_per_step, "loss": loss_val,
                      "lr": t.scheduler.get_last_lr()[0], "grad_norm": result["grad_norm"], "tokens_per_s": tok_s,
                      "peak_mem_mb": peak_memory_mb(device),
                      "params": n_params, **{k: v for k, v in result.items() if k.startswith("grad_norm_")}}
            if data.bytes_per_token:
                record["bpb"] = loss_val / math.log(2) / data.bytes_per_token
            if peak_flops:
                record["mfu"] = tok_s * flops_per_token / peak_flops
            if done % cfg.eval_every == 0 or is_last:
                record.update(evaluate(model, data.val_batches(cfg.batch_size, cfg.eval_batches), device,
                                       t.autocast_dtype, data.bytes_per_token, t.dist, t.pipe))
            if diag_now:
                if t.pipe is not None:  # each stage records its own layers; gathered into one record
                    diag = t.pipe.diagnostics(diag_idx, step=done)
                else:
                    diag = collect_diagnostics(model, diag_idx, step=done, seq_mesh=runtime.sequence_mesh(t.dist))
                if main:
                    append_jsonl(run_dir / "diagnostics.jsonl", diag)
                record.update(diag["summary"])
            if metrics is not None:
                metrics.write(record)
            last = record
            line = (f"step {done:>6}/{cfg.steps}  loss {loss_val:.4f}  lr {record['lr']:.2e}  "
                    f"|g| {record['grad_norm']:.2f}  {tok_s:,.0f} tok/s")
            if "val_loss" in record:
                line += f"  val {record['val_loss']:.4f}"
                line += f" ({record['val_bpb']:.3f} bpb)" if "val_bpb" in record else ""
            (bar.write if bar is not None else log)(line)
            t_last, tokens_since = time.perf_counter(), 0
        if (done % cfg.ckpt_every == 0 or is_last) and t.dist is not None:
            dcp_ckpt.save_distributed(run_dir, done, model if t.pipe is None else t.pipe.parts, t.optimizer,
                                      {"scheduler": t.scheduler.state_dict(), "config": cfg.to_dict(),
                                       "bytes_per_token": data.bytes_per_token, "data": data.fingerprint,
                                       "tokenizer": t.tokenizer},
                                      cfg.keep_ckpts)
        elif done % cfg.ckpt_every == 0 or is_last:
            save_checkpoint(run_dir, done, model, t.optimizer, t.scheduler, cfg.to_dict(),
                            {"bytes_per_token": data.bytes_per_token, "data": data.fingerprint,
                             "tokenizer": t.tokenizer}, cfg.keep_ckpts)
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    return last


def start_run(config_file: str | None, overrides: list[str], log=print) -> tuple[Path, dict]:
    """A new run in a freshly claimed directory (held for the run's life; removed if the start fails)."""
    cfg = build_config(config_file=config_file, overrides=overrides)
    runtime.check_parallel(cfg)  # an impossible layout fails before any directory is made
    if not runtime.is_main_process():
        log = lambda *args, **kwargs: None  # noqa: E731
    with runtime.claimed_on_main(lambda: claim_new_run_dir(cfg.out_dir, cfg.run_name, cfg.model.connection)) as path:
        if cfg.data:
            log(f"data: {cfg.data}")
        else:
            log("data: the Python standard library source (default corpus; --set data=PATH to use yours)")
        log(f"run directory: {path}")
        return path, train(cfg, path, log=log)


def resume_run(run_dir: str, overrides: list[str], log=print, allow_data_change: bool = False) -> tuple[Path, dict]:
    """Continue ``run_dir`` from its newest checkpoint (which must verify) with ``overrides`` of the
    settings a resume may change (``config.RESUME_MAY_CHANGE``), applied and recorded. The newest
    checkpoint may be a distributed one (DCP), resumed on any number of processes."""
    if not runtime.is_main_process():
        log = lambda *args, **kwargs: None  # noqa: E731
    with runtime.claimed_on_main(lambda: claim_run_dir(run_dir)) as path:
        ckpt_path = latest_any_checkpoint(path)
        if ckpt_path.is_dir():  # distributed (DCP): loaded into the parallelized model in setup
            state = {**dcp_ckpt.read_trainer_state(ckpt_path), "dcp_path": ckpt_path}
        else:
            state = load_checkpoint(ckpt_path)
        old = config_from_dict(state["config"])
        cfg = build_config(base=old.to_dict(), overrides=overrides)
        runtime.check_parallel(cfg)
        state.update(changes=resume_changes(old, cfg), allow_data_change=allow_data_change, path=ckpt_path)
        if state["step"] >= cfg.steps:
            raise UserError(f"run {run_dir} already finished its {cfg.steps} steps (checkpoint at step "
                            f"{state['step']}); pass --set steps=N with a larger N to train further.")
        log(f"resuming {path} from {ckpt_path.name} (step {state['step']})")
        return path, train(cfg, path, resume_state=state, log=log)
