"""Blending several datasets by weight, with a deterministic schedule that survives resume."""

import numpy as np
import pytest
import torch
from data_helpers import take

from data_pipeline import DataConfig
from data_pipeline.dataset import Dataset


def blend_config(tiny, subset, weights) -> DataConfig:
    return DataConfig(paths=[str(tiny), str(subset)], weights=weights, num_streams=4, fim_rate=0.0)


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.9, 0.1]])
def test_blend_proportions(tiny_dataset, subset_dataset, weights):
    batches, _ = take(blend_config(tiny_dataset, subset_dataset, weights), 400, workers=2)
    sources = torch.cat([b["dataset_ids"] for b in batches]).numpy()
    share = np.bincount(sources, minlength=2) / len(sources)
    assert np.allclose(share, np.asarray(weights) / sum(weights), atol=0.01)


def test_default_weights_follow_token_counts(tiny_dataset, subset_dataset):
    tokens = [Dataset.open(d).manifest.tokens for d in (tiny_dataset, subset_dataset)]
    batches, _ = take(blend_config(tiny_dataset, subset_dataset, []), 200)
    share = torch.cat([b["dataset_ids"] for b in batches]).float().mean().item()
    assert abs(share - tokens[1] / sum(tokens)) < 0.01


def test_blended_stream_resumes_exactly(tiny_dataset, subset_dataset):
    cfg = blend_config(tiny_dataset, subset_dataset, [0.3, 0.7])
    want, _ = take(cfg, 30)
    first, loader = take(cfg, 11, workers=1)
    rest, _ = take(cfg, 19, state=loader.state_dict(), workers=2)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first + rest, want))


def test_weights_must_match_paths(tiny_dataset):
    with pytest.raises(ValueError, match="data.weights has 2 entries for 1 data.paths"):
        take(DataConfig(paths=[str(tiny_dataset)], weights=[1, 2], num_streams=4), 1)
