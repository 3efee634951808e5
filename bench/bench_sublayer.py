"""Per-sublayer cost of mHC (F = identity), the spec's section 9 setting.

For n streams of width C and T tokens: forward and forward+backward time, achieved GB/s (bytes
of the bandwidth floor over the measured time) and the ratio to the floor, for
  plain residual      y = x + F(x)              (x [T, C])
  reference           torch_mhc on the PyTorch reference path (unfused)
  compiled reference  torch.compile of the reference path
  fused               torch_mhc's Triton kernels, one sublayer (its read runs the coefficient GEMM)
  fused, 4-stack      four chained sublayers, per sublayer (each post computes the next GEMM: read-ahead)
  fused, 4-stack, chained backward   the same under torch_mhc.nn.chained_backward (each post's backward also
                      sums its reader's terms of the state gradient: what `mhc train` runs)
  liger               Liger-Kernel's fused mHC ops, when liger_kernel is installed
and the floor: (3n+2)C forward and (6n+5)C forward+backward bf16 elements per token, over the
copy bandwidth measured in the same run.

    python bench/bench_sublayer.py                       # GPU: T=16384, C in 1280 2560 4096 7168
    python bench/bench_sublayer.py --tokens 256 --dims 64  # CPU smoke run (reference paths only)

Writes bench/results/sublayer-<device>-<date>.json with the device, versions and command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from torch_mhc import ManifoldHyperConnection, ops
from torch_mhc.nn import chained_backward, run_chain

RESULTS = Path(__file__).resolve().parent / "results"


def bytes_model(n: int, C: int, elt: int) -> dict:
    """DRAM bytes per token of each launch of the fused path for one sublayer inside a stack of connections
    (F = identity), from what each kernel reads and writes: state and f in the streams' dtype (``elt`` bytes),
    coefficients fp32. In a stack the previous sublayer's post computed this one's coefficient GEMM while it
    wrote the state (read-ahead), and this post computes the next one's; the first sublayer of a stack runs
    ``_gemm_fwd`` instead (``first_sublayer``). ``floor`` is the spec's (3n+2)C forward and (6n+5)C
    forward+backward elements. Programs of the GEMMs also re-read phi from L2: listed apart, not DRAM."""
    M = 2 * n + n * n
    state, row, coefs = n * C * elt, C * elt, M * 4
    read_ahead_tokens = 64 if n <= 4 else 32  # streams._read_ahead_blocks at large T
    fwd = {
        "_epilogue_fwd": coefs + 4 + (2 * n + n * n) * 4,  # raw, inv in; H_pre, H_post, H_res out
        "_pre_fwd": state + n * 4 + row,  # x, H_pre in; y out
        # x, f, H_post, H_res in; new state out, and the next sublayer's raw [M] and inv_rms
        "_post_fwd (read-ahead)": state + row + (n + n * n) * 4 + state + coefs + 4,
    }
    bwd = {
        "_post_bwd": 2 * state + row + (n + n * n) * 4 + state + row + (n + n * n) * 4,  # x, dout, f in; dx, df out
        "_pre_bwd": state + row + n * 4 + n * 4,  # x, dy, H_pre in; dH_pre out (its dx goes to _gemm_bwd)
        "_epilogue_bwd": coefs + 4 + M * 4 + coefs + 4 + 2 * (2 * n + n * n) * 4,  # raw, inv, dH in; draw, coef out
        # x, post's dx (the one dx buffer), dy, H_pre, draw, coef in; the summed dx out in place. dy is read
        # once per token: the n K-slices of a token range run side by side, so the other streams hit L2.
        "_gemm_bwd": 2 * state + row + n * 4 + coefs + 4 + state,
    }
    # Chained backward (n <= 4): this post's backward also sums the next sublayer's terms of dout (its post's dx,
    # H_pre dy, draw @ phi^T, the RMS term on the state recomputed from x and f), so the next sublayer's GEMM
    # backward reads x only for dphi and no dx of the state is written and read back.
    bwd_chained = {
        # x, f, H_post, H_res; the next sublayer's post dx, dy, H_pre, draw, coef in; dx, df, dH_post, dH_res out
        "_post_bwd_chain": 2 * state + row + (n + n * n) * 4 + row + n * 4 + coefs + 4 + state + row
        + (n + n * n) * 4,
        "_pre_bwd": bwd["_pre_bwd"],
        "_epilogue_bwd": bwd["_epilogue_bwd"],
        "_gemm_bwd (dphi only)": state + coefs,  # x, draw in; dphi partials per token range (not per token)
    }
    return {"fwd": fwd, "bwd": bwd, "bwd_chained": bwd_chained, "floor_fwd": (3 * n + 2) * C * elt,
            "floor_fwd_bwd": (6 * n + 5) * C * elt,
            "first_sublayer": {"_gemm_fwd": state + coefs + 4},  # x in; raw [M] and inv_rms out
            "phi_l2_per_token": {"_post_fwd (read-ahead)": n * C * M * 4 / read_ahead_tokens,
                                 "_post_bwd_chain": n * C * M * 4 / read_ahead_tokens,
                                 "_gemm_fwd": n * C * M * 4 / 64, "_gemm_bwd": 0}}


def batch_invariant_model(n: int, C: int, T: int, elt: int) -> dict:
    """What ``batch_invariant=True`` changes at T tokens, default vs batch-invariant, from the host code's own block
    and split choices (``ops.coefficients.gemm_fwd_split``, ``ops.streams._read_ahead_blocks``), bf16 tables: the
    first sublayer's forward GEMM (launches, programs, DRAM bytes per token: the default's split-K writes S partial
    rows [M] + a partial sum of squares per token and reduces them in torch (2 sums, 4 in-place ops on inv_rms); the
    batch-invariant GEMM writes raw and inv_rms once, from fewer programs when T is small), and the read-ahead post's
    and chained backward's token tile (phi re-read from L2 once per tile: more L2 bytes per token at large T)."""
    from torch_mhc.ops.blocks import padded_entry
    from torch_mhc.ops.coefficients import GEMM_FWD_BLOCKS, gemm_fwd_split, gemm_fwd_tiles
    from torch_mhc.ops.streams import _read_ahead_blocks

    M, K = 2 * n + n * n, n * C
    bt, bk, _ = padded_entry(GEMM_FWD_BLOCKS, n)  # n = 3, 5, 6, 7 run with their padded count's tiles
    if K % 16:
        bt = 32
    n_t = -(-T // bt) * gemm_fwd_tiles(n, M)[1]  # programs per K slice (column tiles side by side at n > 8)
    out = {}
    for mode, invariant in (("default", False), ("batch_invariant", True)):
        split, _ = gemm_fwd_split(n_t, K, bk, invariant)
        gemm = K * elt + (M + 1) * 4  # x in; raw and inv_rms out
        if split > 1:  # partials out, read back by the sums; inv_rms's 4 in-place ops read and write it
            gemm += 2 * split * (M + 1) * 4 + 4 * 2 * 4
        ra_bt = _read_ahead_blocks(n, C, T, invariant)[0]
        out[mode] = {"gemm_fwd_split": split, "gemm_fwd_programs": n_t * split,
                     "gemm_fwd_launches": 1 if split == 1 else 1 + 2 + 4, "gemm_fwd_dram_bytes_per_token": gemm,
                     "read_ahead_tokens_per_program": ra_bt, "read_ahead_phi_l2_bytes_per_token": K * M * 4 / ra_bt}
    return out


def print_batch_invariant_model(n: int, C: int, elt: int, tokens=(1, 64, 2048, 16384)) -> dict:
    rows = {}
    print(f"batch_invariant=True vs default, n={n}, C={C} (model from the host code's choices; GPU times pending):")
    for T in tokens:
        rows[T] = m = batch_invariant_model(n, C, T, elt)
        d, b = m["default"], m["batch_invariant"]
        print(f"  T={T:>6}: forward GEMM split {d['gemm_fwd_split']:>3} -> 1, programs {d['gemm_fwd_programs']:>4} -> "
              f"{b['gemm_fwd_programs']:>4}, launches {d['gemm_fwd_launches']} -> 1, DRAM "
              f"{d['gemm_fwd_dram_bytes_per_token']:>6.0f} -> {b['gemm_fwd_dram_bytes_per_token']:>6.0f} B/token; "
              f"read-ahead tile {d['read_ahead_tokens_per_program']:>2} -> {b['read_ahead_tokens_per_program']} "
              f"tokens, phi from L2 {d['read_ahead_phi_l2_bytes_per_token']:>7.0f} -> "
              f"{b['read_ahead_phi_l2_bytes_per_token']:>7.0f} B/token")
    return rows


def print_bytes_model(n: int, C: int, elt: int) -> dict:
    model = bytes_model(n, C, elt)
    fwd, bwd, chained = (sum(model[k].values()) for k in ("fwd", "bwd", "bwd_chained"))
    print(f"bytes per token, n={n}, C={C}, one sublayer inside a stack (model of what each launch reads and writes; "
          f"GPU measurements pending):")
    for phase in ("fwd", "bwd", "bwd_chained"):
        for name, b in model[phase].items():
            print(f"  {phase} {name:<24} {b:>9.0f} B  ({b / (C * elt):5.2f} C elements)")
    print(f"  forward {fwd:.0f} B = {fwd / model['floor_fwd']:.2f}x its floor (3n+2)C; forward+backward "
          f"{fwd + bwd:.0f} B = {(fwd + bwd) / model['floor_fwd_bwd']:.2f}x its floor (6n+5)C, with chained backward "
          f"{fwd + chained:.0f} B = {(fwd + chained) / model['floor_fwd_bwd']:.2f}x; the first sublayer "
          f"of a stack adds _gemm_fwd {model['first_sublayer']['_gemm_fwd']:.0f} B")
    return model


def timer(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device copy, counting bytes read plus bytes written."""
    n = 2**28 if device.type == "cuda" else 2**24
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = timer(lambda: b.copy_(a), device, reps=5)
    return 2 * n / (ms * 1e-3)


def make_cases(n: int, C: int, T: int, dtype, device, have_liger: bool, compile_ref: bool = True):
    x0 = torch.randn(T, n, C, device=device, dtype=dtype)
    grad = torch.randn_like(x0)
    xr0 = torch.randn(T, C, device=device, dtype=dtype)
    gradr = torch.randn_like(xr0)
    conn = ManifoldHyperConnection(C, n, torch.nn.Identity()).to(device)
    with torch.no_grad():
        conn.phi.normal_(std=0.02)

    def residual(backward: bool):
        x = xr0.requires_grad_(backward)
        y = x + x
        if backward:
            y.backward(gradr)

    def through(backend: str, fn=None):
        def run(backward: bool):
            x = x0.requires_grad_(backward)
            with ops.use_backend(backend):
                y = (conn if fn is None else fn)(x)
            if backward:
                y.backward(grad)
        return run

    cases = {"plain residual": residual, "reference": through("reference")}
    if compile_ref:
        cases["compiled reference"] = through("reference", torch.compile(conn))
    if device.type == "cuda" or ops.get_backend() == "triton":
        cases["fused"] = through("triton")
        cases[f"fused, {STACK}-stack"] = stack_case(n, C, x0, grad)
        cases[f"fused, {STACK}-stack, chained backward"] = stack_case(n, C, x0, grad, chained=True)
    if have_liger:
        cases["liger"] = liger_case(n, C, T, dtype, device)
    return cases


STACK = 4  # sublayers in the stack case; its times are per sublayer (total / STACK)


def stack_case(n, C, x0, grad, chained: bool = False):
    """STACK chained connections (F = identity), fused: the first reads with the coefficient GEMM, each post
    computes the next one's (read-ahead); ``chained``: under chained_backward. Timed whole; reported per sublayer."""
    stack = [ManifoldHyperConnection(C, n, torch.nn.Identity(), layer_index=i).to(x0.device) for i in range(STACK)]
    with torch.no_grad():
        for conn in stack:
            conn.phi.normal_(std=0.02)

    def run(backward: bool):
        y = x0.requires_grad_(backward)
        with ops.use_backend("triton"), chained_backward() if chained else contextlib.nullcontext():
            y = run_chain(stack, y)
        if backward:
            y.backward(grad)
    run.sublayers = STACK
    return run


def liger_case(n, C, T, dtype, device):
    """Liger-Kernel's fused mHC module with the same shapes, when it is installed."""
    try:
        from liger_kernel.transformers import LigerMHC
    except ImportError:
        from liger_kernel.transformers.mhc import LigerMHC
    layer = LigerMHC(torch.nn.Identity(), hc=n, c=C).to(device)
    x0 = torch.randn(T, n, C, device=device, dtype=dtype)
    grad = torch.randn_like(x0)

    def run(backward: bool):
        x = x0.requires_grad_(backward)
        y = layer(x)
        if backward:
            y.backward(grad)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dims", type=int, nargs="+", default=[1280, 2560, 4096, 7168])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions on the CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    p.add_argument("--out", default="")
    p.add_argument("--model-only", action="store_true", help="print the bytes models only (no timing, no file)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    try:
        import liger_kernel  # noqa: F401

        have_liger = True
    except ImportError:
        have_liger = False
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s; n={args.n}, "
          f"T={args.tokens}, {args.dtype}; liger: {'yes' if have_liger else 'not installed'}")
    rows, models = [], {}
    for C in args.dims:
        models[C] = print_bytes_model(args.n, C, elt)
        models[C]["batch_invariant"] = print_batch_invariant_model(args.n, C, elt)
        if args.model_only:
            continue
        floor_f = (3 * args.n + 2) * C * args.tokens * elt
        floor_fb = (6 * args.n + 5) * C * args.tokens * elt
        cases = make_cases(args.n, C, args.tokens, dtype, device, have_liger, not args.no_compile)
        for label, fn in cases.items():
            try:
                per = getattr(fn, "sublayers", 1)
                fwd = timer(lambda: fn(False), device, args.reps) / per
                fb = timer(lambda: fn(True), device, args.reps) / per
            except Exception as e:  # noqa: BLE001 - report and keep measuring the others
                print(f"C={C} {label}: failed ({type(e).__name__}: {e})")
                continue
            row = {"C": C, "impl": label, "fwd_ms": fwd, "fwd_bwd_ms": fb,
                   "fwd_gbps": floor_f / (fwd * 1e-3) / 1e9, "fwd_bwd_gbps": floor_fb / (fb * 1e-3) / 1e9,
                   "fwd_x_floor": fwd / (floor_f / bw * 1e3), "fwd_bwd_x_floor": fb / (floor_fb / bw * 1e3)}
            rows.append(row)
            print(f"C={C:>5} {label:>20}: fwd {fwd:8.3f} ms ({row['fwd_x_floor']:6.1f}x floor)   "
                  f"fwd+bwd {fb:8.3f} ms ({row['fwd_bwd_x_floor']:6.1f}x floor)")
        print(f"C={C:>5} {'bandwidth floor':>20}: fwd {floor_f / bw * 1e3:8.3f} ms                  "
              f"fwd+bwd {floor_fb / bw * 1e3:8.3f} ms")
    if args.model_only:
        return
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"sublayer-{device.type}-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "device": name, "torch": torch.__version__,
        "triton": _version("triton"), "python": platform.python_version(), "copy_bandwidth_gbps": bw / 1e9,
        "n": args.n, "tokens": args.tokens, "dtype": args.dtype, "rows": rows, "bytes_model": models}, indent=2))
    print(f"saved {out}")


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
