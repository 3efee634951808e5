"""`mhc compare`: every arm at every learning rate of a grid, every cell with every seed.

The protocol (docs/results/README.md): each arm's lr is the one with the lowest mean validation loss
over the seeds; where that lr is at an edge of the grid, the arm also runs one grid step further.
The final figures are losses on a held-out test split (the last ``test_fraction`` of the tokens)
that neither training nor the selection read. Gaps to the residual arm are paired by seed: same
seed, same trunk initialisation and data order. A run that diverges is recorded as such and the
others go on; ``--resume OUT`` keeps the finished runs and resumes or restarts the others.
``--jobs N`` runs N cells at once, each in its own process (CPU threads split between them); every run
is the same as alone, except that its CPU thread count is the machine's cores / N. SIGTERM, SIGHUP or
SIGINT to the parent stops every worker before it exits (and a worker whose parent dies is stopped by
the kernel); a worker killed by a signal is an error naming its run. ``--resume`` continues either way.

A run's test loss is measured with the run's own tokenizer (``RUN_DIR/tokenizer.json``, checked against
the SHA-256 in its checkpoint). ``plan.json``, ``result.json`` and ``summary.json`` are written through a
temporary file and a rename; a ``result.json`` that cannot be read is a run to finish again.

``OUT/plan.json`` (what to run), ``OUT/runs/NAME/`` (one run each, with ``result.json`` once it is
done), ``OUT/summary.json`` (one row per run and the ``protocol`` object), ``OUT/report.md`` and plots.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from multiprocessing import connection as mp_connection
from multiprocessing import get_context
from pathlib import Path

import torch

from torch_mhc.diagnostics.collect import (
    collect_diagnostics,
    diagnostic_batch,
    h_res_distances,
    mean_stream_copy_dist,
)
from torch_mhc.diagnostics.gains import composites, distance_from_uniform
from torch_mhc.models.decoder import DecoderLM
from torch_mhc.reports import stats
from torch_mhc.reports.plots import read_jsonl
from torch_mhc.train.checkpoint import CKPT_RE, list_checkpoints, load_checkpoint
from torch_mhc.train.config import DivergedError, TrainConfig, UserError, build_config
from torch_mhc.train.rundir import atomic_write_text

# Modes of --modes: the overrides that make each arm. mhc-gate: one stream, so mHC is a per-token
# gate on F's output alone; mhc-identity / hc-identity: H_res fixed to I, H_pre and H_post learned.
MODES = {
    "residual": ["model.connection=residual"],
    "hc": ["model.connection=hc"],
    "mhc": ["model.connection=mhc"],
    "mhc-gate": ["model.connection=mhc", "model.n_streams=1"],
    "mhc-identity": ["model.connection=mhc", "model.learn=pre,post"],
    "hc-identity": ["model.connection=hc", "model.learn=pre,post"],
    # mHC with each other H_res map (nn/maps.py). Not "identity": mhc-identity above (H_res fixed by learn, the
    # published control) computes the same function; model.h_res=identity drops phi's unused res columns
    **{f"mhc-{m}": ["model.connection=mhc", f"model.h_res={m}"]
       for m in ("permutation-mixture", "circulant", "kronecker")},
}
# Residual controls computed from the base config (:func:`matched_width`): the residual network with its FFNs
# widened to the hidden width that brings it closest to the comparison's first mHC arm's parameter count
# (residual-params) or to its forward FLOPs per token (residual-flops, as :func:`forward_flops_per_token` counts
# them); :func:`resolve_matched`.
MATCHED_MODES = {"residual-params": "params", "residual-flops": "flops"}
BASELINE = "residual"
TEST_BATCHES_PER_EVAL_BATCH = 4  # the test loss reads up to 4 x eval_batches batches of evenly spaced windows
PLAN, RESULT = "plan.json", "result.json"
DIAGNOSTICS_SUMMARY = "diagnostics_summary.json"  # per run: H_res distances per diagnostic step (h_res_travel)


def parse_arms(modes: list[str], variants: list[str]) -> list[tuple[str, list[str]]]:
    """(name, overrides) for every arm: each mode, then each NAME:KEY=VALUE[,KEY=VALUE] variant."""
    arms = []
    for mode in (m.strip() for m in modes if m.strip()):
        if mode not in MODES and mode not in MATCHED_MODES:
            raise UserError(f"unknown mode {mode!r}; modes are {', '.join([*MODES, *MATCHED_MODES])}.")
        arms.append((mode, list(MODES.get(mode, ["model.connection=residual"]))))  # matched: resolve_matched
    for spec in variants:
        name, sep, sets = spec.partition(":")
        if not sep or not name or not sets:
            raise UserError(f"--variant expects NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}.")
        overrides: list[str] = []
        for piece in sets.split(","):  # a piece without "=" continues a list value: model.learn=pre,res
            if "=" in piece or not overrides:
                overrides.append(piece)
            else:
                overrides[-1] += "," + piece
        arms.append((name, [o for o in overrides if o]))
    if not arms:
        raise UserError("nothing to compare: give --modes and/or --variant.")
    names = [n for n, _ in arms]
    if len(set(names)) != len(names):
        raise UserError(f"arm names in a comparison must be unique (got {', '.join(names)}).")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise UserError(f"arm names may hold letters, digits, '-' and '_' only (got {', '.join(bad)}).")
    return arms


def connection_flops_per_token(cfg) -> int:
    """Forward FLOPs per token of the connections' own stream arithmetic, which a FLOP counter of matmuls does
    not see (``cfg``: a ModelConfig). Per mHC sublayer with n streams of width C and K Sinkhorn rounds: RMS norm
    of the nC input 3nC, read 2nC, H_res mixing 2n^2 C, write 2nC (multiply and add), Sinkhorn 4Kn^2 (each
    round sums and divides every entry by its row, then by its column sum; only for ``h_res="sinkhorn"``: the
    other maps' own arithmetic on their k logits is not counted). The projection ``x phi`` is a matmul and
    counted as one. Residual: the add, C per sublayer. Other connections: 0 (not counted)."""
    n, c, sublayers = cfg.n_streams, cfg.dim, 2 * cfg.n_layers
    if cfg.connection == "residual":
        return sublayers * c
    if cfg.connection != "mhc":
        return 0
    sinkhorn = 4 * cfg.sinkhorn_iters * n * n if cfg.h_res == "sinkhorn" else 0
    return sublayers * (3 * n * c + 2 * n * c + 2 * n * n * c + 2 * n * c + sinkhorn)


def forward_flops_per_token(cfg, seq_len: int) -> float:
    """Forward FLOPs per token of a model (``cfg``: a ModelConfig) on ``seq_len`` tokens: every matmul as
    ``torch.utils.flop_counter`` counts it (2 per multiply-add; attention included) plus
    :func:`connection_flops_per_token`. Elementwise work inside the sublayers (norms, activations, softmax) is
    left out, for every arm alike."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DecoderLM(cfg)
    idx = torch.zeros(1, seq_len, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops() / seq_len + connection_flops_per_token(cfg)


def matched_width(base: TrainConfig, target: str, mhc_sets: tuple[str, ...] = ("model.connection=mhc",)
                  ) -> tuple[int, dict]:
    """The FFN hidden width (any integer) at which the residual network of config ``base`` comes closest to the
    mHC network ``base`` + ``mhc_sets`` in ``target`` ("params": parameter count, or "flops": forward FLOPs per
    token, :func:`forward_flops_per_token`); with ``{"target", "mhc", "residual", "relative_difference"}``.
    Both figures are affine in the width, so two builds give the slope."""
    def model_cfg(*sets):
        return build_config(base=base.to_dict(), overrides=list(sets)).model

    def measure(cfg):
        return DecoderLM(cfg).num_params() if target == "params" else forward_flops_per_token(cfg, base.seq_len)

    goal = measure(model_cfg(*mhc_sets))
    h0 = model_cfg("model.connection=residual").ffn_hidden
    at = {h: measure(model_cfg("model.connection=residual", f"model.mlp_hidden={h}")) for h in (h0, h0 + 1)}
    width = max(1, h0 + round((goal - at[h0]) / (at[h0 + 1] - at[h0])))
    got = measure(model_cfg("model.connection=residual", f"model.mlp_hidden={width}"))
    return width, {"target": target, "mhc": goal, "residual": got, "relative_difference": got / goal - 1}


def resolve_matched(arms: list[tuple[str, list[str]]], base: TrainConfig) -> list[tuple[str, list[str]]]:
    """The arms with each matched mode (``MATCHED_MODES``) given its computed ``model.mlp_hidden``, matched to
    the comparison's first mHC arm (in ``arms`` order; e.g. ``mhc-circulant``), or to the base config's mHC
    network where no arm is mHC."""
    mhc = next((sets for _, sets in arms if "model.connection=mhc" in sets and "model.n_streams=1" not in sets),
               ["model.connection=mhc"])  # not the one-stream gate control
    out = []
    for name, sets in arms:
        if name in MATCHED_MODES and sets == ["model.connection=residual"]:
            width, _ = matched_width(base, MATCHED_MODES[name], tuple(mhc))
            sets = [*sets, f"model.mlp_hidden={width}"]
        out.append((name, sets))
    return out


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{stats.lr_key(lr)}-seed{seed}"


class Plan:
    """What a comparison runs: the base config (a dict), the arms, the lr grid and the seeds."""

    def __init__(self, base: dict, arms: list[tuple[str, list[str]]], lrs: list[float], seeds: list[int],
                 command: str):
        self.base, self.arms, self.lrs, self.seeds, self.command = base, arms, lrs, seeds, command

    def config(self, arm: str, lr: float, seed: int, runs_dir: Path) -> TrainConfig:
        sets = dict(self.arms)[arm]
        return build_config(base=self.base, overrides=[
            *sets, f"lr={lr!r}", f"seed={seed}", f"out_dir={runs_dir}", f"run_name={run_name(arm, lr, seed)}"])

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"base": self.base, "arms": self.arms, "lrs": self.lrs,
                                            "seeds": self.seeds, "command": self.command}, indent=2))

    @classmethod
    def load(cls, path: Path) -> Plan:
        if not path.is_file():
            raise UserError(f"{path} not found: is {path.parent} the --out directory of an `mhc compare`?")
        try:
            d = json.loads(path.read_text())
            return cls(d["base"], [(a, list(s)) for a, s in d["arms"]], d["lrs"], d["seeds"], d["command"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path} is not a readable comparison plan ({type(e).__name__}: {e}).") from None


def check_data(cfg: TrainConfig) -> None:
    """Read the corpus once before any run: a missing or too short corpus is one error, not N diverged runs."""
    from torch_mhc.train.data import TokenData, get_tokenizer, load_tokens, split_off_test

    cache = Path(cfg.out_dir) / "cache"  # the runs' cache: a bpe:VOCAB trained here is the one they train with
    tokens, _ = load_tokens(cfg.data, get_tokenizer(cfg.tokenizer, cfg.data, cache, cfg.val_fraction), cache)
    rest, test = split_off_test(tokens, cfg.test_fraction)
    if test.size < cfg.seq_len + 1:
        raise UserError(f"the test split ({test.size} tokens: test_fraction={cfg.test_fraction} of {tokens.size}) "
                        f"is shorter than one window of seq_len + 1 = {cfg.seq_len + 1}; raise test_fraction.")
    TokenData.from_tokens(rest, cfg.seq_len, cfg.val_fraction, what=f"data {cfg.data or '(default corpus)'}")


def test_loss(run_dir: Path, cfg: TrainConfig) -> dict:
    """Loss (and bits per byte) of the run's latest checkpoint on the held-out test split, tokenised with the
    run's own tokenizer (``data.run_tokenizer``)."""
    from torch_mhc.train.data import TokenData, bytes_per_token, load_tokens, run_tokenizer, split_off_test
    from torch_mhc.train.evaluate import load_run
    from torch_mhc.train.trainer import evaluate

    model, run_cfg, state = load_run(run_dir)
    tokenizer = run_tokenizer(run_dir, run_cfg, state)
    tokens, meta = load_tokens(cfg.data, tokenizer, run_dir.parent / "cache")
    _, test = split_off_test(tokens, cfg.test_fraction)
    split = TokenData(test[:0], test, cfg.seq_len, bytes_per_token(meta, tokenizer))
    device = next(model.parameters()).device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    batches = split.val_batches(cfg.batch_size, TEST_BATCHES_PER_EVAL_BATCH * cfg.eval_batches)
    r = evaluate(model, batches, device, autocast, split.bytes_per_token)
    return {"test_loss": r["val_loss"], "test_bpb": r.get("val_bpb"), "test_step": state["step"]}


def execute(cfg: TrainConfig, run_dir: Path, log=print) -> dict:
    """Bring one run to its end and return its ``result.json``: kept when it exists (finished or
    diverged); a run whose final checkpoint exists only gets its test loss; a run with an earlier
    checkpoint resumes from it; a run without one restarts from scratch. The run directory is locked
    while it trains (``train.rundir``), so two resumes of one comparison cannot write one run."""
    from torch_mhc.train.rundir import claim_new_run_dir, claim_run_dir
    from torch_mhc.train.trainer import train

    result_path = run_dir / RESULT
    if (kept := read_result(result_path, log)) is not None:
        log(f"== {run_dir.name}: kept ({kept['status']})")
        return kept
    ckpts = list_checkpoints(run_dir)
    last_step = int(CKPT_RE.match(ckpts[-1].name).group(1)) if ckpts else 0
    t0 = time.perf_counter()
    try:
        if ckpts and last_step < cfg.steps:
            log(f"== {run_dir.name}: resuming from step {last_step}")
            with claim_run_dir(run_dir) as claim:
                state = load_checkpoint(ckpts[-1])
                state["path"] = ckpts[-1]  # recorded in resumes.jsonl
                train(cfg, claim.path, resume_state=state, log=log)
        elif not ckpts:
            if run_dir.exists():
                log(f"== {run_dir.name}: restarting (no checkpoint was written)")
                with claim_run_dir(run_dir):  # not while another process writes it
                    shutil.rmtree(run_dir)
            else:
                log(f"== {run_dir.name}: {cfg.model.connection}, n={cfg.model.streams}, lr {cfg.lr:g}, seed {cfg.seed}")
            with claim_new_run_dir(run_dir.parent, run_dir.name, cfg.model.connection) as claim:
                train(cfg, claim.path, log=log)
    except DivergedError as e:  # a non-finite loss, gradient or weights: recorded, and the other runs go on
        result = {"status": "diverged", "message": str(e), "step": e.step, "wall_s": time.perf_counter() - t0}
        log(f"== {run_dir.name}: diverged: {e}")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        result = {"status": "finished", "wall_s": time.perf_counter() - t0, **test_loss(run_dir, cfg)}
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result


def read_result(path: Path, log=print) -> dict | None:
    """A run's ``result.json``, or None when there is none or it cannot be read (a file of an older version
    written in place and cut short by a kill, an edit): such a run is finished again."""
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding
        why = f"{type(e).__name__}: {e}"
    else:
        if isinstance(result, dict) and result.get("status") in ("finished", "diverged") and (
                result["status"] == "diverged" or isinstance(result.get("test_loss"), (int, float))):
            return result
        why = "not a run result"
    log(f"== {path.parent.name}: {path} cannot be read ({why}); finishing the run again")
    return None


def _execute_logged(cfg: TrainConfig, run_dir: Path) -> dict:
    """:func:`execute` in a worker process, its log lines prefixed with the run's name."""
    return execute(cfg, run_dir, log=lambda msg: print(f"[{run_dir.name}] {msg}", flush=True))


PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies (also of SIGKILL), so no worker
    trains on with nobody to collect its result. Elsewhere nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _worker(cfg: TrainConfig, run_dir: Path, threads: int, conn, parent: int) -> None:
    """A ``--jobs`` worker process: one run (:func:`execute`); sends ``("ok", result)`` or ``("error",
    exception or None, traceback)`` on ``conn``. Ctrl-C reaches every process of the terminal's group:
    the workers ignore SIGINT and the parent stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_parent(parent)
    torch.set_num_threads(threads)
    try:
        message = ("ok", _execute_logged(cfg, run_dir))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its traceback does
            e = None
        message = ("error", e, traceback.format_exc())
    conn.send(message)
    conn.close()


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) to the parent of ``--jobs`` workers: raised in its main thread, which then
    stops the workers; the command ends as after Ctrl-C (exit code 130, ``--resume`` continues)."""


@contextmanager
def _signals_interrupt():
    """While the workers run: SIGTERM, SIGHUP and SIGINT raise :class:`Interrupted` in this (main) thread,
    once; signals that come while the workers are being stopped are ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []

    def handler(signum, frame):
        if not hit:
            hit.append(signum)
            raise Interrupted(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stop_workers(procs: list, timeout: float = 30.0) -> None:
    """SIGTERM to every worker still running (a run's checkpoints are atomic), then SIGKILL to any left
    after ``timeout`` seconds; every one is waited for."""
    live = [p for p in procs if p.pid is not None and p.exitcode is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _outcome(message, name: str, exitcode: int | None, report_dir: Path) -> dict:
    """A worker's result, or its error raised here."""
    resume = f"Finished runs and every run's checkpoints are intact: `mhc compare --resume {report_dir}` continues."
    if message is None or not isinstance(message, tuple) or message[0] not in ("ok", "error"):
        if exitcode is not None and exitcode < 0:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        else:
            how = f"ended (exit status {exitcode})"
        raise UserError(f"the worker process of run {name} {how} before the run finished (each run of --jobs "
                        f"has its own process); the other runs were stopped. {resume}")
    if message[0] == "ok":
        return message[1]
    _, error, tb = message
    if isinstance(error, UserError):
        raise UserError(f"run {name}: {error}") from None
    if isinstance(error, BaseException):
        raise error from RuntimeError(f"in the worker process of run {name}:\n{tb}")
    raise RuntimeError(f"run {name} failed in its worker process:\n{tb}")


def execute_all(cells: dict, runs_dir: Path, jobs: int = 1, log=print) -> dict:
    """Bring every cell ``{key: TrainConfig}`` to its end (:func:`execute`) -> ``{key: result}``. With jobs > 1,
    up to ``jobs`` runs at once in worker processes (spawned: no state shared with this one), each with
    ``cores // jobs`` CPU threads. An error in one run (not a divergence, which is a result), a worker killed
    by a signal, or SIGTERM/SIGHUP/SIGINT to this process stops the other workers (none outlives this call);
    their checkpoints let ``--resume`` continue them."""
    if jobs == 1 or len(cells) <= 1:
        return {key: execute(cfg, runs_dir / cfg.run_name, log) for key, cfg in cells.items()}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = get_context("spawn")
    pending, running, procs, results = list(cells.items()), {}, [], {}
    with _signals_interrupt():
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    key, cfg = pending.pop(0)
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_worker, name=f"mhc compare: {cfg.run_name}",
                                       args=(cfg, runs_dir / cfg.run_name, threads, send, os.getpid()))
                    procs.append(proc)
                    running[recv] = (key, cfg.run_name, proc)
                    proc.start()
                    send.close()
                for conn in mp_connection.wait(list(running)):
                    key, name, proc = running.pop(conn)
                    try:
                        message = conn.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        message = None  # ended without sending its result
                    conn.close()
                    proc.join()
                    results[key] = _outcome(message, name, proc.exitcode, runs_dir.parent)
        except BaseException:
            names = [name for _, name, p in running.values() if p.exitcode is None]
            if names:
                log(f"== stopping the runs still going ({', '.join(names)}); "
                    f"`mhc compare --resume {runs_dir.parent}` continues them")
            raise
        finally:
            _stop_workers(procs)
    return {key: results[key] for key in cells}


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if key in r), None)


