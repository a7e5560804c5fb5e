"""Megatron-Core's DDP + distributed optimizer (train.optimizer_impl=megatron) against our ZeRO-1 backend.

Real `mds train` runs of the tiny model in fp32 on the same data: the two backends give the same loss
curve, a checkpoint written by either resumes under the other, and with two GPUs the data-, expert-,
pipeline- and tensor-parallel runs of the Megatron backend match one GPU. Run on the H200 with
benches/h200_gpu_tests.sh; skipped without CUDA and Megatron-Core's GPU optimizer.
"""

import pytest
import torch
from train.conftest import loss_curve, mds_train, metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 8
# Adam's first steps amplify float rounding; fp32 kernels on the GPU are not bit-deterministic.
RTOL = 1e-4
GPU = ["train.deterministic=false", f"train.steps={STEPS}"]


def two_gpus(test):
    needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
    return pytest.mark.two_gpus(needs_two(test))


def train(run_dir, dataset, impl: str, *overrides: str, nproc: int = 1) -> dict[int, float]:
    result = mds_train(run_dir, dataset, *GPU, f"train.optimizer_impl={impl}", *overrides, nproc=nproc)
    assert result.returncode == 0, result.stdout + result.stderr
    return loss_curve(run_dir)


def assert_close(curve: dict[int, float], reference: dict[int, float], rtol: float = RTOL) -> None:
    assert sorted(curve) == sorted(reference)
    worst = max(abs(curve[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst < rtol, f"largest relative loss difference {worst:.2e}: {curve} vs {reference}"


@pytest.fixture(scope="module")
def reference(train_dataset, tmp_path_factory):
    """Our ZeRO-1 backend on one GPU."""
    return train(tmp_path_factory.mktemp("zero1"), train_dataset, "zero1")


def test_megatron_backend_matches_ours(reference, train_dataset, tmp_path):
    curve = train(tmp_path, train_dataset, "megatron")
    assert_close(curve, reference)
    ours = {r["step"]: r["grad_norm"] for r in metrics(tmp_path)}
    assert all(ours[s] > 0 for s in ours)


@pytest.mark.parametrize("first, second", [("megatron", "zero1"), ("zero1", "megatron")])
def test_checkpoints_move_between_backends(reference, train_dataset, tmp_path, first, second):
    train(tmp_path, train_dataset, first, f"train.steps={STEPS // 2}")
    curve = train(tmp_path, train_dataset, second)
    assert_close(curve, reference)


@two_gpus
@pytest.mark.parametrize(
    "layout", ["parallel.expert=1", "parallel.expert=2", "parallel.pipeline=2", "parallel.tensor=2"]
)
def test_two_gpus_match_one(reference, train_dataset, tmp_path, layout):
    """DP=2, EP=2 x DP=2 (Megatron-Core reduce-scatters, the optimizer works on halves), PP=2 and TP=2
    (whose shards Megatron-Core must count on both ranks in the clipping norm, replicas on one)."""
    assert_close(train(tmp_path, train_dataset, "megatron", layout, nproc=2), reference)


@two_gpus
def test_two_gpu_checkpoint_resumes_on_one(reference, train_dataset, tmp_path):
    train(tmp_path, train_dataset, "megatron", f"train.steps={STEPS // 2}", nproc=2)
    assert_close(train(tmp_path, train_dataset, "megatron"), reference)


def test_bf16_checkpoint_moves_between_backends(train_dataset, tmp_path):
    """A bf16 model (its router fp32) saved by the Megatron backend resumes under ours, on course."""
    bf16 = "precision.params_dtype=bf16"
    reference = train(tmp_path / "zero1", train_dataset, "zero1", bf16)
    train(tmp_path / "switched", train_dataset, "megatron", bf16, f"train.steps={STEPS // 2}")
    curve = train(tmp_path / "switched", train_dataset, "zero1", bf16)
    assert_close(curve, reference, rtol=1e-2)


def test_bf16_moments_match_ours_and_move_to_ours(train_dataset, tmp_path):
    """BF16 moments (the report's): Megatron-Core's precision-aware optimizer (TE's FusedAdam) against
    ours, and its checkpoint resumed by ours. Both round the moments to BF16 after an fp32 update, so
    the curves agree closely, not to fp32 rounding."""
    pytest.importorskip("transformer_engine")
    moments = "precision.bf16_optimizer_moments=true"
    reference = train(tmp_path / "zero1", train_dataset, "zero1", moments)
    megatron = train(tmp_path / "megatron", train_dataset, "megatron", moments)
    train(tmp_path / "switched", train_dataset, "megatron", moments, f"train.steps={STEPS // 2}")
    switched = train(tmp_path / "switched", train_dataset, "zero1", moments)
    for curve in (megatron, switched):
        assert_close(curve, reference, rtol=1e-3)


def test_bf16_recomputation_into_megatron_buffers(train_dataset, tmp_path):
    """Selective recomputation with every region, in BF16 under the Megatron backend: the routed
    experts' grouped GEMM and the output head add their weight gradients into DDP's fp32 buffers from
    a backward whose saved tensors recomputation's hooks packed. The curve matches the run without."""
    bf16 = "precision.params_dtype=bf16"
    reference = train(tmp_path / "plain", train_dataset, "megatron", bf16)
    recomputed = train(
        tmp_path / "recomputed", train_dataset, "megatron", bf16, "train.recompute=[norm,mla_up_proj,swiglu]"
    )
    assert_close(recomputed, reference, rtol=1e-2)


def test_te_layers_accumulate_into_megatron_buffers(train_dataset, tmp_path):
    """With the TE backend the Megatron backend turns on TE's fused weight-gradient accumulation
    (the GEMM adds into DDP's fp32 buffer); the curve matches ours, where TE returns plain gradients."""
    pytest.importorskip("transformer_engine")
    te = ["precision.linear_impl=te", "precision.expert_gemm=te"]
    reference = train(tmp_path / "zero1", train_dataset, "zero1", *te)
    assert_close(train(tmp_path / "megatron", train_dataset, "megatron", *te), reference)


@two_gpus
def test_te_checkpoint_under_expert_parallelism_resumes_on_the_local_backend(
    reference, train_dataset, tmp_path
):
    """Under EP the TE backend's checkpoint keys are the local backend's (its fused norms are saved as
    q_norm / kv_norm), so a TE run at EP=2 resumes on the local backend on one GPU, on course."""
    te = ["precision.linear_impl=te", "precision.expert_gemm=te", "parallel.expert=2"]
    train(tmp_path, train_dataset, "megatron", *te, f"train.steps={STEPS // 2}", nproc=2)
    assert_close(train(tmp_path, train_dataset, "megatron"), reference, rtol=1e-2)


def test_te_checkpoint_resumes_on_the_local_backend(reference, train_dataset, tmp_path):
    """TE's experts are saved as slices of the local backend's stacked weights (and its fused norms
    under the local names), so a TE run's checkpoint resumes on the local backend, on course."""
    pytest.importorskip("transformer_engine")
    te = ["precision.linear_impl=te", "precision.expert_gemm=te"]
    train(tmp_path, train_dataset, "megatron", *te, f"train.steps={STEPS // 2}")
    assert_close(train(tmp_path, train_dataset, "megatron"), reference, rtol=1e-2)


@two_gpus
def test_te_experts_under_expert_parallelism_match_one_gpu(train_dataset, tmp_path):
    """TE's grouped experts at EP=2 (each rank's two of four, initialised as their slices of the
    stacked weights) train like all four on one GPU."""
    pytest.importorskip("transformer_engine")
    te = ["precision.linear_impl=te", "precision.expert_gemm=te"]
    one = train(tmp_path / "one", train_dataset, "megatron", *te)
    assert_close(
        train(tmp_path / "two", train_dataset, "megatron", *te, "parallel.expert=2", nproc=2), one, 1e-3
    )
