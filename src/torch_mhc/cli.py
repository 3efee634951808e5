"""The ``mhc`` command: train, eval, sample, diagnose, compare, memory, export-weights, plot, export, convert,
config."""

from __future__ import annotations

import argparse
import copy
import difflib
import errno
import json
import os
import sys
from pathlib import Path

from torch_mhc.train.config import UserError


def _cmd_train(args) -> None:
    from torch_mhc.distributed import runtime
    from torch_mhc.train.checkpoint import latest_any_checkpoint
    from torch_mhc.train.trainer import resume_run, start_run

    if args.resume and args.config:
        raise UserError("--resume continues a run with its own config; do not pass --config with it (use --set).")
    if args.init_from:
        if args.resume:
            raise UserError("--init-from starts a new run; a resumed run keeps the model it started from.")
        args.set = [f"init_from={args.init_from}", *args.set]
    if args.allow_data_change and not args.resume:
        raise UserError("--allow-data-change only applies with --resume.")
    runtime.init_from_env()  # under torchrun: join the process group
    if args.resume:
        run_dir, last = resume_run(args.resume, args.set, allow_data_change=args.allow_data_change)
    else:
        run_dir, last = start_run(args.config, args.set)
    if not runtime.is_main_process():
        return
    print(f"done. run directory: {run_dir}")
    print(f"  metrics:    {run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint: {latest_any_checkpoint(run_dir)}")
    if "val_bpb" in last:
        print(f"  final validation: loss {last['val_loss']:.4f}, {last['val_bpb']:.4f} bits per byte")


def _cmd_eval(args) -> None:
    from torch_mhc.train.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, data=args.data, max_batches=args.max_batches)
    print(json.dumps(result, indent=2))


def _cmd_sample(args) -> None:
    from torch_mhc.train.evaluate import sample_run

    sample_run(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
               on_text=lambda text: print(text, end="", flush=True))  # the text as it is generated
    print()


def _cmd_diagnose(args) -> None:
    from torch_mhc.reports.report import diagnose_run
    from torch_mhc.train.rundir import ensure_dir

    if args.out:
        ensure_dir(args.out, "--out")

    print(diagnose_run(args.run_dir, args.out))


def _cmd_compare(args) -> None:
    from torch_mhc.reports.compare import compare

    if args.resume and (args.config or args.set or args.variant or args.seeds or args.lrs or args.modes or args.out):
        raise UserError("--resume OUT finishes the comparison planned in OUT/plan.json; pass no other options.")
    seeds = _numbers(args.seeds, int, "--seeds", "integers")
    lrs = _numbers(args.lrs, float, "--lrs", "numbers")
    if args.out:
        from torch_mhc.train.rundir import check_dir_path

        check_dir_path(args.out, "--out")
    modes = (args.modes or "residual,hc,mhc").split(",")
    report = compare(args.config, modes, args.set, args.out, variants=args.variant, seeds=seeds, lrs=lrs,
                     resume=args.resume, jobs=args.jobs)
    print(f"report: {report}")


def _cmd_memory(args) -> None:
    from torch_mhc.distributed.memory import LAYOUT_KEYS, memory_table, parse_row
    from torch_mhc.train.config import build_config

    cfg = build_config(config_file=args.config, overrides=args.set)
    for text in args.layouts:
        try:
            parse_row(text)
        except (TypeError, ValueError) as e:
            raise UserError(f"layout {text!r} is not KEY=VALUE[,KEY=VALUE] over {', '.join(LAYOUT_KEYS)} "
                            f"(none, block or every:K) ({e}).") from None  # ac is the last key
    print(args.config + ": " + "\n".join(memory_table(cfg, args.layouts)))


def _cmd_export_weights(args) -> None:
    from torch_mhc.distributed.checkpoint import check_weights_file, export_weights, save_safetensors
    from torch_mhc.train.checkpoint import latest_any_checkpoint, load_checkpoint

    out = check_weights_file(args.out)  # before anything is loaded
    path = Path(args.checkpoint)
    if path.is_dir() and not (path / ".metadata").is_file():
        path = latest_any_checkpoint(path)  # a run directory
    if path.is_dir():
        out = export_weights(path, out)  # a committed distributed checkpoint that verifies, or a clear error
    else:
        state = load_checkpoint(path)["model"]
        seen, tensors = set(), {}
        for k, v in state.items():  # tied weights share storage, which safetensors refuses: copy the second
            tensors[k] = v.clone() if v.data_ptr() in seen else v.contiguous()
            seen.add(v.data_ptr())
        out = save_safetensors(tensors, out, {"source": str(path)})
    print(out)


