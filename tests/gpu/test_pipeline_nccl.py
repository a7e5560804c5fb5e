"""Pipeline parallelism on two GPUs over NCCL: Megatron-Core's schedules as they run in training.

The same checks as tests/parallel/test_pipeline_schedule_cpu.py (one step's losses, every gradient
after the embedding-group sum, the global norm and the expert-bias update against the unpipelined
model fed the same micro-batches, fp32), but with the schedules' own CUDA p2p. Run on the 2-GPU
machine: python3 -m pytest -q -o addopts="" tests/gpu/test_pipeline_nccl.py
"""

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.two_gpus,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

GPU_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}  # cuBLAS picks other kernels for other shapes


def check_1f1b() -> None:
    from test_pipeline_schedule_cpu import check_layout

    check_layout("parallel.pipeline=2", device="cuda", tolerance=GPU_TOLERANCE)


def check_interleaved() -> None:
    from test_pipeline_schedule_cpu import check_layout

    check_layout("parallel.pipeline=2", "parallel.virtual_pipeline=2", device="cuda", tolerance=GPU_TOLERANCE)


def check_interleaved_without_mtp() -> None:
    from test_pipeline_schedule_cpu import check_layout

    check_layout(
        "parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.mtp_depth=0",
        device="cuda", tolerance=GPU_TOLERANCE,
    )  # fmt: skip


CHECKS = [check_1f1b, check_interleaved, check_interleaved_without_mtp]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    from spawn_world import run_checks

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    return run_checks(CHECKS, 2, tmp_path_factory.mktemp("pp_nccl"), backend="nccl")


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_pipeline_on_two_gpus_matches_one_process(outcomes, check):
    assert not outcomes[check], outcomes[check]
