"""A preprocessed dataset opened for reading, and how one virtual stream walks through it.

Stream s of N owns, in epoch e, the shards at positions s, s+N, s+2N, ... of that epoch's shuffled
shard order. Its documents in that epoch are those shards' samples in order, read in windows of
`shuffle_buffer` documents that are each shuffled by a seeded permutation. A position (epoch, index
in the stream's shuffled order) therefore names a document without any buffered state, which is
what makes the loader's state small and exact.
"""

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from data_pipeline.shards import CorruptShard, Manifest, ShardInfo, ShardReader
from data_pipeline.tokenizer import Tokenizer, file_sha256, load_tokenizer


@dataclass(frozen=True)
class Dataset:
    """One dataset directory: its manifest, its tokenizer, and where its shards are."""

    directory: Path
    manifest: Manifest

    @classmethod
    def open(cls, directory: str | Path) -> "Dataset":
        directory = Path(directory).expanduser()
        return cls(directory, Manifest.read(directory))

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory / "tokenizer.json")

    @cached_property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.token_dtype).newbyteorder("<")

    @cached_property
    def content_hash(self) -> str:
        """Identifies the shards' content, whatever directory they have been copied to."""
        shards = [[s.name, s.sha256] for s in self.manifest.shards]
        return hashlib.sha256(json.dumps([self.manifest.tokenizer_sha256, shards]).encode()).hexdigest()


@dataclass(frozen=True)
class EpochLayout:
    """The documents one stream reads from one dataset in one epoch."""

    shards: list[ShardInfo]  # the stream's shards, in this epoch's order
    starts: np.ndarray  # index of each shard's first sample in the stream's order; one extra entry = total

    @property
    def documents(self) -> int:
        return int(self.starts[-1])


def epoch_layout(
    dataset: Dataset, seed: int, tag: int, epoch: int, stream: int, num_streams: int
) -> EpochLayout:
    order = list(range(len(dataset.manifest.shards)))
    random.Random(f"shards/{seed}/{tag}/{epoch}").shuffle(order)
    shards = [dataset.manifest.shards[i] for i in order[stream::num_streams]]
    return EpochLayout(shards, np.concatenate([[0], np.cumsum([s.samples for s in shards])]))


def window_order(seed: int, tag: int, stream: int, epoch: int, window: int, size: int) -> list[int]:
    order = list(range(size))
    random.Random(f"window/{seed}/{tag}/{stream}/{epoch}/{window}").shuffle(order)
    return order


@dataclass(frozen=True)
class WindowDocument:
    tokens: np.ndarray
    key: str  # "<shard name>/<sample index>": seeds the document's FIM randomness


class ShardSource:
    """Reads sample ranges of a dataset's shards, checking each shard once and applying the
    corruption policy: "error" raises CorruptShard naming the shard; "skip" warns, records the
    shard in `skipped`, and returns None for its samples."""

    def __init__(self, dataset: Dataset, policy: str, verify_checksums: bool, skipped: set[str]):
        self.dataset, self.policy, self.verify, self.skipped = dataset, policy, verify_checksums, skipped
        self.reader: ShardReader | None = None

    def read(self, shard: ShardInfo, start: int, count: int) -> list[np.ndarray] | None:
        path = self.dataset.directory / shard.name
        try:
            if self.reader is None or self.reader.path != path:
                self.close()
                self._check(shard, path)
                self.reader = ShardReader(path, self.dataset.dtype)
            return self.reader.read(start, count)
        except CorruptShard as error:
            self.close()
            if self.policy == "error":
                raise CorruptShard(
                    f"{error}; restore the shard, or set data.corruption=skip to skip it"
                ) from None
            warnings.warn(f"skipping corrupt shard: {error}", stacklevel=2)
            self.skipped.add(shard.name)
            return None

    def _check(self, shard: ShardInfo, path: Path) -> None:
        if not path.is_file():
            raise CorruptShard(f"shard {path} listed in the manifest is missing")
        if self.verify and file_sha256(path) != shard.sha256:
            raise CorruptShard(f"shard {path} does not match the sha256 in its manifest")

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
