"""`mds preprocess`: tokenize a corpus into webdataset shards plus a manifest.

The input files (sorted) are cut into work units of consecutive files holding about one shard's
worth of input bytes; a unit is tokenized by one process into one or more shards named after the
unit. Because the cut depends only on the inputs, the output is byte-identical whatever the number
of processes or MPI ranks. A unit's receipt (its shards, counts and input fingerprint) is written
after its shards; a re-run skips units whose receipt still matches, which makes the command
resumable. The manifest, written last from the receipts, is what marks a dataset as complete.
"""

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.inputs import Document, InputPolicy, ReadReport, expand_inputs, read_documents
from data_pipeline.shards import Manifest, ShardInfo, ShardWriter, atomic_write_text, token_dtype
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

RECEIPTS = ".receipts"
ENCODE_BATCH_CHARS = 1 << 20  # documents are encoded in batches of about this many characters


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that determines a preprocessing run's output."""

    inputs: list[str]  # files or directories (brace patterns allowed)
    output: str  # dataset directory to create or complete
    tokenizer: str | None = None  # tokenizer.json; None = the shipped default
    pattern: str = "**/*"  # glob applied inside input directories
    exclude: tuple[str, ...] = ()  # globs of paths inside input directories to leave out
    policy: InputPolicy = field(default_factory=InputPolicy)  # text field and bad-input policies
    shard_bytes: int = 64 << 20  # target shard size; a shard is closed once it reaches it
    processes: int = 1  # tokenizing processes on this machine (per MPI rank)
    command: list[str] = field(default_factory=list)  # recorded in the manifest


@dataclass(frozen=True)
class WorkUnit:
    index: int
    files: list[str]
    fingerprint: list  # [path, size, mtime_ns] per file: a receipt is reused only if this still matches


def plan_units(files: list[Path], shard_bytes: int) -> list[WorkUnit]:
    """Group consecutive files until each group holds at least `shard_bytes` of input."""
    units: list[WorkUnit] = []
    group: list[Path] = []
    size = 0
    for path in files:
        group.append(path)
        size += path.stat().st_size
        if size >= shard_bytes:
            units.append(_unit(len(units), group))
            group, size = [], 0
    if group:
        units.append(_unit(len(units), group))
    return units


def _unit(index: int, files: list[Path]) -> WorkUnit:
    fingerprint = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return WorkUnit(index, [str(p) for p in files], fingerprint)


def _receipt_path(output: Path, unit: WorkUnit) -> Path:
    return output / RECEIPTS / f"unit-{unit.index:06d}.json"


def _reusable_receipt(output: Path, unit: WorkUnit, key: dict) -> dict | None:
    path = _receipt_path(output, unit)
    if not path.is_file():
        return None
    receipt = json.loads(path.read_text())
    if receipt["fingerprint"] != unit.fingerprint or receipt["key"] != key:
        return None
    for shard in receipt["shards"]:
        shard_path = output / shard["name"]
        if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
            return None
    return receipt


class _UnitWriter:
    """Writes one unit's documents into shards `shard-<unit>-<part>.tar` of about `shard_bytes` each."""

    def __init__(self, output: Path, unit: WorkUnit, tokenizer: Tokenizer, shard_bytes: int):
        self.output, self.unit, self.tokenizer, self.shard_bytes = output, unit, tokenizer, shard_bytes
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.shards: list[ShardInfo] = []
        self.writer: ShardWriter | None = None

    def write_batch(self, docs: list[Document]) -> None:
        for doc, ids in zip(docs, self.tokenizer.encode_batch([d.text for d in docs])):
            if self.writer is None:
                name = f"shard-{self.unit.index:06d}-{len(self.shards):03d}.tar"
                self.writer = ShardWriter(self.output / name, self.dtype)
            self.writer.write(ids, doc.source, doc.doc_id)
            if self.writer.size() >= self.shard_bytes:
                self.shards.append(self.writer.close())
                self.writer = None

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.shards.append(self.writer.close())
        return self.shards


