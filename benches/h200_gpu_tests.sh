#!/bin/bash
# The GPU tests on the H200 (after the TE staging of ../shared/device/stage_te.sh); with two GPUs
# visible the 2-GPU tests run too. Arguments go to pytest (default: all of tests/gpu):
#   source /root/te_env.sh && bash benches/h200_gpu_tests.sh [tests/gpu/test_x.py ...]
# The figures come from benches/h200_train_loop.py, benches/dispatcher_overhead.py and
# benches/h200_train_step.py (commands in docs/benchmarks/h200.md).
set -o pipefail
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pytest -q -rs --durations=0 -p no:cacheprovider -o addopts="" "${@:-tests/gpu}" 2>&1 |
  tee -a "$OUT/gpu_tests.log"