def _max(records: list[dict], key: str):
    return max((r[key] for r in records if key in r), default=None)


DIAG_MAXIMA = ("max_composite_fwd_gain", "max_composite_bwd_gain", "max_abs_alpha", "max_pre_saturated",
               "max_post_saturated", "max_read_share", "max_write_share", "max_res_zero_frac")


def _final_stream_health(run_dir: Path) -> dict:
    """At the last diagnostic step: the streams' mean distance from copies (layers after the first) and the whole
    stack's composite ``prod H_res`` distance from the uniform J/n (spectral norm, from the token-mean H_res;
    None for one stream, where J/n is 1)."""
    path = run_dir / "diagnostics.jsonl"
    records = read_jsonl(path) if path.is_file() else []
    if not records:
        return {"stream_copy_dist": None, "stack_from_uniform": None}
    last = records[-1]
    h_res = torch.as_tensor(last["h_res_mean"], dtype=torch.float64)
    stack = distance_from_uniform(composites(h_res)[0]).item() if h_res.shape[-1] > 1 else None
    return {"stream_copy_dist": mean_stream_copy_dist(last["layers"]), "stack_from_uniform": stack}


def initial_diagnostics(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """``collect_diagnostics`` of the run's model as training built it at step 0 (the trainer seeds the global
    generator with ``cfg.seed`` and builds ``DecoderLM(cfg.model)``), on the run's diagnostic batch; the
    trainer records none at step 0. None for a residual or ``init_from`` run, or one without checkpoint or
    diagnostics."""
    from torch_mhc.train.data import run_tokenizer
    from torch_mhc.train.trainer import load_data

    ckpts = list_checkpoints(run_dir)
    if cfg.model.connection == "residual" or cfg.init_from or not cfg.diag_every or not ckpts:
        return None
    tokenizer = run_tokenizer(run_dir, cfg, load_checkpoint(ckpts[-1]))
    data, _ = load_data(cfg, run_dir.parent / "cache", log=lambda *_: None, tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DecoderLM(cfg.model)
    return collect_diagnostics(model, diagnostic_batch(data, cfg.batch_size), step=0)


def h_res_travel(cfg: TrainConfig, run_dir: Path) -> dict | None:
    """Where H_res went in one run, per diagnostic step from step 0 (:func:`initial_diagnostics`) to the last:
    ``steps`` and, mean over layers (Frobenius, token-mean H_res on the diagnostic batch), ``from_start``,
    ``from_identity``, ``from_uniform`` (:func:`~torch_mhc.diagnostics.collect.h_res_distances`); with the
    per-step diagnostic ``summary`` and the ``h_res_start`` / ``h_res_end`` matrices ``[L, n, n]``. None for a
    run without connections or diagnostics."""
    path = run_dir / "diagnostics.jsonl"
    records = [r for r in read_jsonl(path) if "h_res_mean" in r] if path.is_file() else []
    start = initial_diagnostics(cfg, run_dir) if records else None
    if start is None:
        return None
    records = [start, *records]
    dists = [h_res_distances(r["h_res_mean"], start["h_res_mean"]) for r in records]
    out = {"steps": [r["step"] for r in records], "summary": [r["summary"] for r in records]}
    out.update({k: [d[k] for d in dists] for k in ("from_start", "from_identity", "from_uniform")})
    out["h_res_start"], out["h_res_end"] = (_rounded(records[i]["h_res_mean"]) for i in (0, -1))
    return out


def _rounded(x, digits: int = 6):
    return [_rounded(v, digits) for v in x] if isinstance(x, list) else round(x, digits)


def travel_fields(travel: dict | None) -> dict:
    """The H_res columns of a summary.json row (None without a travel record)."""
    keys = ("h_res_start_from_identity", "h_res_start_from_uniform", "h_res_end_from_identity",
            "h_res_end_from_uniform", "h_res_end_from_start", "h_res_max_from_start")
    if travel is None:
        return dict.fromkeys(keys)
    values = (travel["from_identity"][0], travel["from_uniform"][0], travel["from_identity"][-1],
              travel["from_uniform"][-1], travel["from_start"][-1], max(travel["from_start"]))
    return dict(zip(keys, values))


def run_row(arm: str, lr: float, seed: int, cfg: TrainConfig, run_dir: Path, result: dict, params: int,
            travel: dict | None = None) -> dict:
    """One row of summary.json: the run's identity, result, losses and stability figures."""
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    step_norms = run_dir / "grad_norms.jsonl"
    if step_norms.is_file():
        norms, over = [r["grad_norm"] for r in read_jsonl(step_norms) if r["step"] > cfg.warmup], "every step"
    else:
        norms, over = [r["grad_norm"] for r in metrics if r["step"] > cfg.warmup], "logged steps"
    row = {"name": run_dir.name, "arm": arm, "lr": lr, "seed": seed, "status": result["status"],
           "message": result.get("message"), "steps": _last(metrics, "step"), "params": params,
           "n": cfg.model.streams, "train_loss": _last(metrics, "loss"), "val_loss": _last(metrics, "val_loss"),
           "val_bpb": _last(metrics, "val_bpb"), "test_loss": result.get("test_loss"),
           "test_bpb": result.get("test_bpb"), "grad_spike": stats.grad_spike(norms), "grad_spike_over": over,
           "max_grad_norm": max(norms, default=None), **_final_stream_health(run_dir),
           "tokens_per_s": _last(metrics, "tokens_per_s"), "wall_s": result.get("wall_s")}
    row.update({k: _max(metrics, k) for k in DIAG_MAXIMA})
    if cfg.model.connection != "mhc" or "res" not in cfg.model.learn:
        row["max_res_zero_frac"] = None  # only a learned mHC H_res has entries that underflow
    row.update(travel_fields(travel))
    not_finite = [f"{k} {row[k]}" for k in ("val_loss", "test_loss")
                  if row[k] is not None and not math.isfinite(row[k])]
    if result["status"] == "finished" and not_finite:  # e.g. a NaN evaluation after a finite last training step
        row["status"], row["message"] = "diverged", f"finished training with a non-finite {', '.join(not_finite)}"
    if row["status"] != "finished":
        row["val_loss"] = row["val_bpb"] = None  # a diverged run has no final validation loss
        row["test_loss"] = row["test_bpb"] = None
    return strict_json(row)


def strict_json(x):
    """``x`` with every NaN or infinite float replaced by None: summary.json is strict JSON."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [strict_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def build_protocol(plan: Plan, rows: list[dict], params: dict[str, int]) -> dict:
    """The ``protocol`` object of summary.json (docs/results/README.md describes every field)."""
    cell = {(r["arm"], r["lr"], r["seed"]): r for r in rows}
    arms: dict[str, dict] = {}
    for arm, _ in plan.arms:
        tried = sorted({r["lr"] for r in rows if r["arm"] == arm})
        vals = {lr: [cell[arm, lr, s]["val_loss"] for s in plan.seeds if (arm, lr, s) in cell] for lr in tried}
        selected = stats.select_lr(vals)
        by_lr = {}
        for lr in tried:
            members = [cell[arm, lr, s] for s in plan.seeds if (arm, lr, s) in cell]
            by_lr[stats.lr_key(lr)] = {**stats.mean_sd([v for v in vals[lr] if v is not None]),
                                       "runs": [m["name"] for m in members],
                                       "diverged": [m["name"] for m in members if m["status"] != "finished"]}
        test = {s: cell[arm, selected, s]["test_loss"] for s in plan.seeds if (arm, selected, s) in cell}
        arms[arm] = {"selected_lr": selected, "at_grid_edge": stats.at_edge(selected, tried),
                     "lrs_run": tried, "extended_to": [lr for lr in tried if lr not in plan.lrs],
                     "params": params[arm], "val_loss_by_lr": by_lr,
                     "test_loss": stats.mean_sd([v for v in test.values() if v is not None]),
                     "test_loss_per_seed": {str(s): v for s, v in test.items()}}
    base = arms.get(BASELINE)
    common = None  # the residual's best lr on the grid every arm ran
    if base is not None:
        common = stats.select_lr({lr: list(_losses(cell, BASELINE, lr, plan.seeds, "val_loss").values())
                                  for lr in plan.lrs})
    for arm, entry in arms.items():
        entry["gap_to_residual"] = entry["gap_to_residual_at_common_lr"] = None
        if base is None or arm == BASELINE:
            continue
        if entry["selected_lr"] is not None and base["selected_lr"] is not None:
            entry["gap_to_residual"] = stats.paired_gap(_losses(cell, arm, entry["selected_lr"], plan.seeds),
                                                        _losses(cell, BASELINE, base["selected_lr"], plan.seeds))
        if common is not None:
            entry["gap_to_residual_at_common_lr"] = {"lr": common, **stats.paired_gap(
                _losses(cell, arm, common, plan.seeds), _losses(cell, BASELINE, common, plan.seeds))}
    cfg = plan.base
    return {"lrs": plan.lrs, "seeds": plan.seeds, "selection": "lowest mean validation loss over the seeds",
            "final_figures": "test split", "test_fraction": cfg["test_fraction"], "val_fraction": cfg["val_fraction"],
            "test_windows": f"at most {TEST_BATCHES_PER_EVAL_BATCH * cfg['eval_batches']} batches of "
                            f"{cfg['batch_size']} x {cfg['seq_len']} tokens",
            "baseline": BASELINE if base is not None else None, "common_lr": common,
            "resolved_rule": stats.RESOLVED_RULE, "confidence": stats.CONFIDENCE, "power": stats.POWER,
            "min_resolvable_rule": "(t_{0.975, k-1} + t_{0.80, k-1}) sd / sqrt(k) for k paired seeds",
            "arms": arms, "pairwise": pairwise_gaps(arms, cell, plan.seeds)}


def pairwise_gaps(arms: dict[str, dict], cell: dict, seeds: list[int]) -> dict[str, dict]:
    """``"A - B"`` -> the test-loss gap of arm A (at its selected lr) to arm B (at its), paired by seed
    (:func:`stats.paired_gap`), for every pair of arms with a selected lr, B listed before A."""
    chosen = [(a, e["selected_lr"]) for a, e in arms.items() if e["selected_lr"] is not None]
    out = {}
    for i, (b, lr_b) in enumerate(chosen):
        for a, lr_a in chosen[i + 1:]:
            out[f"{a} - {b}"] = stats.paired_gap(_losses(cell, a, lr_a, seeds), _losses(cell, b, lr_b, seeds))
    return out


def _losses(cell: dict, arm: str, lr: float, seeds: list[int], key: str = "test_loss") -> dict[int, float | None]:
    """Seed -> the run's ``key`` for the seeds that have a run of ``arm`` at ``lr``."""
    return {s: cell[arm, lr, s][key] for s in seeds if (arm, lr, s) in cell}


def compare(config: str | None, modes: list[str], overrides: list[str], out: str = "", variants: list[str] = (),
            seeds: list[int] = (), lrs: list[float] = (), resume: str = "", jobs: int = 1, log=print) -> Path:
    """Run the protocol (or finish the one in ``resume``) and write summary.json, report.md and plots;
    ``jobs`` runs at once (:func:`execute_all`)."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UserError(f"--jobs must be an integer >= 1 (got {jobs!r}).")
    if resume:
        report_dir = Path(resume)
        plan = Plan.load(report_dir / PLAN)
    else:
        arms = parse_arms(modes, list(variants))
        base_cfg = build_config(config_file=config, overrides=overrides)  # validates before anything is written
        if base_cfg.test_fraction == 0:  # the protocol needs a test split: as large as the validation split
            base_cfg = build_config(base=base_cfg.to_dict(), overrides=[f"test_fraction={base_cfg.val_fraction}"])
        arms = resolve_matched(arms, base_cfg)
        if any(lr <= 0 for lr in lrs):
            raise UserError(f"--lrs must be positive (got {', '.join(map(str, lrs))}).")
        lrs = sorted(set(lrs)) or [base_cfg.lr]
        seeds = list(dict.fromkeys(seeds)) or [base_cfg.seed]
        report_dir = Path(out) if out else Path(base_cfg.out_dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
        if report_dir.exists() and any(report_dir.iterdir()):
            raise UserError(f"report directory {report_dir} exists and is not empty; nothing was overwritten. "
                            f"Choose another --out, or continue it with --resume {report_dir}.")
        from_cli = sys.argv and (Path(sys.argv[0]).name == "mhc" or sys.argv[0].endswith("torch_mhc/__main__.py"))
        command = "mhc " + " ".join(sys.argv[1:]) if from_cli else "compare(...)"
        plan = Plan(base_cfg.to_dict(), arms, lrs, seeds, command)
    runs_dir = report_dir / "runs"
    cfgs = {(a, lr, s): plan.config(a, lr, s, runs_dir) for s in plan.seeds for lr in plan.lrs for a, _ in plan.arms}
    check_data(next(iter(cfgs.values())))
    params = {a: DecoderLM(plan.config(a, plan.lrs[0], plan.seeds[0], runs_dir).model).num_params(trained_only=True)
              for a, _ in plan.arms}
    if not resume:
        runs_dir.mkdir(parents=True, exist_ok=True)
        plan.save(report_dir / PLAN)
    results = execute_all(cfgs, runs_dir, jobs, log)
    extension = {}
    for arm, _ in plan.arms:  # a selected lr at an edge of the grid: one grid step further for that arm
        val = {lr: [_val_loss(runs_dir / plan.config(arm, lr, s, runs_dir).run_name, results[arm, lr, s])
                    for s in plan.seeds] for lr in plan.lrs}
        step = stats.extension(stats.select_lr(val), plan.lrs) if stats.select_lr(val) is not None else None
        if step is not None:
            log(f"== {arm}: best at the edge lr {stats.select_lr(val):g}; extending its grid to {step:g}")
            extension.update({(arm, step, s): plan.config(arm, step, s, runs_dir) for s in plan.seeds})
    cfgs.update(extension)
    results.update(execute_all(extension, runs_dir, jobs, log))
    return write_outputs(report_dir, plan, cfgs, results, params)


def summarize(report_dir: str | Path, log=print) -> Path:
    """summary.json, report.md and plots of a comparison from the runs that have a ``result.json``, running
    nothing: a comparison cut short is summarised over the seeds each arm has (the cells without a result are
    listed in the protocol's ``not_run``; an lr extension is not started). ``--resume`` finishes it instead."""
    report_dir = Path(report_dir)
    plan = Plan.load(report_dir / PLAN)
    runs_dir = report_dir / "runs"
    cfgs, results, not_run = {}, {}, []
    for arm, _ in plan.arms:
        found = {(float(m.group(1)), int(m.group(2))) for d in runs_dir.glob(f"{arm}-lr*-seed*")
                 if (m := re.fullmatch(rf"{re.escape(arm)}-lr([0-9.e+-]+)-seed(\d+)", d.name))}
        for lr, seed in sorted(found | {(lr, s) for lr in plan.lrs for s in plan.seeds}):
            cfg = plan.config(arm, lr, seed, runs_dir)
            result = read_result(runs_dir / cfg.run_name / RESULT, log)
            if result is None:
                not_run.append(cfg.run_name)
            else:
                cfgs[arm, lr, seed], results[arm, lr, seed] = cfg, result
    if not cfgs:
        raise UserError(f"no run in {runs_dir} has finished: nothing to summarise.")
    params = {a: DecoderLM(plan.config(a, plan.lrs[0], plan.seeds[0], runs_dir).model).num_params(trained_only=True)
              for a, _ in plan.arms}
    log(f"== summarising {len(cfgs)} finished runs; not run: {', '.join(not_run) or 'none'}")
    return write_outputs(report_dir, plan, cfgs, results, params, not_run)


def write_outputs(report_dir: Path, plan: Plan, cfgs: dict, results: dict, params: dict[str, int],
                  not_run: list[str] = ()) -> Path:
    """summary.json, diagnostics_summary.json, the plots and report.md of the runs ``cfgs`` ((arm, lr, seed) ->
    config) with their ``results``."""
    runs_dir = report_dir / "runs"
    ordered = sorted(cfgs.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0]))
    travels = {cfg.run_name: h_res_travel(cfg, runs_dir / cfg.run_name) for _, cfg in ordered}
    rows = [run_row(a, lr, s, cfg, runs_dir / cfg.run_name, results[a, lr, s], params[a], travels[cfg.run_name])
            for (a, lr, s), cfg in ordered]
    protocol = build_protocol(plan, rows, params)
    if not_run:
        protocol["not_run"] = list(not_run)
    atomic_write_text(report_dir / "summary.json", json.dumps({"protocol": protocol, "runs": rows}, indent=2))
    atomic_write_text(report_dir / DIAGNOSTICS_SUMMARY, json.dumps(
        strict_json({name: t for name, t in travels.items() if t is not None}), allow_nan=False))
    from torch_mhc.reports.protocol_plots import plot_protocol

    plots = plot_protocol(protocol, rows, runs_dir, report_dir)
    return write_report(report_dir, plan, protocol, rows, plots)


def _val_loss(run_dir: Path, result: dict) -> float | None:
    if result["status"] != "finished":
        return None
    return _last(read_jsonl(run_dir / "metrics.jsonl"), "val_loss")


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _pm(d: dict | None, spec=".4f") -> str:
    if not d or d.get("mean") is None:
        return "-"
    return format(d["mean"], spec) + ("" if d.get("sd") is None else f" +- {d['sd']:.4f}")


def _gap_cell(g: dict | None) -> str:
    """mean [95% interval] p, each seed's gap; bold "resolved" where the interval excludes 0."""
    if not g or g.get("mean") is None:
        return "-"
    seeds = ", ".join(f"{v:+.4f}" for v in g["per_seed"].values())
    if g.get("ci95") is None:
        return f"{g['mean']:+.4f} ({seeds}; one seed: no interval)"
    lo, hi = g["ci95"]
    return (f"{g['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] p={_p(g['p_value'])} ({seeds})"
            f"{' **resolved**' if g['resolved'] else ''}")


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _spread(values: list[float], spec=".3f") -> str:
    """mean (min-max) of the values, or the one value."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{mean:{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


STABILITY_COLUMNS = (("grad_spike", ".1f", max), ("max_composite_fwd_gain", ".3g", max),
                     ("max_composite_bwd_gain", ".3g", max), ("max_abs_alpha", ".3f", max),
                     ("max_pre_saturated", ".3f", max), ("max_post_saturated", ".3f", max),
                     ("stream_copy_dist", ".3f", min), ("stack_from_uniform", ".3g", min),
                     ("max_read_share", ".3f", max),
                     ("max_write_share", ".3f", max), ("max_res_zero_frac", ".3g", max))


def power_note(arms: dict[str, dict], protocol: dict) -> list[str]:
    """The report's note on what the seeds can resolve: per arm, the smallest true gap to the residual that
    these seeds, with the gap's observed sd, resolve with 80% power."""
    gaps = {name: a["gap_to_residual"] for name, a in arms.items() if (a.get("gap_to_residual") or {}).get("sd")}
    if not gaps:
        return []
    cells = ", ".join(f"{name} {g['min_resolvable']:.4f} (sd {g['sd']:.4f}, {g['seeds']} seeds)"
                      for name, g in gaps.items())
    return ["", f"Power: a gap is resolved when its paired Student-t 95% interval excludes 0. The smallest true gap "
                f"that k seeds resolve with 80% power, for a gap whose seed-to-seed sd is sd, is about "
                f"{protocol['min_resolvable_rule']} (normal-shift approximation to the noncentral t). With each "
                f"arm's observed sd of the gap to residual: {cells}."]


def h_res_table(arms: dict[str, dict], rows: list[dict]) -> list[str]:
    """Where H_res went, each arm at its selected lr: distances (Frobenius, token-mean H_res, mean over layers)
    from I, from J/n and from its step-0 value, mean (min-max) over seeds."""
    keys = ("h_res_start_from_identity", "h_res_start_from_uniform", "h_res_end_from_identity",
            "h_res_end_from_uniform", "h_res_end_from_start", "h_res_max_from_start")
    lines = []
    for name, a in arms.items():
        sel = [r for r in rows if r["arm"] == name and r["lr"] == a["selected_lr"]]
        if any(r.get("h_res_end_from_identity") is not None for r in sel):
            lines.append(f"| {name} | " + " | ".join(_spread([r[k] for r in sel if r.get(k) is not None], ".4f")
                                                     for k in keys) + " |")
    if not lines:
        return []
    return ["", "## Where H_res went (selected lr; mean (min-max) over seeds)", "",
            "Frobenius distance of the token-mean H_res (diagnostic batch) from I, from the uniform J/n and from its "
            "value at step 0, mean over layers; I and J/n are sqrt(n - 1) apart (1.732 for n = 4). Per diagnostic "
            f"step in `{DIAGNOSTICS_SUMMARY}`.", "",
            "| arm | start: from I | start: from J/n | end: from I | end: from J/n | end: from start | "
            "max from start |", "|---|---|---|---|---|---|---|", *lines]


def write_report(report_dir: Path, plan: Plan, protocol: dict, rows: list[dict], plots: list[Path]) -> Path:
    """report.md: the protocol, the lr sweep, test losses and paired gaps, stability, every run."""
    arms = protocol["arms"]
    wall = sum(r["wall_s"] or 0 for r in rows)
    base_params = arms.get(BASELINE, {}).get("params")
    all_lrs = sorted({lr for a in arms.values() for lr in a["lrs_run"]})
    lines = [
        "# mhc compare", "",
        f"- command: `{plan.command}`",
        f"- date: {datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device_name()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}",
        f"- runs: {len(rows)} ({sum(r['status'] == 'finished' for r in rows)} finished); "
        f"training wall time {wall:.0f} s (this process's share for resumed runs)",
        f"- protocol: lr grid {', '.join(map(stats.lr_key, plan.lrs))}; seeds {', '.join(map(str, plan.seeds))}; "
        f"each arm's lr has the lowest mean validation loss; an arm best at a grid edge runs one grid step further; "
        f"final figures on a held-out test split (last {protocol['test_fraction']:g} of the tokens, "
        f"{protocol['test_windows']}) that neither training nor selection read. Gaps are paired by seed; a gap "
        f"is **resolved** when {protocol['resolved_rule']}.", "",
        "## Validation loss by learning rate (mean +- sd over seeds; * selected)", "",
        "| arm | params | " + " | ".join(f"lr {stats.lr_key(lr)}" for lr in all_lrs)
        + " | selected lr | at grid edge |",
        "|---|---|" + "---|" * len(all_lrs) + "---|---|",
    ]
    for name, a in arms.items():
        cells = []
        for lr in all_lrs:
            c = a["val_loss_by_lr"].get(stats.lr_key(lr))
            if c is None:
                cells.append("")
                continue
            text = _pm(c) + (f" ({len(c['diverged'])} diverged)" if c["diverged"] else "")
            cells.append(("**" + text + "** *") if lr == a["selected_lr"] else text)
        rel = f" ({100 * (a['params'] / base_params - 1):+.1f}%)" if base_params and name != BASELINE else ""
        lines.append(f"| {name} | {a['params']:,}{rel} | " + " | ".join(cells) +
                     f" | {_fmt(a['selected_lr'], 'g')} | {'yes' if a['at_grid_edge'] else 'no'} |")
    common = protocol["common_lr"]
    lines += ["", "## Test loss at each arm's selected lr, and gaps to residual paired by seed", "",
              f"| arm | selected lr | test loss | gap to residual at selected lrs (per seed) | "
              f"gap to residual at common lr {_fmt(common, 'g')} (per seed) |", "|---|---|---|---|---|"]
    for name, a in arms.items():
        lines.append(f"| {name} | {_fmt(a['selected_lr'], 'g')} | {_pm(a['test_loss'])} | "
                     f"{_gap_cell(a['gap_to_residual'])} | {_gap_cell(a['gap_to_residual_at_common_lr'])} |")
    lines += power_note(arms, protocol)
    if protocol.get("pairwise"):
        lines += ["", "## Gaps between arms (test loss at each arm's selected lr, paired by seed)", "",
                  "| A - B | gap [95% interval] p (per seed) | smallest gap resolvable at 80% power |", "|---|---|---|"]
        lines += [f"| {pair} | {_gap_cell(g)} | {_fmt(g['min_resolvable'])} |"
                  for pair, g in protocol["pairwise"].items()]
    lines += h_res_table(arms, rows)
    lines += ["", "## Stability at each arm's selected lr (worst seed)", "",
              "| arm | grad-norm spike (max/median after warmup) | over | max composite fwd gain | "
              "max composite bwd gain | max abs alpha | max H_pre saturated | max H_post saturated | "
              "final stream copy distance (min over seeds) | final stack prod H_res from J/n (min over seeds) | "
              "max read share | max write share | max H_res zero fraction |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        sel = [r for r in rows if r["arm"] == name and r["lr"] == a["selected_lr"]]
        if not sel:
            continue

        def worst(key, spec, pick=max):
            vals = [r[key] for r in sel if r[key] is not None]
            return _fmt(pick(vals) if vals else None, spec)

        cells = [worst(k, spec, pick) for k, spec, pick in STABILITY_COLUMNS]
        lines.append(f"| {name} | {cells[0]} | {sel[0]['grad_spike_over']} | " + " | ".join(cells[1:]) + " |")
    diverged = [r for r in rows if r["status"] != "finished"]
    if diverged:
        lines += ["", "## Diverged runs", ""] + [f"- {r['name']}: {r['message']}" for r in diverged]
    if protocol.get("not_run"):
        lines += ["", "## Not run (summarised without them: each arm's figures cover the seeds it has)", "",
                  ", ".join(protocol["not_run"])]
    lines += ["", "## Every run", "", "| run | status | params | n | train loss | val loss | test loss | test bpb | "
              "grad-norm spike | tokens/s | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['status']} | {r['params']:,} | {r['n']} | {_fmt(r['train_loss'])} | "
                     f"{_fmt(r['val_loss'])} | {_fmt(r['test_loss'])} | {_fmt(r['test_bpb'])} | "
                     f"{_fmt(r['grad_spike'], '.1f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['wall_s'], '.0f')} |")
    lines += ["", "Gains are maxima over the diagnostic steps of the composite `prod H_res` from any layer to the last "
              "(H_res averaged over the tokens of a fixed validation batch). Saturation, alpha and stream figures "
              "come from the same diagnostic steps; the stack's distance from J/n is the spectral norm of "
              "`prod H_res - J/n` over all sublayers at the last diagnostic step (for a doubly stochastic product its "
              "second singular value: 1 for a permutation, 0 when the streams are averaged into one). Plots show "
              "each arm at its selected lr (bands: mean +- sd over seeds; per-step and per-layer plots: the first "
              "seed).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (report_dir / "report.md").write_text("\n".join(lines) + "\n")
    return report_dir / "report.md"
