"""Reading raw documents: JSONL, plain text, directories, gzip and zstd, with a policy for bad input.

Every bad item is counted under a named reason, so the preprocessing summary can say exactly what was
dropped and why; nothing is dropped silently.
"""

import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import zstandard
from braceexpand import braceexpand

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class InputPolicy:
    """How to read inputs and what to do with bad ones."""

    text_field: str = "text"  # the JSONL field holding a document's text
    invalid_utf8: str = "replace"  # "replace": keep with U+FFFD; "skip": drop the document
    unreadable: str = "skip"  # "skip": report the file and go on; "error": stop the run


@dataclass
class ReadReport:
    """What happened while reading: counters by reason, and the files that could not be read."""

    counts: Counter = field(default_factory=Counter)
    unreadable_files: list[str] = field(default_factory=list)  # "path: reason"

    def merge(self, other: "ReadReport") -> None:
        self.counts.update(other.counts)
        self.unreadable_files.extend(other.unreadable_files)


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the input file, as given on the command line or found under a given directory
    doc_id: str  # stable within the corpus: "<source>" for a text file, "<source>:<line>" for JSONL


class UnreadableInput(RuntimeError):
    """Raised under the "error" policy when an input file cannot be read."""


def expand_inputs(inputs: list[str], pattern: str = "**/*", exclude: tuple[str, ...] = ()) -> list[Path]:
    """Files named by `inputs`, sorted.

    Brace patterns are expanded; directories are searched with `pattern`, leaving out files whose
    path relative to the directory matches one of the `exclude` globs (e.g. "site-packages/*").
    """
    files: set[Path] = set()
    for spec in inputs:
        for name in braceexpand(spec):
            path = Path(name)
            if path.is_dir():
                files.update(
                    p
                    for p in path.glob(pattern)
                    if p.is_file() and not any(fnmatch(str(p.relative_to(path)), x) for x in exclude)
                )
            elif path.exists():
                files.add(path)
            else:
                raise FileNotFoundError(f"input {name} does not exist")
    return sorted(files)


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    return name.endswith(JSONL_SUFFIXES)


def _decode(raw: bytes, policy: InputPolicy, report: ReadReport) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if policy.invalid_utf8 == "skip":
            report.counts["invalid_utf8_skipped"] += 1
            return None
        report.counts["invalid_utf8_replaced"] += 1
        return raw.decode("utf-8", errors="replace")


def _texts(path: Path, policy: InputPolicy, report: ReadReport) -> Iterator[tuple[str, str]]:
    """(doc_id, text) for each decodable document of one file."""
    with _open_binary(path) as f:
        if not _is_jsonl(path):
            text = _decode(f.read(), policy, report)
            if text is not None:
                yield str(path), text
            return
        for line_number, raw_line in enumerate(f, start=1):
            line = _decode(raw_line, policy, report)
            if line is None or not line.strip():
                continue
            try:
                text = json.loads(line)[policy.text_field]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                report.counts["malformed_jsonl_records"] += 1
                continue
            yield f"{path}:{line_number}", text


def read_documents(path: Path, policy: InputPolicy, report: ReadReport) -> Iterator[Document]:
    """The non-empty, decodable documents of one file; everything else is counted in `report`."""
    try:
        for doc_id, text in _texts(path, policy, report):
            if not text.strip():
                report.counts["empty_documents"] += 1
                continue
            yield Document(text=text, source=str(path), doc_id=doc_id)
    except (OSError, EOFError, zstandard.ZstdError) as error:
        if policy.unreadable == "error":
            raise UnreadableInput(
                f"cannot read input {path}: {error}; fix or remove it, or pass --on-unreadable skip"
            ) from error
        report.counts["unreadable_files"] += 1
        report.unreadable_files.append(f"{path}: {error}")
