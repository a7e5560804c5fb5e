"""The FP8 dispatch payload (E4M3, 1x128 scales) on two GPUs over NCCL, inside real training.

An EP=2 `mds train` run of the tiny model with FP8 (blockwise) linears sends its MoE dispatch rows
in FP8 or in BF16; the FP8 payload must train like the BF16 one. Run on the 2-GPU machine with
benches/h200_gpu_tests.sh; skipped elsewhere.
"""

import pytest
import torch
from train.conftest import loss_curve, mds_train

from megatron_ds.precision import transformer_engine_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.two_gpus,
    pytest.mark.skipif(
        torch.cuda.device_count() < 2 or not transformer_engine_available(),
        reason="needs 2 CUDA GPUs and Transformer Engine",
    ),
]

FP8 = ["train.deterministic=false", "train.steps=12", "precision.params_dtype=bf16",
       "precision.linear_impl=te", "precision.fp8=blockwise", "parallel.expert=2"]  # fmt: skip


def test_fp8_dispatch_trains_like_bf16_dispatch(train_dataset, tmp_path):
    curves = {}
    for payload in ("false", "true"):
        run_dir = tmp_path / f"fp8_dispatch_{payload}"
        result = mds_train(run_dir, train_dataset, *FP8, f"precision.fp8_dispatch={payload}")
        assert result.returncode == 0, result.stdout + result.stderr
        curves[payload] = loss_curve(run_dir)
    bf16, fp8 = curves["false"], curves["true"]
    assert sorted(fp8) == sorted(bf16) == list(range(1, 13))
    assert fp8[12] < fp8[1] - 1.0, f"no progress with the FP8 payload: {fp8}"
    gap = max(abs(fp8[s] - bf16[s]) / bf16[s] for s in bf16)
    assert gap < 2e-2, f"FP8 payload loss differs by {gap:.2%} from the BF16 payload: {fp8} vs {bf16}"
