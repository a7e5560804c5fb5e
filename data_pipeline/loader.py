"""The training loop's loader: one global stream of micro-batches, exact and elastic resume.

Global micro-batch j is the next batch of virtual stream j mod N. Rank r of d consumes global
batches r, r+d, r+2d, ... in lock step with the other ranks, and within a rank, DataLoader worker w
of W produces the rank's local batches w, w+W, ... Since d*W divides N, every stream is served by
exactly one worker of one rank, so streams never need to talk to each other. Each batch travels
with its stream's state after it; the iterator records the state of the batches it hands out, so
`state_dict` describes what the caller consumed, not what workers prefetched. See docs/data.md.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.dataset import Dataset
from data_pipeline.default_dataset import ensure_default_dataset
from data_pipeline.stream import StreamSettings, VirtualStream
from data_pipeline.tokenizer import load_tokenizer

STATE_VERSION = 1


@dataclass(frozen=True)
class StreamPlan:
    """Everything that determines the global stream of micro-batches."""

    datasets: list[Dataset]
    weights: list[float]
    settings: StreamSettings
    seq_len: int
    micro_batch_size: int

    def fingerprint(self) -> dict:
        """What a saved state must agree on to be resumed; dp_size and num_workers are absent on purpose."""
        s = self.settings
        return {
            "datasets": [d.content_hash for d in self.datasets],
            "weights": list(self.weights),
            "seed": s.seed,
            "num_streams": s.num_streams,
            "shuffle_buffer": s.shuffle_buffer,
            "fim_rate": s.fim_rate,
            "fim_spm_rate": s.fim_spm_rate,
            "document_masking": s.document_masking,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
        }


class StreamDataset(IterableDataset):
    """The batches of one rank from global batch `start` on; each item carries its stream's state."""

    def __init__(self, plan: StreamPlan, start: int, dp_rank: int, dp_size: int, states: dict[int, dict]):
        self.plan, self.start, self.dp_rank, self.dp_size, self.states = plan, start, dp_rank, dp_size, states

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        plan, streams = self.plan, {}
        for m in count():
            local = worker + m * num_workers
            index = (self.start + self.dp_rank + local * self.dp_size) % plan.settings.num_streams
            if index not in streams:
                streams[index] = VirtualStream(
                    index, plan.datasets, plan.weights, plan.settings, self.states[index]
                )
            tokens, doc_ids, sources = streams[index].next_batch(plan.micro_batch_size, plan.seq_len)
            yield {
                "tokens": torch.from_numpy(tokens.astype("int64")),
                "doc_ids": torch.from_numpy(doc_ids),
                "dataset_ids": torch.from_numpy(sources),
                "stream": index,
                "state": json.dumps(streams[index].state()),
            }


