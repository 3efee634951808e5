"""Generation speed against context length: ``DecoderLM.generate`` with the KV cache and without it.

For each context length L: a random prompt of L tokens, then ``--new`` greedy tokens, with the cache and
without (in turn, ``--reps`` times). Reported per mode: the first token's time (the prompt's forward) and
ms/token, the median time of each later token (a one-token forward against the cache, or, without it, a
forward over the whole sequence so far). Both modes must produce the same tokens (checked). The model is
``mhc train``'s default (dim 128, 3 blocks, 4 heads, byte vocabulary, mHC n = 4), with ``max_seq_len`` as
long as the longest context plus the new tokens, float32.

Times on the CPU are the process's CPU time with one thread (``--threads 1``; other processes on a shared
machine barely change it), on a GPU wall time between synchronisations.

    python bench/bench_generate.py                                   # CPU: contexts 32 .. 1024
    python bench/bench_generate.py --contexts 16 --new 4 --reps 1    # smoke run

Writes bench/results/generate-<device>-<date>.json with the device, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from torch_mhc.models.decoder import DecoderLM, ModelConfig

RESULTS = Path(__file__).resolve().parent / "results"


def timed_generate(model: DecoderLM, prompt: torch.Tensor, new: int, use_cache: bool, clock, sync):
    """(tokens, [seconds to each new token from the one before; the first from the start])."""
    stamps = []

    def stamp(_):
        sync()
        stamps.append(clock())

    sync()
    start = clock()
    out = model.generate(prompt, new, temperature=0, use_cache=use_cache, on_token=stamp)
    return out, [b - a for a, b in zip([start] + stamps[:-1], stamps)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 256, 512, 1024], help="prompt lengths")
    p.add_argument("--new", type=int, default=16, help="new tokens per generation")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: process CPU time is the compute time)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(args, device)
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@torch.no_grad()
def run(args, device: torch.device) -> None:
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=4, max_seq_len=max(args.contexts) + args.new)
    model = DecoderLM(cfg).to(device).eval()
    print(f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; float32; "
          f"{'CPU' if clock is time.process_time else 'wall'} time; model dim {cfg.dim}, {cfg.n_layers} blocks, "
          f"mhc n={cfg.n_streams}, max_seq_len {cfg.max_seq_len}; {args.new} new tokens, best of {args.reps}")
    print(f"{'context':>8} {'first ms cache':>15} {'first ms none':>14} {'ms/token cache':>15} "
          f"{'ms/token none':>14} {'speed-up':>9}")
    rows = []
    for context in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, context), device=device)
        firsts, per_token, outs = {True: [], False: []}, {True: [], False: []}, {}
        for _ in range(args.reps):
            for use_cache in (True, False):
                outs[use_cache], steps = timed_generate(model, prompt, args.new, use_cache, clock, sync)
                firsts[use_cache].append(steps[0])
                per_token[use_cache].append(statistics.median(steps[1:]) if len(steps) > 1 else steps[0])
        if not torch.equal(outs[True], outs[False]):
            raise SystemExit(f"context {context}: the cache changed the generated tokens")
        first = {k: 1e3 * min(v) for k, v in firsts.items()}
        ms = {k: 1e3 * min(v) for k, v in per_token.items()}
        rows.append({"context": context, "first_token_ms": {"cache": first[True], "none": first[False]},
                     "ms_per_token": {"cache": ms[True], "none": ms[False]}, "speedup": ms[False] / ms[True]})
        print(f"{context:8d} {first[True]:15.2f} {first[False]:14.2f} {ms[True]:15.2f} {ms[False]:14.2f} "
              f"{ms[False] / ms[True]:8.1f}x")
    out = Path(args.out) if args.out else RESULTS / f"generate-{device.type}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads(),
                               "clock": clock.__name__, "load_average": list(os.getloadavg()),
                               "model": cfg.to_dict(), "new_tokens": args.new, "reps": args.reps, "rows": rows},
                              indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
