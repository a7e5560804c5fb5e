"""Transformer Engine's layers under tensor parallelism (precision.linear_impl=te, parallel.tensor=2).

Real `mds train` runs of the tiny model in BF16 with the Megatron-Core optimizer backend: TE's column- and
row-parallel layers over NCCL (and TE's attention on each rank's two of the four heads) train like TE on
one GPU, with the same gradient norms, and their checkpoint resumes on the local backend on one GPU. Run
on the 2-GPU machine with benches/h200_gpu_tests.sh; skipped elsewhere.
"""

import pytest
from gpu.test_megatron_optimizer import STEPS, assert_close, train, two_gpus
from train.conftest import metrics

from megatron_ds.precision import transformer_engine_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine"),
]

TE = ["precision.linear_impl=te", "precision.expert_gemm=te", "precision.params_dtype=bf16"]
TP2 = ["parallel.tensor=2"]
# BF16 activations: the row-parallel layers sum two rounded halves where one GPU rounds the whole GEMM.
RTOL = 1e-2
# Gradient norms move more than losses. A miscounted norm is 10-20% off: the tiny model's replicated
# weights hold about a quarter of its squared norm at the start, its shards the rest (measured on the
# CPU); the norm starts near 1.5, so the clip at 1 acts and the losses would drift too.
NORM_RTOL = 3e-2


def grad_norms(run_dir) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in metrics(run_dir)}


@pytest.fixture(scope="module")
def one_gpu(train_dataset, tmp_path_factory):
    """TE in BF16 on one GPU: (loss curve, gradient norms)."""
    run_dir = tmp_path_factory.mktemp("te_one_gpu")
    return train(run_dir, train_dataset, "megatron", *TE), grad_norms(run_dir)


@two_gpus
def test_te_under_tensor_parallelism_matches_one_gpu(one_gpu, train_dataset, tmp_path):
    """Same losses and the same global gradient norm: Megatron-Core counts every shard once and every
    replicated weight (TE flags them all `tensor_model_parallel`) once, as the clip needs."""
    curve, norms = one_gpu
    assert_close(train(tmp_path, train_dataset, "megatron", *TE, *TP2, nproc=2), curve, RTOL)
    assert_close(grad_norms(tmp_path), norms, NORM_RTOL)


@two_gpus
def test_te_tensor_parallel_checkpoint_resumes_on_the_local_backend(one_gpu, train_dataset, tmp_path):
    """TE's shards carry the local backend's shard marks and names, so the TP=2 checkpoint holds whole
    tensors under the local keys and resumes on the local backend at TP=1, on course."""
    train(tmp_path, train_dataset, "megatron", *TE, *TP2, f"train.steps={STEPS // 2}", nproc=2)
    assert_close(train(tmp_path, train_dataset, "megatron", "precision.params_dtype=bf16"), one_gpu[0], RTOL)


@two_gpus
def test_te_fp8_under_tensor_parallelism_trains_like_one_gpu(train_dataset, tmp_path):
    """DeepSeek-V3's blockwise FP8 on each rank's shards (whose 128-wide blocks are not the whole
    weight's) runs and trains like FP8 on one GPU: a smoke test, the curves only a few steps long."""
    fp8 = [*TE, "precision.fp8=blockwise"]
    one = train(tmp_path / "one", train_dataset, "megatron", *fp8)
    two = train(tmp_path / "two", train_dataset, "megatron", *fp8, *TP2, nproc=2)
    assert two[STEPS] < two[1], f"no progress under FP8 at TP=2: {two}"
    assert_close(two, one, 2e-2)
