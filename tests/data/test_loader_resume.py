"""Exact and elastic resume: resumed streams must equal the uninterrupted stream token for token."""

import json

import pytest
import torch
from data_helpers import take

from data_pipeline import DataConfig
from data_pipeline.loader import StatefulLoader

STEPS = 24


def config(dataset) -> DataConfig:
    return DataConfig(paths=[str(dataset)], num_streams=4, shuffle_buffer=4, document_masking=True)


@pytest.fixture(scope="module")
def reference(tiny_dataset) -> list[dict]:
    """The uninterrupted global stream on one rank, read in the training process."""
    batches, _ = take(config(tiny_dataset), STEPS)
    return batches


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for key in ("tokens", "doc_ids", "dataset_ids"):
            assert torch.equal(g[key], w[key]), f"batch {i}: {key} differs"


def run_dp(cfg, dp_size: int, steps: int, workers: int, state=None):
    """`steps` lock-step steps on `dp_size` ranks: the global batches in order, and the merged state."""
    per_rank = [
        take(cfg, steps, state=state, dp_rank=r, dp_size=dp_size, workers=workers) for r in range(dp_size)
    ]
    interleaved = [per_rank[r][0][i] for i in range(steps) for r in range(dp_size)]
    states = [json.loads(json.dumps(loader.state_dict())) for _, loader in per_rank]
    return interleaved, StatefulLoader.merge_states(states)


def test_stream_is_the_same_for_any_workers_and_dp(tiny_dataset, reference):
    for workers in (1, 2):
        assert_same(take(config(tiny_dataset), STEPS, workers=workers)[0], reference)
    assert_same(run_dp(config(tiny_dataset), 2, STEPS // 2, workers=1)[0], reference)


@pytest.mark.parametrize("dp_size,workers", [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)])
def test_stop_and_resume_is_exact(tiny_dataset, reference, dp_size, workers):
    cfg = config(tiny_dataset)
    for stop in (1, 5):  # in global steps of dp_size batches
        first, state = run_dp(cfg, dp_size, stop, workers)
        rest, _ = run_dp(cfg, dp_size, STEPS // dp_size - stop, workers, state=state)
        assert_same(first + rest, reference)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_changes_dp_size(tiny_dataset, reference, before, after):
    cfg = config(tiny_dataset)
    first, state = run_dp(cfg, before, 6 // before, workers=1)
    rest, _ = run_dp(cfg, after, (STEPS - 6) // after, workers=2, state=state)
    assert_same(first + rest, reference)


def test_resume_across_epochs(tiny_dataset):
    cfg = config(tiny_dataset)  # one epoch is about 80 batches of 128 tokens
    want, _ = take(cfg, 260, mbs=1)
    first, loader = take(cfg, 170, mbs=1)
    epochs = {c["epoch"] for s in loader.state_dict()["streams"].values() for c in s["cursors"]}
    assert max(epochs) >= 1
    rest, _ = take(cfg, 90, mbs=1, state=loader.state_dict(), workers=2)
    assert_same(first + rest, want)


def test_state_counts_what_was_consumed_not_prefetched(tiny_dataset, reference):
    batches, loader = take(config(tiny_dataset), 3, workers=2)  # workers have prefetched more
    assert loader.state_dict()["consumed"] == 3
    assert_same(take(config(tiny_dataset), 2, state=loader.state_dict())[0], reference[3:5])


def test_iterating_again_continues(tiny_dataset, reference):
    batches, loader = take(config(tiny_dataset), 2, workers=1)
    assert_same([next(iter(loader))], reference[2:3])


def test_streams_must_divide_among_readers(tiny_dataset):
    with pytest.raises(ValueError, match=r"data.num_streams=4 must be a multiple of .* = 6"):
        take(config(tiny_dataset), 1, dp_size=2, workers=3)


def test_state_of_another_data_stream_is_refused(tiny_dataset):
    _, loader = take(config(tiny_dataset), 2)
    with pytest.raises(ValueError, match="differs in seq_len"):
        take(config(tiny_dataset), 1, seq_len=32, state=loader.state_dict())


def test_merge_needs_lock_step(tiny_dataset):
    cfg = config(tiny_dataset)
    states = [take(cfg, steps, dp_rank=r, dp_size=2)[1].state_dict() for r, steps in ((0, 2), (1, 3))]
    with pytest.raises(ValueError, match="not in lock step"):
        StatefulLoader.merge_states(states)
