#!/bin/bash
# The GPU tests on the H200 (after the TE staging of ../shared/device/stage_te.sh); with two GPUs
# visible the 2-GPU tests run too:
#   source /root/te_env.sh && bash benches/h200_gpu_tests.sh
# The figures come from benches/h200_train_loop.py, benches/dispatcher_overhead.py and
# benches/h200_train_step.py (commands in docs/benchmarks/h200.md).
set -o pipefail
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pytest -q -rs -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
