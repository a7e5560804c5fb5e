"""Corrupt, truncated and missing shards: an error naming the shard, or an explicit, counted skip."""

import pytest
from data_helpers import take

from data_pipeline import DataConfig
from data_pipeline.shards import CorruptShard, Manifest


def damage(directory, how: str) -> str:
    """Damage the first shard of the manifest; returns its name."""
    shard = directory / Manifest.read(directory).shards[0].name
    data = shard.read_bytes()
    if how == "flip":
        shard.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    elif how == "truncate":
        shard.write_bytes(data[:612])  # the tar header and 100 bytes of the first sample
    else:
        shard.unlink()
    return shard.name


def config(directory, **overrides) -> DataConfig:
    return DataConfig(paths=[str(directory)], num_streams=4, shuffle_buffer=4, **overrides)


# Enough batches to read every shard of the tiny dataset at least once.
STEPS = 60


@pytest.mark.parametrize(
    "how,verify,message",
    [
        ("flip", True, "does not match the sha256"),
        ("truncate", True, "does not match the sha256"),
        ("truncate", False, "truncated|cannot be read|ends after"),
        ("missing", True, "is missing"),
    ],
)
def test_damaged_shard_stops_with_its_name(tiny_dataset, copy_dataset, how, verify, message):
    directory = copy_dataset(tiny_dataset)
    name = damage(directory, how)
    with pytest.raises(CorruptShard, match=rf"{name}.*({message}).*data.corruption=skip"):
        take(config(directory, verify_checksums=verify), STEPS)


@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_skip_policy_warns_counts_and_stays_deterministic(tiny_dataset, copy_dataset, how):
    directory = copy_dataset(tiny_dataset)
    name = damage(directory, how)
    cfg = config(directory, corruption="skip")
    with pytest.warns(UserWarning, match=f"skipping corrupt shard.*{name}"):
        want, loader = take(cfg, STEPS)
    assert loader.skipped_shards == [name]
    first, loader = take(cfg, 20)
    rest, _ = take(cfg, STEPS - 20, state=loader.state_dict(), workers=2)
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(first + rest, want))