def process_unit(output: Path, unit: WorkUnit, tokenizer: Tokenizer, config: PreprocessConfig) -> dict:
    """Tokenize one unit into shards and write its receipt; returns the receipt."""
    report = ReadReport()
    writer = _UnitWriter(output, unit, tokenizer, config.shard_bytes)
    batch: list[Document] = []
    chars = 0
    for path in unit.files:
        for doc in read_documents(Path(path), config.policy, report):
            batch.append(doc)
            chars += len(doc.text)
            if chars >= ENCODE_BATCH_CHARS:
                writer.write_batch(batch)
                batch, chars = [], 0
    if batch:
        writer.write_batch(batch)
    shards = writer.close()
    receipt = {
        "fingerprint": unit.fingerprint,
        "key": _receipt_key(tokenizer, config),
        "shards": [asdict(s) for s in shards],
        "counts": dict(report.counts),
        "unreadable_files": report.unreadable_files,
    }
    atomic_write_text(_receipt_path(output, unit), json.dumps(receipt, sort_keys=True))
    return receipt


def _receipt_key(tokenizer: Tokenizer, config: PreprocessConfig) -> dict:
    """The settings besides the inputs that change a unit's shards."""
    return {"tokenizer": tokenizer.sha256, "shard_bytes": config.shard_bytes, "policy": asdict(config.policy)}


_worker_state: dict = {}


def _init_worker(output: str, config: PreprocessConfig) -> None:
    # One thread per process: parallelism comes from processes, so throughput scales predictably.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state.update(output=Path(output), config=config, tokenizer=load_tokenizer(config.tokenizer))


def _run_unit(unit: WorkUnit) -> dict:
    s = _worker_state
    return process_unit(s["output"], unit, s["tokenizer"], s["config"])


@dataclass
class PreprocessResult:
    manifest: Manifest
    units: int  # work units in the plan
    reused_units: int  # units whose shards a previous run had already completed
    seconds: float  # wall time of this run


def preprocess(
    config: PreprocessConfig, rank: int = 0, world_size: int = 1, barrier=None
) -> PreprocessResult:
    """Run (or finish) preprocessing; rank `rank` of `world_size` takes units rank, rank+world_size, ...

    With several ranks, `barrier` must synchronise them; rank 0 then writes the manifest.
    """
    start = time.perf_counter()
    output = Path(config.output)
    (output / RECEIPTS).mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.tokenizer)
    units = plan_units(expand_inputs(config.inputs, config.pattern, config.exclude), config.shard_bytes)
    if not units:
        raise ValueError(f"no input files found in {config.inputs} (pattern {config.pattern!r})")
    key = _receipt_key(tokenizer, config)
    todo = [u for u in units[rank::world_size] if _reusable_receipt(output, u, key) is None]
    if todo and config.processes == 1:  # no worker process to start and feed
        for unit in todo:
            process_unit(output, unit, tokenizer, config)
    elif todo:
        with multiprocessing.get_context("fork").Pool(
            config.processes, initializer=_init_worker, initargs=(str(output), config)
        ) as pool:
            for _ in pool.imap_unordered(_run_unit, todo):
                pass
    if barrier is not None:
        barrier()
    manifest = _collect_manifest(output, units, tokenizer, config, key)
    if rank == 0:
        shutil.copyfile(tokenizer.path, output / "tokenizer.json")
        manifest.write(output)
    reused = len(units[rank::world_size]) - len(todo)
    return PreprocessResult(manifest, len(units), reused, time.perf_counter() - start)


def _collect_manifest(
    output: Path, units: list[WorkUnit], tokenizer: Tokenizer, config: PreprocessConfig, key: dict
) -> Manifest:
    report = ReadReport()
    shards: list[ShardInfo] = []
    for unit in units:
        receipt = _reusable_receipt(output, unit, key)
        if receipt is None:
            raise RuntimeError(
                f"work unit {unit.index} ({unit.files[0]} ...) has no valid receipt after the run"
            )
        shards.extend(ShardInfo(**s) for s in receipt["shards"])
        report.counts.update(receipt["counts"])
        report.unreadable_files.extend(receipt["unreadable_files"])
    return Manifest(
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        token_dtype=str(token_dtype(tokenizer.vocab_size)),
        command=config.command,
        shards=shards,
        documents=sum(s.samples for s in shards),
        tokens=sum(s.tokens for s in shards),
        skipped=dict(sorted(report.counts.items())),
        unreadable_files=report.unreadable_files,
    )


def format_summary(result: PreprocessResult) -> str:
    m = result.manifest
    lines = [
        f"documents {m.documents:,}  tokens {m.tokens:,}  shards {len(m.shards)}  "
        f"work units {result.units} ({result.reused_units} reused from a previous run)  "
        f"{result.seconds:.1f}s ({m.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)",
    ]
    lines += [f"skipped {count:,} {reason.replace('_', ' ')}" for reason, count in m.skipped.items()]
    lines += [f"unreadable: {entry}" for entry in m.unreadable_files]
    return "\n".join(lines)
