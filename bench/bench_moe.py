"""MoE layer forward+backward time: the loop over experts (``MoE.forward_reference``) against the grouped
path (one batched GEMM per projection over all experts), same shapes and weights.

For each shape (tokens, dim, routed experts E, top-k, expert hidden H; one shared expert) and each
implementation: the best of the repetitions of a training-mode forward + backward (loads counted),
timed on the CPU as the process's CPU time with one thread (``--threads 1``; other processes on a
shared machine barely change it), on a GPU as wall time between synchronisations; the
implementations run in turn within each repetition; and the host syncs (ops that read a value back
or make a data-dependent shape) of one forward + backward.

  reference   the loop: one nonzero per expert, x[token] gathers, per-expert matmuls, index_add
  padded      grouped_swiglu's padded bmm over expert-aligned blocks (block by shape, default_block)
  buckets     the same with [E, tokens] buckets (block = tokens: no weight gather, E / k times the flops)
  grouped_mm  torch._grouped_mm (CUDA's path; also runs on the CPU, float32)

    python bench/bench_moe.py                                  # CPU: four shapes
    python bench/bench_moe.py --shapes 256:32:8:2:16 --reps 1  # smoke run

Writes bench/results/moe-<device>-<date>.json with the device, versions and command.
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
from torch.utils._python_dispatch import TorchDispatchMode

from torch_mhc.models import MoE

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ["512:64:8:2:32", "2048:128:8:2:64", "4096:256:64:6:64", "4096:512:16:2:256"]
IMPLS = {"reference": ("reference", None), "padded": ("padded", None), "buckets": ("padded", 1 << 30),
         "grouped_mm": ("grouped_mm", None)}
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.bincount.default, aten._unique2.default, aten.repeat_interleave.Tensor}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in SYNC_OPS
        return func(*args, **(kwargs or {}))


def make(shape: str, device: torch.device, dtype: torch.dtype):
    tokens, dim, experts, k, hidden = map(int, shape.split(":"))
    torch.manual_seed(0)
    moe = MoE(dim, experts, 1, k, hidden).to(device, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=dim ** -0.5)
    return moe, torch.randn(tokens, dim, device=device, dtype=dtype)


def fwd_bwd(moe: MoE, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    moe(x).sum().backward()
    moe.zero_grad(set_to_none=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="tokens:dim:experts:top_k:hidden")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
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


def run(args, device: torch.device) -> None:
    # one CPU thread: the process's CPU time, which other processes on a shared machine barely change;
    # on a GPU the wall time between synchronisations
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device: {name}; torch {torch.__version__}; {torch.get_num_threads()} threads; {args.dtype}; "
          f"{'CPU' if clock is time.process_time else 'wall'} time of a forward+backward, best of {args.reps} "
          f"(median in the JSON)")
    header = f"{'tokens:dim:E:k:H':>20} " + " ".join(f"{i + ' ms':>15}" for i in args.impls) + \
        " " + " ".join(f"{'x ' + i:>13}" for i in args.impls if i != "reference") + "   host syncs"
    print(header)
    rows = []
    for shape in args.shapes:
        moe, x = make(shape, device, dtype)
        times = {i: [] for i in args.impls}
        syncs = {}
        for impl in args.impls:  # warm-up and sync count
            moe.impl, moe.block = IMPLS[impl]
            fwd_bwd(moe, x)
            with CountSyncs() as c:
                fwd_bwd(moe, x)
            syncs[impl] = c.n
        for _ in range(args.reps):
            for impl in args.impls:
                moe.impl, moe.block = IMPLS[impl]
                sync()
                t0 = clock()
                fwd_bwd(moe, x)
                sync()
                times[impl].append(clock() - t0)
        ms = {i: 1e3 * min(t) for i, t in times.items()}
        median = {i: 1e3 * statistics.median(t) for i, t in times.items()}
        speedup = {i: ms["reference"] / ms[i] for i in ms if i != "reference"} if "reference" in ms else {}
        rows.append({"shape": shape, "ms": ms, "median_ms": median, "speedup_vs_reference": speedup,
                     "host_syncs": syncs})
        print(f"{shape:>20} " + " ".join(f"{ms[i]:15.2f}" for i in args.impls) + " "
              + " ".join(f"{speedup.get(i, float('nan')):13.2f}" for i in args.impls if i != "reference")
              + "   " + " ".join(f"{i}={syncs[i]}" for i in args.impls))
    out = Path(args.out) if args.out else RESULTS / f"moe-{device.type}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads(),
                               "clock": clock.__name__, "load_average": list(os.getloadavg()),
                               "dtype": args.dtype, "reps": args.reps, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
