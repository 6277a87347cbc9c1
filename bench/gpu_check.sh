#!/usr/bin/env bash
# The prepared GPU check of pdmd_kernels (at most about 6 minutes on an H100, less once Triton's cache is warm): GPU kernel tests (CUDA configs,
# bfloat16 included), then the GPU benchmark (bench/gpu_kernels.py). Logs and results go to $OUT
# (set by the device tool; default runs/gpu_out): env.txt, gpu_tests.log, gpu_bench.log,
# gpu_kernels.json, gpu_kernels.md. Each step has its own time limit, and a failing step does not
# stop the next. Run from the repository root:  bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH=".:kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  "$PY" -m pip list 2>/dev/null | grep -iE '^(pytest|pytest-benchmark|hypothesis) '; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== GPU kernel tests"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests/test_kernels_ops.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== GPU benchmark"
timeout 200 "$PY" bench/gpu_kernels.py --out "$OUT" --budget 130 > "$OUT/gpu_bench.log" 2>&1
echo "bench exit $?"
tail -5 "$OUT/gpu_bench.log" | cut -c1-300
cat "$OUT/gpu_kernels.md" 2>/dev/null