class StatefulLoader:
    """Iterable over micro-batch dicts with `state_dict`, `merge_states` and `load_state_dict`.

    Each `iter()` continues from what was consumed so far; use one iterator at a time.
    """

    def __init__(self, plan: StreamPlan, dp_rank: int, dp_size: int, num_workers: int):
        self.plan, self.dp_rank, self.dp_size, self.num_workers = plan, dp_rank, dp_size, num_workers
        self.start = 0  # global micro-batches consumed by all ranks when this rank's record began
        self.consumed = 0  # micro-batches this rank has handed out since then
        self.streams = {
            i: VirtualStream.initial_state(len(plan.datasets)) for i in range(plan.settings.num_streams)
        }

    def __iter__(self) -> Iterator[dict]:
        position = self.start + self.consumed * self.dp_size
        dataset = StreamDataset(self.plan, position, self.dp_rank, self.dp_size, dict(self.streams))
        loader = DataLoader(  # pinned batches copy to the GPU without stopping the host
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )
        for item in loader:
            self.streams[item.pop("stream")] = json.loads(item.pop("state"))
            self.consumed += 1
            yield item

    def _owned(self) -> list[int]:
        n, d = self.plan.settings.num_streams, self.dp_size
        return [i for i in range(n) if (i - self.start - self.dp_rank) % d == 0]

    def state_dict(self) -> dict:
        """This rank's consumed position: JSON-serialisable, covering only the streams it serves."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.plan.fingerprint(),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "consumed": self.start + self.consumed * self.dp_size,
            "streams": {str(i): self.streams[i] for i in self._owned()},
        }

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One global state, independent of the DP size, from the states of all ranks."""
        first = states[0]
        ranks = sorted(s["dp_rank"] for s in states)
        if ranks != list(range(first["dp_size"])):
            raise ValueError(f"merge_states needs the states of ranks 0..{first['dp_size'] - 1}, got {ranks}")
        for s in states:
            if s["fingerprint"] != first["fingerprint"]:
                raise ValueError("merge_states got states of different data configurations")
            if s["consumed"] != first["consumed"]:
                raise ValueError(
                    f"ranks are not in lock step: rank {s['dp_rank']} is at global batch {s['consumed']}, "
                    f"rank {first['dp_rank']} at {first['consumed']}; save all ranks' states after one step"
                )
        streams = {int(i): st for s in states for i, st in s["streams"].items()}
        return {
            "version": STATE_VERSION,
            "fingerprint": first["fingerprint"],
            "consumed": first["consumed"],
            "streams": [streams[i] for i in range(len(streams))],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a merged state (or the state of a DP-1 run), on any DP size and workers."""
        if "dp_size" in state:
            state = self.merge_states([state])
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self.plan.fingerprint()
        changed = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
        if changed:
            raise ValueError(
                f"the saved loader state is of another data stream (it differs in {', '.join(changed)}); "
                "restore those settings to resume, or start the data stream afresh without loading the state"
            )
        self.start, self.consumed = state["consumed"], 0
        self.streams = dict(enumerate(state["streams"]))

    @property
    def skipped_shards(self) -> list[str]:
        """Shards this rank's streams skipped as corrupt (policy "skip")."""
        return sorted({name for st in self.streams.values() for name in st["skipped"]})


def build_loader(
    cfg: DataConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    num_workers: int | None = None,
) -> StatefulLoader:
    cfg.validate()
    num_workers = cfg.num_workers if num_workers is None else num_workers
    readers = dp_size * max(num_workers, 1)
    if cfg.num_streams % readers:
        raise ValueError(
            f"data.num_streams={cfg.num_streams} must be a multiple of dp_size x max(num_workers, 1) = "
            f"{dp_size} x {max(num_workers, 1)} = {readers}, so each stream has one reader; "
            f"set data.num_streams to a multiple of {readers} (this starts a new data stream) "
            "or choose data.num_workers so that it holds"
        )
    paths = cfg.paths or [ensure_default_dataset(Path(cfg.cache_dir).expanduser())]
    datasets = [Dataset.open(p) for p in paths]
    _check_datasets(cfg, datasets)
    weights = list(cfg.weights) or [float(d.manifest.tokens) for d in datasets]
    settings = StreamSettings(
        seed=seed,
        num_streams=cfg.num_streams,
        shuffle_buffer=cfg.shuffle_buffer,
        fim_rate=cfg.fim_rate,
        fim_spm_rate=cfg.fim_spm_rate,
        document_masking=cfg.document_masking,
        corruption=cfg.corruption,
        verify_checksums=cfg.verify_checksums,
    )
    plan = StreamPlan(datasets, weights, settings, seq_len, micro_batch_size)
    return StatefulLoader(plan, dp_rank, dp_size, num_workers)


def _check_datasets(cfg: DataConfig, datasets: list[Dataset]) -> None:
    expected = load_tokenizer(cfg.tokenizer)
    for d in datasets:
        if d.manifest.tokenizer_sha256 != expected.sha256:
            raise ValueError(
                f"dataset {d.directory} was encoded with a different tokenizer than data.tokenizer "
                f"({expected.path}); set data.tokenizer={d.directory / 'tokenizer.json'} "
                "or re-run `mds preprocess` with data.tokenizer"
            )
        if len(d.manifest.shards) < cfg.num_streams:
            raise ValueError(
                f"dataset {d.directory} has {len(d.manifest.shards)} shards but data.num_streams="
                f"{cfg.num_streams} streams each need at least one; re-run `mds preprocess` with a smaller "
                "--shard-size-mb, or lower data.num_streams"
            )
        if cfg.fim_rate > 0 and d.tokenizer.fim_ids is None:
            raise ValueError(f"the tokenizer of {d.directory} has no FIM tokens; set data.fim_rate=0")
