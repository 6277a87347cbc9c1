#!/usr/bin/env bash
# The one prepared GPU run (device tool): GPU tests and benchmarks of every part, each with its own time
# limit; a failing part does not stop the next. Results go to $RES (all logs, JSON, markdown), and one
# archive $OUT/gpu_results.tgz plus the markdown summaries come back (the tool returns at most 8 files).
#   bash bench/gpu_all.sh [ktests] [kbench] [tests] [real] [optim] [plan] [wan]      (no argument: all parts)
#   bash bench/gpu_all.sh kernels     the kernels issue's one prepared call (<= 8 min on one H100: GPU kernel
#                                     tests, fused vs eager vs compiled at Wan 480p/720p and Qwen 1328, B = 1
#                                     and 8, bf16, GB/s and % of copy bandwidth; the 8-bit step vs fused AdamW)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_out}"
RES=/tmp/gpu_results
mkdir -p "$OUT" "$RES"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # diffusers is not in the GPU image: carried as a wheel
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".:kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
parts="${*:-ktests kbench tests real optim plan wan}"
[ "$parts" = kernels ] && parts="ktests kbench optim"
has() { case " $parts " in *" $1 "*) return 0;; esac; return 1; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$RES/env.txt"

if has ktests; then
  echo "== kernels: GPU tests"
  timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests/test_kernels_ops.py > "$RES/kernels_tests.log" 2>&1
  echo "exit $?"; tail -4 "$RES/kernels_tests.log"
fi
if has kbench; then
  echo "== kernels: benchmark"
  timeout 225 "$PY" bench/gpu_kernels.py --out "$RES" --budget 170 > "$RES/kernels_bench.log" 2>&1
  echo "exit $?"; cat "$RES/gpu_kernels.md" 2>/dev/null || tail -20 "$RES/kernels_bench.log"
fi
if has tests; then
  echo "== other GPU tests (optimizer, trainer, FSDP2 mixed precision on CUDA)"
  timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests/test_optim.py \
    tests/test_trainer.py tests/test_parallel.py > "$RES/other_tests.log" 2>&1
  echo "exit $?"; tail -8 "$RES/other_tests.log"
fi
if has real; then
  echo "== real-model path on CUDA: Wan 2.2 A14B recipe in the trainer, the shipped A14B config end to end (tiny models)"
  timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests/test_a14b.py tests/test_real.py \
    > "$RES/real_tests.log" 2>&1
  echo "exit $?"; tail -8 "$RES/real_tests.log"
fi
if has optim; then
  echo "== optimizer benchmark"
  timeout 90 "$PY" bench/gpu_optim.py --out "$RES" > "$RES/optim_bench.log" 2>&1
  echo "exit $?"; tail -15 "$RES/optim_bench.log"
  timeout 45 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests/test_optim_multi.py > "$RES/optim_multi_tests.log" 2>&1; echo "multi-tensor step GPU test: exit $?"; tail -3 "$RES/optim_multi_tests.log"
fi
if has plan; then
  echo "== planner vs measured GPU memory"
  timeout 120 "$PY" bench/gpu_plan_check.py --out "$RES" > "$RES/plan_check.log" 2>&1
  echo "exit $?"; tail -15 "$RES/plan_check.log"
fi
if has wan && [ -f bench/gpu_wan_phased.py ]; then
  echo "== Wan-shaped phased iteration: reference recipe vs ours"
  timeout 240 "$PY" bench/gpu_wan_phased.py --out "$RES" > "$RES/wan_phased.log" 2>&1
  echo "exit $?"; tail -30 "$RES/wan_phased.log"
fi
if has fit; then  # only when named (bash bench/gpu_all.sh fit): ~8 minutes on its own
  echo "== Wan-14B shape, 81x480x832, paper's recipe on one GPU with the planner's memory recipe"
  timeout 480 "$PY" bench/gpu_wan14b_fit.py --out "$RES" > "$RES/wan14b_fit.log" 2>&1
  echo "exit $?"; tail -16 "$RES/wan14b_fit.log"
fi
tar czf "$OUT/gpu_results.tgz" -C /tmp gpu_results
cp "$RES"/*.md "$OUT"/ 2>/dev/null
ls -la "$OUT"
