"""End-to-end cost of mHC in the dense decoder of torch_mhc.models: training-step time (forward,
backward, AdamW) and peak memory of mHC (n = 4) against the plain residual, with and without
selective recompute, measured side by side in one process.

    python bench/bench_model.py                        # GPU: C=2048 x 8 blocks and C=4096 x 4 blocks
    python bench/bench_model.py --configs 64:2 --tokens 512 --steps 3   # CPU smoke run

Writes bench/results/model-<device>-<date>.json with the device, versions and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from torch_mhc.models import DecoderLM, ModelConfig
from torch_mhc.nn import chained_backward

RESULTS = Path(__file__).resolve().parent / "results"


def measure(cfg: ModelConfig, batch: int, seq: int, steps: int, device: torch.device, compile_model: bool) -> dict:
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    autocast = device.type == "cuda"

    def step():  # as `mhc train` runs it: under chained backward (a no-op off the kernels)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), chained_backward():
            _, loss = fwd(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        peak = None
    return {"step_ms": ms, "peak_mem_mb": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["2048:8", "4096:4"], help="C:blocks pairs")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both arms)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq = min(args.seq, args.tokens)
    batch = max(1, args.tokens // seq)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    streams = "bf16 streams, bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device: {name}; torch {torch.__version__}; {batch} x {seq} tokens per step; {streams}")
    arms = {
        "residual": dict(connection="residual"),
        "mhc": dict(connection="mhc", n_streams=4),
        "mhc+recompute": dict(connection="mhc", n_streams=4, recompute=True),
    }
    rows = []
    for spec in args.configs:
        C, blocks = (int(v) for v in spec.split(":"))
        base = None
        for arm, kw in arms.items():
            cfg = ModelConfig(vocab_size=args.vocab, dim=C, n_layers=blocks, n_heads=max(1, C // 128),
                              max_seq_len=seq, stream_dtype="bfloat16" if device.type == "cuda" else "auto", **kw)
            r = measure(cfg, batch, seq, args.steps, device, args.compile)
            base = base or r
            row = {"C": C, "blocks": blocks, "arm": arm, **r,
                   "time_overhead": r["step_ms"] / base["step_ms"] - 1,
                   "mem_overhead": (r["peak_mem_mb"] / base["peak_mem_mb"] - 1) if r["peak_mem_mb"] else None}
            rows.append(row)
            mem = (f"{r['peak_mem_mb']:9.0f} MB ({row['mem_overhead']:+.1%})" if r["peak_mem_mb"]
                   else "   (no CUDA memory stats)")
            print(f"C={C:>5} x {blocks} blocks {arm:>14}: {r['step_ms']:9.2f} ms/step "
                  f"({row['time_overhead']:+.1%})  {mem}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"model-{device.type}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
                               "python": platform.python_version(), "batch": batch, "seq": seq,
                               "compile": args.compile, "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
