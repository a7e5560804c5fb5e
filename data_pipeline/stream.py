"""Virtual streams: each packs its own documents into sequences and blends datasets by weight.

A stream's state is a handful of integers per dataset (epoch, position, token offset) plus the
number of sequences it drew from each dataset; everything else (shard order, window contents, FIM
cuts) is recomputed from the seed. See docs/data.md.
"""

import random
from dataclasses import dataclass

import numpy as np

from data_pipeline.dataset import (
    Dataset,
    EpochLayout,
    ShardSource,
    WindowDocument,
    epoch_layout,
    window_order,
)
from data_pipeline.fim import apply_fim


@dataclass(frozen=True)
class StreamSettings:
    """What every stream shares; part of the loader's fingerprint except the corruption settings."""

    seed: int
    num_streams: int
    shuffle_buffer: int
    fim_rate: float
    fim_spm_rate: float
    document_masking: bool
    corruption: str
    verify_checksums: bool


class DatasetCursor:
    """One dataset as seen by one stream: walks its documents and packs them into sequences.

    Documents are FIM-transformed, followed by EOS, and concatenated; sequence k is tokens
    [k*L, k*L + L + 1) of that concatenation, so consecutive sequences share one token and every
    token is a prediction target exactly once, with no padding.
    """

    def __init__(
        self, dataset: Dataset, tag: int, stream: int, settings: StreamSettings, state: dict, skipped: set
    ):
        self.dataset, self.tag, self.stream, self.settings = dataset, tag, stream, settings
        self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]
        self.source = ShardSource(dataset, settings.corruption, settings.verify_checksums, skipped)
        self.layout: EpochLayout | None = None
        self.window: tuple[int, list[WindowDocument | None]] | None = None  # (window index, shuffled docs)
        self.document: np.ndarray | None = None  # packed tokens of the document at `position`
        # Whether this epoch has given a document so far; None when it was entered mid-way (resumed).
        self.epoch_readable: bool | None = False if self.position == 0 else None

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}

    def _layout(self) -> EpochLayout:
        if self.layout is None:
            s = self.settings
            self.layout = epoch_layout(self.dataset, s.seed, self.tag, self.epoch, self.stream, s.num_streams)
        return self.layout

    def _window(self, index: int) -> list[WindowDocument | None]:
        if self.window is None or self.window[0] != index:
            layout, k = self._layout(), self.settings.shuffle_buffer
            first, last = index * k, min((index + 1) * k, layout.documents)
            docs: list[WindowDocument | None] = []
            shard_index = int(np.searchsorted(layout.starts, first, side="right")) - 1
            while first + len(docs) < last:
                shard, shard_start = layout.shards[shard_index], int(layout.starts[shard_index])
                start = first + len(docs) - shard_start
                count = min(last - first - len(docs), shard.samples - start)
                arrays = self.source.read(shard, start, count) if count else []
                docs += (
                    [None] * count
                    if arrays is None
                    else [WindowDocument(a, f"{shard.name}/{start + i}") for i, a in enumerate(arrays)]
                )
                shard_index += 1
            order = window_order(self.settings.seed, self.tag, self.stream, self.epoch, index, len(docs))
            self.window = (index, [docs[i] for i in order])
        return self.window[1]

    def _current_document(self) -> np.ndarray:
        """The packed document under the cursor, moving past exhausted, unreadable and epoch ends."""
        while True:
            if self.document is not None and self.offset < len(self.document):
                return self.document
            if self.document is not None:
                self.position, self.offset, self.document = self.position + 1, 0, None
            if self.position >= self._layout().documents:
                self._next_epoch()
                continue
            k = self.settings.shuffle_buffer
            entry = self._window(self.position // k)[self.position % k]
            if entry is None:
                self.position, self.offset = self.position + 1, 0
                continue
            self.epoch_readable = True
            self.document = self._pack(entry)

    def _next_epoch(self) -> None:
        if self.epoch_readable is False:
            raise RuntimeError(
                f"stream {self.stream} found no readable document in {self.dataset.directory} in epoch "
                f"{self.epoch}: its shards are empty or were skipped as corrupt; restore the shards"
            )
        self.epoch, self.position, self.offset, self.epoch_readable = self.epoch + 1, 0, 0, False
        self.layout, self.window, self.document = None, None, None

    def _pack(self, entry: WindowDocument) -> np.ndarray:
        s = self.settings
        rng = random.Random(f"fim/{s.seed}/{self.tag}/{self.epoch}/{entry.key}")
        tokens = apply_fim(entry.tokens, self.dataset.tokenizer, rng, s.fim_rate, s.fim_spm_rate)
        return np.append(tokens, np.array(self.dataset.tokenizer.eos_id, dtype=tokens.dtype))

    def next_sequence(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, doc_ids), each seq_len + 1 long; doc_ids number the documents within the sequence."""
        pieces: list[np.ndarray] = []
        remaining = seq_len + 1
        while remaining:
            document = self._current_document()
            piece = document[self.offset : self.offset + remaining]
            pieces.append(piece)
            self.offset += len(piece)
            remaining -= len(piece)
        self.offset -= 1  # the last token also starts the next sequence
        tokens = np.concatenate(pieces)
        if not self.settings.document_masking:
            return tokens, np.zeros(len(tokens), dtype=np.int64)
        return tokens, np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])


class VirtualStream:
    """One of the loader's N streams: a deterministic sequence of micro-batches.

    Datasets are blended per sequence with the deterministic schedule of Megatron-LM's blended
    dataset: the next sequence comes from the dataset furthest below its share, weight * (n + 1)
    minus sequences drawn so far, so proportions are exact to within one sequence per stream.
    """

    def __init__(
        self, index: int, datasets: list[Dataset], weights: list[float], settings: StreamSettings, state: dict
    ):
        self.index = index
        self.weights = np.asarray(weights) / sum(weights)
        self.drawn = list(state["drawn"])
        self.skipped = set(state["skipped"])
        self.cursors = [
            DatasetCursor(d, tag, index, settings, cursor, self.skipped)
            for tag, (d, cursor) in enumerate(zip(datasets, state["cursors"]))
        ]

    @staticmethod
    def initial_state(num_datasets: int) -> dict:
        cursor = {"epoch": 0, "position": 0, "offset": 0}
        return {
            "drawn": [0] * num_datasets,
            "cursors": [dict(cursor) for _ in range(num_datasets)],
            "skipped": [],
        }

    def state(self) -> dict:
        return {
            "drawn": list(self.drawn),
            "cursors": [c.state() for c in self.cursors],
            "skipped": sorted(self.skipped),
        }

    def next_batch(self, micro_batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, doc_ids) of shape [micro_batch_size, seq_len + 1] and dataset index per sequence."""
        tokens, doc_ids, sources = [], [], []
        for _ in range(micro_batch_size):
            deficit = self.weights * (sum(self.drawn) + 1) - np.asarray(self.drawn)
            source = int(np.argmax(deficit))
            t, d = self.cursors[source].next_sequence(seq_len)
            self.drawn[source] += 1
            tokens.append(t)
            doc_ids.append(d)
            sources.append(source)
        return np.stack(tokens), np.stack(doc_ids), np.asarray(sources)
