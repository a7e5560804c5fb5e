#!/bin/bash
# The GPU tests on the H200 (after the TE staging of ../shared/device/stage_te.sh):
#   source /root/te_env.sh && bash benches/h200_gpu_tests.sh [pytest arguments]
# With arguments, pytest runs just those. Without, all of tests/gpu; with two GPUs visible the
# one-GPU tests run side by side, test_megatron_optimizer.py on GPU 0 and the other files on GPU 1,
# and then the tests marked two_gpus on both. Logs go to $OUT/gpu_tests*.log.
# The figures come from benches/h200_train_loop.py, benches/dispatcher_overhead.py and
# benches/h200_train_step.py (commands in docs/benchmarks/h200.md).
set -o pipefail
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
run() { python3 -m pytest -q -rs --durations=0 -p no:cacheprovider -o addopts="" "$@"; }

if [ $# -gt 0 ]; then
  run "$@" 2>&1 | tee -a "$OUT/gpu_tests.log"
elif [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 run -m "not two_gpus" tests/gpu/test_megatron_optimizer.py > "$OUT/gpu_tests_gpu0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 run -m "not two_gpus" tests/gpu --ignore tests/gpu/test_megatron_optimizer.py \
    > "$OUT/gpu_tests_gpu1.log" 2>&1 &
  wait
  run -m two_gpus tests/gpu 2>&1 | tee "$OUT/gpu_tests_two_gpus.log"
  tail -n 1 "$OUT"/gpu_tests_gpu*.log
else
  run tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
fi
