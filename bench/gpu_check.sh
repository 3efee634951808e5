#!/usr/bin/env bash
# Every GPU check of issue 8 in one call, for a lent H100/H200 (one `device` run; at most 470 s, see the budget):
#   1. the kernel tests at full size on CUDA (tests/test_ops.py adds CUDA shapes, incl. T = 4099, C = 7168), and
#      CUDA graphs and inductor over the kernels (tests/test_cuda_graphs.py: decode-step capture, graphed
#      training step, reduce-overhead compile; skipped on machines without a GPU);
#   2. bench_sublayer.py: one sublayer, a read-ahead 4-stack and a chained-backward 4-stack against the bandwidth
#      floor, + Liger if installed;
#   3. bench_model.py: dense decoder step time and peak memory, residual vs mHC vs mHC + recompute;
#   4. the default job for 200 steps through the kernels and through the reference path: the loss curves
#      must agree within bf16 noise (curve_equal.py --rtol).
# Budget (worst case, every limit hit; an 8-minute device call is 480 s): device 20 + phase 1 185 + curves 20 +
# sublayer 130 + model 100 = 455 s, + 3 s of kill grace per sequential step (15) = 470 s. Phase 1 runs the tests
# and both training runs side by side (none of them is timed: they check values, so sharing the GPU costs only
# wall time); the two benchmarks run alone, one after the other, so their timings see an idle GPU.
# usage: bash bench/gpu_check.sh [OUT_DIR]     (default: bench/results/gpu-<date>; every output is kept there)
set -uo pipefail
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
fail=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output; non-zero status on failure
  local name=$1 limit=$2 rc=0
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -k 3 "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
  [ $rc -eq 0 ] || echo "   $name FAILED (exit $rc; 124: over its limit): $OUT/$name.txt"
  tail -n 3 "$OUT/$name.txt" | sed "s/^/   [$name] /"
  return $rc
}
versions="import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step device 20 bash -c "nvidia-smi -L; python -c \"$versions\"" || fail=1
# phase 1, side by side: the CUDA kernel tests (the other kernel tests use CPU tensors: interpreter, CI), the
# CUDA-graph tests and the two 200-step training runs
pids=()
step pytest 185 python -m pytest -q -x tests/test_ops.py & pids+=($!)
step cuda-graphs 185 python -m pytest -q tests/test_cuda_graphs.py & pids+=($!)
for backend in triton reference; do
  step "train-$backend" 185 env TORCH_MHC_BACKEND=$backend mhc train --set steps=200 --set log_every=1 \
    --set eval_every=100 --set run_name="curve-$backend" --set out_dir="$OUT/runs" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
step curves 20 python bench/curve_equal.py "$OUT/runs/curve-triton" "$OUT/runs/curve-reference" --rtol 2e-2 \
  --keys loss,val_loss || fail=1
# phase 2, alone on the GPU: the timed benchmarks
step sublayer 130 python bench/bench_sublayer.py --out "$OUT/sublayer.json" || fail=1
step model 100 python bench/bench_model.py --out "$OUT/model.json" || fail=1
exit $fail
