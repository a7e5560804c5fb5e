"""Fixtures shared across test folders."""

from pathlib import Path

import pytest
from corpus import stdlib_subset_inputs

from data_pipeline.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """The a-c stdlib modules (~170k tokens) tokenized into enough shards for 16 streams."""
    out = tmp_path_factory.mktemp("train-data")
    preprocess(PreprocessConfig(**stdlib_subset_inputs(), output=str(out), shard_bytes=12 << 10, processes=2))
    return out
