"""The on-disk format: webdataset tar shards of tokenized documents, and the manifest that lists them.

One sample per document: `<key>.u16` (or `.u32` for vocabularies above 65536 ids) holds the token
ids as a little-endian array, `<key>.json` holds {"source", "doc_id", "length"}. Tar members carry
fixed metadata (mtime 0, uid 0) so the same input always gives byte-identical shards, and a shard is
written under a temporary name and renamed when complete, so a half-written shard is never visible.
"""

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.tokenizer import file_sha256

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest."""

    name: str  # file name, relative to the dataset directory
    samples: int  # number of documents in the shard
    tokens: int  # number of token ids in the shard
    sha256: str  # checksum of the whole tar file
    bytes: int  # size of the tar file


@dataclass
class Manifest:
    """A dataset directory's table of contents, written last by `mds preprocess`."""

    tokenizer_sha256: str  # hash of the tokenizer.json the shards were encoded with (copied beside them)
    vocab_size: int  # ids of that tokenizer, special tokens included
    token_dtype: str  # "uint16" or "uint32"
    command: list[str]  # the command line that produced the dataset
    shards: list[ShardInfo]  # in a fixed order; the loader shuffles them per epoch
    documents: int = 0  # documents written
    tokens: int = 0  # tokens written
    skipped: dict[str, int] = field(default_factory=dict)  # items dropped while reading, by reason
    unreadable_files: list[str] = field(default_factory=list)  # "path: reason" for inputs that failed
    version: int = MANIFEST_VERSION

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / MANIFEST, json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST} in {directory}: it is not a preprocessed dataset, or `mds preprocess` "
                "did not finish there; run `mds preprocess --output {directory} ...`"
            )
        raw = json.loads(path.read_text())
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path} has manifest version {raw.get('version')}, expected {MANIFEST_VERSION}")
        raw["shards"] = [ShardInfo(**shard) for shard in raw["shards"]]
        return cls(**raw)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either the old content or the new one, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Writes one shard under a temporary name; `close` renames it into place and returns its entry."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.dtype = dtype
        self.extension = "u16" if dtype.itemsize == 2 else "u32"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close)
        self.samples = 0
        self.tokens = 0

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(payload))

    def write(self, ids: list[int], source: str, doc_id: str) -> None:
        key = f"{self.samples:08d}"
        self._add(f"{key}.{self.extension}", np.asarray(ids, dtype=self.dtype).tobytes())
        meta = {"source": source, "doc_id": doc_id, "length": len(ids)}
        self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self.samples += 1
        self.tokens += len(ids)

    def size(self) -> int:
        return self.tar.fileobj.tell()

    def close(self) -> ShardInfo:
        self.tar.close()
        info = ShardInfo(
            self.path.name, self.samples, self.tokens, file_sha256(self.tmp), self.tmp.stat().st_size
        )
        os.replace(self.tmp, self.path)
        return info


class CorruptShard(RuntimeError):
    """A shard that is missing, fails its checksum, or cannot be read to the end."""


class ShardReader:
    """Reads a shard's token arrays in order, keeping the tar open between calls.

    The loader reads a shard window by window; keeping the position avoids rescanning the tar from
    its start for every window. Any failure becomes a CorruptShard that names the shard.
    """

    def __init__(self, path: Path, dtype: np.dtype):
        self.path = path
        self.dtype = dtype
        self.suffix = ".u16" if dtype.itemsize == 2 else ".u32"
        self.tar: tarfile.TarFile | None = None
        self.position = 0  # index of the next sample the open tar will give

    def _members(self) -> Iterator[tarfile.TarInfo]:
        for member in self.tar:
            if member.name.endswith(self.suffix):
                yield member

    def read(self, start: int, count: int) -> list[np.ndarray]:
        """Token arrays of samples [start, start+count)."""
        try:
            if self.tar is None or start < self.position:
                self.close()
                self.tar = tarfile.open(self.path, "r:")  # noqa: SIM115 (kept open across reads)
                self.members = self._members()
                self.position = 0
            samples: list[np.ndarray] = []
            for member in self.members:
                self.position += 1
                if self.position <= start:
                    continue
                data = self.tar.extractfile(member).read()
                if len(data) != member.size:
                    raise CorruptShard(f"shard {self.path} is truncated inside sample {self.position - 1}")
                samples.append(np.frombuffer(data, dtype=self.dtype))
                if len(samples) == count:
                    return samples
        except (tarfile.TarError, OSError, EOFError) as error:
            raise CorruptShard(f"shard {self.path} cannot be read: {error}") from error
        raise CorruptShard(
            f"shard {self.path} ends after {self.position} samples; "
            f"the manifest promised at least {start + count}"
        )

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    __del__ = close  # a stream dropped mid-shard (end of iteration) releases its file


def iter_shard_metadata(path: Path) -> Iterator[dict]:
    """The metadata of every sample of a shard, in order (for tests and inspection)."""
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name.endswith(".json"):
                yield json.loads(tar.extractfile(member).read())
