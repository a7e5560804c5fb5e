#!/bin/bash
# The GPU tests and training-loop figures on the H200 (after the TE staging of ../shared/device/stage_te.sh):
#   source /root/te_env.sh && bash benches/h200_gpu_tests.sh
set -o pipefail
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pytest -x -q -s -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
python3 benches/h200_train_loop.py --out "$OUT" 2>&1 | tail -3
