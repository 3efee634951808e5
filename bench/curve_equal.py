"""Are two runs' training curves bit-identical? Compares metrics.jsonl of two run directories step by
step (loss, grad norm, lr, validation loss, gains: every numeric field both records have) and prints the
first differences. Used to check that a refactor leaves the CPU curve unchanged for a fixed seed:

    mhc train --set run_name=a --set steps=40 --set log_every=1 ...   # before the change
    mhc train --set run_name=b --set steps=40 --set log_every=1 ...   # after it
    python bench/curve_equal.py runs/a runs/b                          # exit 0 when identical
    python bench/curve_equal.py runs/fused runs/reference --rtol 2e-2 --keys loss,val_loss  # within a tolerance
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch_mhc.reports.plots import read_jsonl

KEYS = ("loss", "grad_norm", "lr", "val_loss", "max_composite_fwd_gain", "max_composite_bwd_gain")


def records(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step (``read_jsonl``: the last record per step, a partial last line skipped)."""
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def differences(a: dict[int, dict], b: dict[int, dict], keys=KEYS,
                rtol: float = 0.0) -> tuple[int, list[tuple[int, str, float, float]]]:
    """(number of common steps, [(step, key, a, b) for every field that differs by more than rtol, relative to
    the larger magnitude; rtol = 0: any difference])."""
    common = sorted(set(a) & set(b))
    return len(common), [(s, k, a[s][k], b[s][k]) for s in common for k in keys
                         if k in a[s] and k in b[s] and a[s][k] != b[s][k]
                         and not abs(a[s][k] - b[s][k]) <= rtol * max(abs(a[s][k]), abs(b[s][k]))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default 0: bit-identical)")
    p.add_argument("--keys", default=",".join(KEYS), help=f"comma-separated fields (default {','.join(KEYS)})")
    args = p.parse_args(argv)
    n, diff = differences(records(args.run_a), records(args.run_b), keys=args.keys.split(","), rtol=args.rtol)
    if not n:
        print("no common steps")
        return 1
    same = "identical" if not args.rtol else f"equal within rtol {args.rtol:g}"
    print(f"{n} common steps; {same if not diff else f'{len(diff)} differing fields'}")
    for step, key, va, vb in diff[:10]:
        print(f"  step {step} {key}: {va!r} vs {vb!r}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
