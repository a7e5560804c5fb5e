"""The default dataset: the Python standard library's own sources, tokenized on first use.

Every machine with Python has this corpus, so the `tiny` preset trains out of the box. The first
caller builds it in a temporary directory and renames it into place; a file lock makes concurrent
callers (e.g. all ranks of a job) wait for that build and then reuse it.
"""

import fcntl
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from data_pipeline.preprocess import PreprocessConfig, preprocess
from data_pipeline.shards import MANIFEST
from data_pipeline.tokenizer import load_tokenizer

STDLIB_SHARD_BYTES = 256 << 10  # ~64 shards, enough for 16 virtual streams with room to spare


def stdlib_preprocess_config(output: Path, processes: int = 1) -> PreprocessConfig:
    """How the default dataset is made (also used by tests and benchmarks on the same corpus)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return PreprocessConfig(
        inputs=[stdlib],
        output=str(output),
        pattern="**/*.py",
        exclude=("site-packages/*", "dist-packages/*"),
        shard_bytes=STDLIB_SHARD_BYTES,
        processes=processes,
        command=["ensure_default_dataset", stdlib],
    )


def ensure_default_dataset(cache_dir: str | Path) -> Path:
    """The tokenized stdlib dataset in `cache_dir`, built if absent; safe to call concurrently."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    target = cache_dir / f"stdlib-{version}-{load_tokenizer(None).sha256[:12]}"
    if (target / MANIFEST).is_file():
        return target
    with open(cache_dir / ".stdlib.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MANIFEST).is_file():
            building = cache_dir / f".{target.name}.building"
            shutil.rmtree(building, ignore_errors=True)
            preprocess(stdlib_preprocess_config(building, processes=os.cpu_count() or 1))
            os.replace(building, target)
    return target
