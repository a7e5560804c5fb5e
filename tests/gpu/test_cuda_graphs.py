"""train.cuda_graphs on a GPU: `mds train` runs of the tiny model in bf16 whose micro-batches replay CUDA
graphs follow the eager run step for step (losses and gradient norms): the local layers, TE's, blockwise
FP8 (two graphs, the micro-batch that quantizes the weights and the others, and one of one micro-batch),
and selective recomputation. A step that reads a GPU value back to the host is refused, naming the
setting. Run on the H200 with benches/h200_gpu_tests.sh; skipped without CUDA.
"""

import pytest
import torch
from train.conftest import mds_train, metrics

from megatron_ds.precision import transformer_engine_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 8  # the first two eager in both runs, then six replayed
BASE = ["train.deterministic=false", f"train.steps={STEPS}", "precision.params_dtype=bf16"]
TE = ["precision.linear_impl=te"]
FP8 = [*TE, "precision.fp8=blockwise", "model.moe_inter_dim=128"]  # whole 128-blocks: TE's grouped path
RECOMPUTE = "train.recompute=[norm,mla_up_proj,swiglu]"
CASES = {
    "local": [],
    "te": TE,
    "fp8": FP8,  # four micro-batches a step: the first quantizes the weights, the others reuse them
    "fp8 one micro-batch": [*FP8, "train.micro_batch_size=8"],
    "recompute": [RECOMPUTE],
    "te recompute": [*TE, RECOMPUTE],
}
# The same kernels run eagerly and replayed; they differ by the atomics of bf16 scatter-adds.
LOSS_RTOL, GRAD_NORM_RTOL = 2e-3, 2e-2
CAPTURED = "captured a micro-batch's forward and backward as a CUDA graph"


def train(run_dir, dataset, *overrides: str):
    result = mds_train(run_dir, dataset, *BASE, *overrides, nproc=1)
    return result, {r["step"]: r for r in metrics(run_dir)}


@pytest.mark.parametrize("case", CASES)
def test_replayed_steps_follow_the_eager_run(case, train_dataset, tmp_path):
    overrides = CASES[case]
    if "precision.linear_impl=te" in overrides and not transformer_engine_available():
        pytest.skip("needs Transformer Engine")
    result, eager = train(tmp_path / "eager", train_dataset, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    result, graphed = train(tmp_path / "graphed", train_dataset, *overrides, "train.cuda_graphs=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert CAPTURED in result.stdout + result.stderr
    assert sorted(graphed) == sorted(eager) == list(range(1, STEPS + 1))
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL)):
        worst = max(abs(graphed[s][key] - eager[s][key]) / abs(eager[s][key]) for s in eager)
        print(f"{case}: largest relative {key} difference {worst:.2e}")
        assert worst < rtol, f"{key}: {[(graphed[s][key], eager[s][key]) for s in eager]}"
    assert eager[STEPS]["loss"] < eager[1]["loss"]  # it trains


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine")
def test_a_step_that_reads_the_gpu_back_is_refused(train_dataset, tmp_path):
    """The tiny model's 64-wide FP8 experts take TE's split path, which wants its split sizes on the host."""
    result, _ = train(tmp_path, train_dataset, *TE, "precision.fp8=blockwise", "train.cuda_graphs=true")
    assert result.returncode != 0
    assert "could not be captured as a CUDA graph" in result.stdout + result.stderr
    assert "Set train.cuda_graphs=false" in result.stdout + result.stderr
