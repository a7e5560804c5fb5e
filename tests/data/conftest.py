"""Shared corpora for the data pipeline tests: real Python standard library sources, tokenized once."""

import shutil
from pathlib import Path

import pytest
from data_helpers import STDLIB, small_stdlib_files

from data_pipeline.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """16 small stdlib modules, one per shard (about 10k tokens): epochs are short."""
    out = tmp_path_factory.mktemp("tiny")
    preprocess(PreprocessConfig(inputs=small_stdlib_files(), output=str(out), shard_bytes=1, processes=2))
    return out


@pytest.fixture(scope="session")
def subset_dataset(tmp_path_factory) -> Path:
    """The 29 top-level stdlib modules starting with a-c (about 170k tokens) in ~30 shards."""
    out = tmp_path_factory.mktemp("subset")
    preprocess(
        PreprocessConfig(
            inputs=[str(STDLIB)], output=str(out), pattern="[a-c]*.py", shard_bytes=32 << 10, processes=2
        )
    )
    return out


@pytest.fixture
def copy_dataset(tmp_path):
    """A private copy of a dataset, for tests that damage it."""
    return lambda source: Path(shutil.copytree(source, tmp_path / "copy"))
