#!/usr/bin/env bash
# Every GPU check of issue 8 in one call, for a lent H100/H200 (one `device` run; about 10 minutes):
#   1. the kernel tests at full size on CUDA (tests/test_ops.py adds CUDA shapes, incl. T = 4099, C = 7168);
#   2. bench_sublayer.py: one sublayer, a read-ahead 4-stack and a chained-backward 4-stack against the bandwidth
#      floor, + Liger if installed;
#   3. bench_model.py: dense decoder step time and peak memory, residual vs mHC vs mHC + recompute;
#   4. the default job for 200 steps through the kernels and through the reference path: the loss curves
#      must agree within bf16 noise (curve_equal.py --rtol).
# usage: bash bench/gpu_check.sh [OUT_DIR]     (default: bench/results/gpu-<date>; every output is kept there)
set -uo pipefail
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
fail=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || { echo "   FAILED (exit $?): $OUT/$name.txt"; fail=1; }
  tail -n 3 "$OUT/$name.txt"
}
{ nvidia-smi -L; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/device.txt"
step pytest 240 python -m pytest -q -x tests/test_ops.py  # CUDA shapes; the other kernel tests use CPU tensors (interpreter, CI)
step sublayer 150 python bench/bench_sublayer.py --out "$OUT/sublayer.json"
step model 120 python bench/bench_model.py --out "$OUT/model.json"
for backend in triton reference; do
  step "train-$backend" 60 env TORCH_MHC_BACKEND=$backend mhc train --set steps=200 --set log_every=1 \
    --set eval_every=100 --set run_name="curve-$backend" --set out_dir="$OUT/runs"
done
step curves 30 python bench/curve_equal.py "$OUT/runs/curve-triton" "$OUT/runs/curve-reference" --rtol 2e-2 --keys loss,val_loss
exit $fail