def _numbers(text: str, kind, option: str, what: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise UserError(f"{option} expects comma-separated {what}, got {text!r}.") from None


def _cmd_plot(args) -> None:
    from torch_mhc.reports.plots import plot_runs

    for path in plot_runs(args.run_dirs, Path(args.out), bpb=args.bpb):
        print(path)


def _cmd_export(args) -> None:
    from torch_mhc.integrations.export import export_run

    export_run(args.run_dir, args.out_dir)


def _cmd_convert(args) -> None:
    from torch_mhc.integrations.convert import convert_dir

    convert_dir(args.hf_dir, args.out_dir, args.streams)


def _cmd_config(args) -> None:
    print(settings_table(args.keys))


def settings_table(keys: list[str] | None = None) -> str:
    """Every setting (or those under ``keys``: ``model``, ``lr``) as a table of key, type, default and meaning,
    from the config dataclasses' fields and comments (``config.settings``)."""
    from torch_mhc.train.config import close_settings, describe, format_default, settings

    rows = settings()
    if keys:
        chosen = [s for s in rows if any(s.key == k or s.key.startswith(k.rstrip(".") + ".") for k in keys)]
        for k in keys:
            if not any(s.key == k or s.key.startswith(k.rstrip(".") + ".") for s in rows):
                sections = sorted({s.key.split(".")[0] for s in rows if "." in s.key})
                close = [f"the section {name}" for name in difflib.get_close_matches(k, sections, 2, 0.7)]
                close += map(describe, close_settings(k))
                hint = " Did you mean: " + "; ".join(close) + "?" if close else ""
                raise UserError(f"no setting or section {k!r}.{hint} `mhc config` lists them all.")
        rows = chosen
    table = [("KEY", "TYPE", "DEFAULT", "MEANING")] + [(s.key, s.type, format_default(s.default), s.help)
                                                        for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in table]
    return ("Settings of `mhc train --set KEY=VALUE` and of --config files (TOML: the model.* keys in a [model] "
            "table, parallel.* in [parallel]):\n\n" + "\n".join(line.rstrip() for line in lines))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default at the end of its help ("(default: 50)"), unless it has none (None, false, empty)
    or the help already says it; descriptions and epilogs keep their line breaks."""

    @staticmethod
    def _shown_default(action) -> str | None:
        default = action.default
        if default is None or default is False or default in (argparse.SUPPRESS, "", []):
            return None
        text = repr(default) if isinstance(default, str) and (not default.strip() or default != default.strip()
                                                               or "\n" in default) else str(default)
        return text.replace("%", "%%")

    def _get_help_string(self, action) -> str:
        help_text, default = action.help or "", self._shown_default(action)
        if default is None or "default" in help_text.lower():
            return help_text
        return f"{help_text} (default: {default})".strip()

    def _format_action(self, action):
        if not action.help and self._shown_default(action) is not None:  # an option without help: its default
            action = copy.copy(action)
            action.help = f"(default: {self._shown_default(action)})"
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p = argparse.ArgumentParser(prog="mhc", description="Train and study mHC, HC and residual language models.",
                                parents=[common], formatter_class=HelpFormatter,
                                epilog="Every setting of `mhc train --set KEY=VALUE` (type, default, meaning): "
                                       "mhc config. One command's options: mhc COMMAND --help.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common],
                       help="train a language model (default: small mHC model on the Python stdlib)",
                       description="Train a language model: by default a small mHC model on the Python standard "
                                   "library, on CPU or GPU.",
                       epilog="Every setting (KEY of --set, and of --config files) with its type, default and "
                              "meaning: mhc config\n(one section or key: mhc config model, mhc config lr).\n"
                              "Example: mhc train --set model.connection=hc --set steps=500 --set lr=1e-3")
    t.add_argument("--config", help="TOML or JSON config file (keys as in `mhc config`)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. model.connection=hc (repeatable; every KEY: mhc config)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument("--init-from", metavar="HF_DIR", help="continue pretraining a transformers model ('mhc convert' "
                   "output, or a Llama/Mistral/Qwen2/Qwen3 directory, converted with model.n_streams)")
    t.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue even though the training data differs from the run's (recorded)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", parents=[common], help="validation loss / bits per byte of a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--data", help="evaluate on this data instead of the run's validation split (the whole source)")
    e.add_argument("--max-batches", type=int, default=50, help="batches of the validation split (or of --data)")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("sample", parents=[common], help="generate text from a run's latest checkpoint")
    s.add_argument("run_dir")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_sample)

    d = sub.add_parser("diagnose", parents=[common],
                       help="gains and coefficient statistics of a run's latest checkpoint")
    d.add_argument("run_dir")
    d.add_argument("--out", help="directory for the plots (default: RUN_DIR/diagnose)")
    d.set_defaults(func=_cmd_diagnose)

    c = sub.add_parser("compare", parents=[common],
                       help="every arm at every lr and seed on one corpus; lr selected on validation, "
                            "final figures on a held-out test split; write summary.json, report.md and plots")
    c.add_argument("--config", help="TOML or JSON config file shared by all arms")
    c.add_argument("--modes", default="",
                   help="comma-separated arms: residual, hc, mhc, the controls mhc-gate (n=1: the write gate "
                        "alone), mhc-identity and hc-identity (H_res fixed to I), residual-params and residual-flops "
                        "(FFN widened to the first mHC arm's parameters / forward FLOPs), and mhc with another "
                        "H_res map: mhc-permutation-mixture, mhc-circulant, mhc-kronecker; default residual,hc,mhc")
    c.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an extra arm: a name and its overrides, e.g. 'iters5:model.sinkhorn_iters=5' (repeatable)")
    c.add_argument("--lrs", default="", help="comma-separated lr grid, e.g. 1e-3,3e-3,1e-2 (default: the config's lr)")
    c.add_argument("--seeds", default="", help="comma-separated seeds; every cell runs once per seed "
                                               "(default: the config's seed)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every arm (repeatable; every KEY: mhc config)")
    c.add_argument("--out", default="", help="report directory (default: OUT_DIR/compare-<timestamp>)")
    c.add_argument("--resume", default="", metavar="OUT",
                   help="finish an interrupted comparison: keep its finished runs, resume or restart the others")
    c.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at once, each in its own process with cores/N CPU threads")
    c.set_defaults(func=_cmd_compare)

    mm = sub.add_parser("memory", parents=[common], help="estimated memory per GPU of a config under parallel layouts")
    mm.add_argument("config", help="TOML or JSON training config, e.g. configs/paper-27b.toml")
    mm.add_argument("layouts", nargs="+", metavar="LAYOUT",
                    help="e.g. dp_shard=64, tp=8,dp_shard=8 or dp_shard=64,ac=block (activation checkpointing)")
    mm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. model.activation_checkpoint=block or seq_len=8192")
    mm.set_defaults(func=_cmd_memory)

    x = sub.add_parser("export-weights", parents=[common],
                       help="write a run's latest model weights (distributed or not) as one safetensors file")
    x.add_argument("checkpoint", help="a run directory, a dcp_step_* checkpoint directory or a step_*.pt file")
    x.add_argument("out", help="the .safetensors file to write")
    x.set_defaults(func=_cmd_export_weights)

    pl = sub.add_parser("plot", parents=[common], help="loss, grad-norm, gain and H_res plots for any runs")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", default="plots", help="directory for the PNGs")
    pl.add_argument("--bpb", action="store_true", help="plot bits per byte instead of nats per token (comparable "
                    "across tokenizers)")
    pl.set_defaults(func=_cmd_plot)

    ex = sub.add_parser("export", parents=[common], help="a run's latest checkpoint as a transformers model directory")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir", help="new or empty directory")
    ex.set_defaults(func=_cmd_export)

    cv = sub.add_parser("convert", parents=[common],
                        help="a pretrained Llama/Mistral/Qwen2/Qwen3 directory as an mHC model")
    cv.add_argument("hf_dir")
    cv.add_argument("out_dir", help="new or empty directory")
    cv.add_argument("--streams", type=int, default=4, help="number of residual streams n")
    cv.set_defaults(func=_cmd_convert)

    cf = sub.add_parser("config", parents=[common], help="every setting of mhc train: key, type, default, meaning")
    cf.add_argument("keys", nargs="*", metavar="KEY", help="only these settings or sections (e.g. model, lr)")
    cf.set_defaults(func=_cmd_config)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
    return p


def _version() -> str:
    from torch_mhc import __version__

    return __version__


def _load_init_from(path: str, n: int):
    """``init_from`` runs (train, resume, eval, sample, export): the Hugging Face conversion, imported only then."""
    from torch_mhc.integrations.convert import load_for_training

    return load_for_training(path, n)


def main(argv: list[str] | None = None) -> int:
    from torch_mhc.train.trainer import register_init_from

    args = build_parser().parse_args(argv)
    register_init_from(_load_init_from)
    finished = False
    try:
        args.func(args)
        finished = True
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f" (rank {rank})" if rank is not None else ""
        print(f"mhc {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that no room turned into a UserError
        from torch_mhc.errors import write_failure

        kind = write_failure(e, e.filename or ".") if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else None
        if getattr(args, "debug", False) or kind is None:
            raise
        what = "the disk is full" if kind == "full" else "the file system is read-only"
        where = f" (writing {e.filename})" if e.filename else ""
        then = "free some space" if kind == "full" else "make it writable or choose a writable location"
        print(f"mhc {args.command}: error: {what}{where}: {e.strerror}. Finished checkpoints are intact; {then} and "
              f"run the command again{' (with --resume)' if args.command == 'train' else ''}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " Continue with `mhc compare --resume OUT`." if args.command == "compare" else ""
        print(f"mhc {args.command}: interrupted; the last checkpoint is intact.{hint}", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                if finished:  # every rank got here: tear gloo down together (a rank that destroyed its group
                    dist.barrier()  # while rank 0 still logged was seen to abort, SIGABRT, in a clean-clone CI run)
                dist.destroy_process_group()
                global _ran_distributed
                _ran_distributed = True
    return 0


_ran_distributed = False  # main() tore down a process group (a torchrun rank)


def run(argv: list[str] | None = None) -> None:
    """The ``mhc`` command: :func:`main`, then exit with its code. A torchrun rank leaves through ``os._exit``
    once its group is destroyed and its output flushed (its files are closed by then): gloo's worker threads
    can still hold work whose destruction during interpreter shutdown aborts the process (SIGABRT,
    "terminate called without an active exception"), which failed finished 2-rank runs in CI now and then."""
    code = main(argv)
    if _ran_distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
