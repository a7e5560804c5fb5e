"""Kill-and-resume runs of `mds train`, compared step by step with an uninterrupted run."""

import signal
import time

import pytest
from conftest import loss_curve, mds_train, metrics

from megatron_ds.train import EXIT_DIVERGED, EXIT_REQUEUE

STEPS = 6


@pytest.fixture(scope="module")
def reference(train_dataset, tmp_path_factory):
    """An uninterrupted EP=2 run of STEPS steps: the curve every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = mds_train(run_dir, train_dataset, f"train.steps={STEPS}", "parallel.expert=2")
    assert result.returncode == 0, result.stdout + result.stderr
    curve = loss_curve(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    return curve


def test_stop_and_resume_is_bit_exact(reference, train_dataset, tmp_path):
    first = mds_train(tmp_path, train_dataset, f"train.steps={STEPS // 2}", "parallel.expert=2")
    assert first.returncode == 0, first.stdout + first.stderr
    second = mds_train(tmp_path, train_dataset, f"train.steps={STEPS}", "parallel.expert=2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000003'}" in second.stdout + second.stderr
    assert loss_curve(tmp_path) == reference  # identical floats, data included


def test_sigterm_finishes_the_step_saves_and_exits_for_requeue(reference, train_dataset, tmp_path):
    proc = mds_train(tmp_path, train_dataset, f"train.steps={STEPS}", "parallel.expert=2", popen=True)
    deadline = time.time() + 300
    while not metrics(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, output
    stopped_at = max(loss_curve(tmp_path))
    assert stopped_at < STEPS, "the run finished before the signal arrived"
    assert (tmp_path / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    resumed = mds_train(tmp_path, train_dataset, f"train.steps={STEPS}", "parallel.expert=2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert loss_curve(tmp_path) == reference


def test_resume_under_another_layout(reference, train_dataset, tmp_path):
    """Saved with EP=2 (DP=2), resumed with TP=2 (DP=1): the curve continues on the same data.

    Another layout sums in another order, so the resumed step matches to 1e-6 and the float
    rounding, amplified by Adam's first steps, stays within 1e-5 after it (3e-6 seen).
    """
    first = mds_train(tmp_path, train_dataset, f"train.steps={STEPS // 2}", "parallel.expert=2")
    assert first.returncode == 0, first.stdout + first.stderr
    second = mds_train(tmp_path, train_dataset, f"train.steps={STEPS}", "parallel.tensor=2")
    assert second.returncode == 0, second.stdout + second.stderr
    curve = loss_curve(tmp_path)
    resumed = STEPS // 2 + 1
    assert curve[resumed] == pytest.approx(reference[resumed], rel=1e-6)
    for step in range(1, STEPS + 1):
        assert curve[step] == pytest.approx(reference[step], rel=1e-5), step


def test_diverging_run_saves_and_stops(train_dataset, tmp_path):
    result = mds_train(tmp_path, train_dataset, "train.steps=20", "train.lr=1e30", "train.warmup_steps=0",
                       "train.grad_clip=0", "train.max_consecutive_skips=3", nproc=1)  # fmt: skip
    assert result.returncode == EXIT_DIVERGED, result.stdout + result.stderr
    assert "consecutive steps had a non-finite loss" in result.stdout + result.stderr
    records = metrics(tmp_path)
    assert records[-1]["skipped"] == 3
    assert (tmp_path / "checkpoints" / f"step_{records[-1]['step']:08d}").is_dir()
