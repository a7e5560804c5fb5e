#!/bin/bash
# The GPU tests and training-loop figures on the H200 (after the TE staging of ../shared/device/stage_te.sh):
#   source /root/te_env.sh && bash benches/h200_gpu_tests.sh
# With two GPUs visible the 2-GPU tests run too; the figures use the first GPU.
set -o pipefail
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pytest -q -s -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
export CUDA_VISIBLE_DEVICES=0
python3 benches/h200_train_loop.py --optimizer-impl megatron --out "$OUT" 2>&1 | tail -15
python3 benches/h200_train_loop.py --optimizer-impl zero1 --measure share --out "$OUT" 2>&1 | tail -9
