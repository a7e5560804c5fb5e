"""`mds preprocess` end to end on the Python standard library, and every bad-input case."""

import argparse
import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zstandard
from data_helpers import STDLIB

from data_pipeline import ensure_default_dataset, load_tokenizer
from data_pipeline.cli import register
from data_pipeline.inputs import InputPolicy, UnreadableInput
from data_pipeline.preprocess import PreprocessConfig, preprocess
from data_pipeline.shards import Manifest, iter_shard_metadata
from data_pipeline.tokenizer import file_sha256


def shard_contents(directory: Path, name: str) -> tuple[int, int]:
    """(samples, tokens) actually stored in a shard."""
    metas = list(iter_shard_metadata(directory / name))
    with tarfile.open(directory / name) as tar:
        tokens = sum(m.size // 2 for m in tar.getmembers() if m.name.endswith(".u16"))
    assert tokens == sum(m["length"] for m in metas)
    return len(metas), tokens


def test_default_dataset_is_the_whole_stdlib_built_once_under_concurrency(tmp_path):
    code = "import sys, data_pipeline as dp; print(dp.ensure_default_dataset(sys.argv[1]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    paths = {p.communicate(timeout=300)[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    directory = Path(paths.pop())
    assert ensure_default_dataset(tmp_path) == directory  # reused, not rebuilt
    manifest = Manifest.read(directory)

    sources = [p for p in STDLIB.rglob("*.py") if "site-packages" not in p.relative_to(STDLIB).parts]
    empty = sum(1 for p in sources if not p.read_bytes().strip())
    assert manifest.documents == len(sources) - empty
    assert manifest.skipped["empty_documents"] == empty
    assert (
        manifest.tokenizer_sha256 == load_tokenizer(None).sha256 == file_sha256(directory / "tokenizer.json")
    )
    assert len(manifest.shards) >= 16
    for shard in manifest.shards:
        assert file_sha256(directory / shard.name) == shard.sha256
        assert (directory / shard.name).stat().st_size == shard.bytes
        assert shard_contents(directory, shard.name) == (shard.samples, shard.tokens)
    assert manifest.tokens == sum(s.tokens for s in manifest.shards)
    assert not list(directory.glob(".*tmp*")) and not list(tmp_path.glob("*.building"))


def test_shards_are_webdataset_samples_that_decode_to_the_source(subset_dataset):
    tok = load_tokenizer(None)
    first = Manifest.read(subset_dataset).shards[0].name
    sample = next(iter(wds.WebDataset(str(subset_dataset / first), shardshuffle=False)))
    meta = json.loads(sample["json"])
    ids = np.frombuffer(sample["u16"], dtype="<u2")
    assert len(ids) == meta["length"]
    assert tok.decode(ids.tolist()) == Path(meta["source"]).read_text()


def test_output_is_deterministic_whatever_the_process_count(subset_dataset, tmp_path):
    again = tmp_path / "again"
    preprocess(
        PreprocessConfig(inputs=[str(STDLIB)], output=str(again), pattern="[a-c]*.py", shard_bytes=32 << 10)
    )
    assert Manifest.read(again).shards == Manifest.read(subset_dataset).shards


def test_rerun_redoes_only_incomplete_units(subset_dataset, copy_dataset):
    directory = copy_dataset(subset_dataset)
    config = PreprocessConfig(
        inputs=[str(STDLIB)], output=str(directory), pattern="[a-c]*.py", shard_bytes=32 << 10
    )
    before = Manifest.read(directory)
    (directory / before.shards[3].name).unlink()  # as if the run died before this shard was renamed
    (directory / f".{before.shards[3].name}.tmp-999").write_bytes(b"half a shard")
    result = preprocess(config)
    assert result.reused_units == result.units - 1
    assert result.manifest.shards == before.shards


def make_bad_inputs(root: Path) -> Path:
    root.mkdir()
    (root / "good.txt").write_text("def f():\n    return 1\n")
    (root / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n")
    lines = [
        json.dumps({"body": "first record"}),
        "{not json",
        json.dumps({"other": "no body field"}),
        json.dumps({"body": ""}),
        json.dumps({"body": "second record"}),
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(b'{"body": "gzipped record"}\n'))
    (root / "docs.jsonl.zst").write_bytes(zstandard.compress(b'{"body": "zstd record"}\n'))
    (root / "text.txt.zst").write_bytes(zstandard.compress(b"zstd text file"))
    (root / "broken.txt.gz").write_bytes(b"this is not gzip")
    return root


def run(root: Path, output: Path, **policy) -> Manifest:
    policy = InputPolicy(text_field="body", **policy)
    return preprocess(PreprocessConfig(inputs=[str(root)], output=str(output), policy=policy)).manifest


def test_bad_inputs_are_counted_by_reason(tmp_path):
    root = make_bad_inputs(tmp_path / "in")
    manifest = run(root, tmp_path / "replace")
    assert manifest.documents == 7  # good, bad_utf8, two JSONL records, gz JSONL, zst JSONL, zst text
    assert manifest.skipped == {
        "empty_documents": 3,
        "invalid_utf8_replaced": 1,
        "malformed_jsonl_records": 2,
        "unreadable_files": 1,
    }
    assert len(manifest.unreadable_files) == 1 and "broken.txt.gz" in manifest.unreadable_files[0]
    skipped = run(root, tmp_path / "skip", invalid_utf8="skip")
    assert skipped.documents == 6 and skipped.skipped["invalid_utf8_skipped"] == 1


def test_unreadable_input_can_stop_the_run(tmp_path):
    root = make_bad_inputs(tmp_path / "in")
    with pytest.raises(UnreadableInput, match="broken.txt.gz.*--on-unreadable skip"):
        run(root, tmp_path / "out", unreadable="error")


def test_cli_prints_a_summary(tmp_path, capsys):
    root = make_bad_inputs(tmp_path / "in")
    parser = argparse.ArgumentParser(prog="mds")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["preprocess", str(root), "--output", str(tmp_path / "out"), "--text-field", "body"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "documents 7" in out and "skipped 3 empty documents" in out and "unreadable: " in out
