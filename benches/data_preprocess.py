"""Preprocessing throughput: `mds preprocess` tokens/s per process against raw `tokenizers` batch encoding.

Corpus: the first ~4 MB of the Python standard library's top-level modules. Both sides are
single-threaded per process (TOKENIZERS_PARALLELISM=false), so the ratio is per process. The three
measurements are interleaved and repeated; the table shows each one's median time.
Run: python benches/data_preprocess.py [--repeats N]
"""

import argparse
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

from data_pipeline import load_tokenizer  # noqa: E402
from data_pipeline.preprocess import PreprocessConfig, preprocess  # noqa: E402

CORPUS_BYTES = 4 << 20


def corpus() -> list[Path]:
    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        files.append(path)
        size += path.stat().st_size
        if size >= CORPUS_BYTES:
            break
    return files


def raw_encode(files: list[Path]) -> tuple[int, float]:
    tok = load_tokenizer(None)
    texts = [p.read_text(errors="replace") for p in files]
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return tokens, time.perf_counter() - start


def run_preprocess(files: list[Path], processes: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as out:
        config = PreprocessConfig([str(p) for p in files], out, shard_bytes=256 << 10, processes=processes)
        result = preprocess(config)
        return result.manifest.tokens, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = corpus()
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"corpus: {len(files)} stdlib modules, {mb:.1f} MB, median of {args.repeats} interleaved repeats")
    runs = {"raw": [], 1: [], 2: []}
    for _ in range(args.repeats):
        runs["raw"].append(raw_encode(files))
        for processes in (1, 2):
            runs[processes].append(run_preprocess(files, processes))
    tokens = runs["raw"][0][0]
    seconds = statistics.median(s for _, s in runs["raw"])
    raw = tokens / seconds
    rows = [("tokenizers encode_batch (1 thread)", 1, tokens, seconds, raw, 1.0)]
    for processes in (1, 2):
        tokens = runs[processes][0][0]
        seconds = statistics.median(s for _, s in runs[processes])
        rate = tokens / seconds
        rows.append(
            (
                f"mds preprocess --processes {processes}",
                processes,
                tokens,
                seconds,
                rate,
                rate / processes / raw,
            )
        )
    print(f"| {'what':<36} | procs | tokens    | seconds | tokens/s  | per process vs raw |")
    print(f"|{'-' * 38}|-------|-----------|---------|-----------|--------------------|")
    for what, procs, tokens, seconds, rate, ratio in rows:
        print(
            f"| {what:<36} | {procs:>5} | {tokens:>9,} | {seconds:>7.2f} | {rate:>9,.0f} | {ratio:>18.2f} |"
        )
    print(f"scaling 1 -> 2 processes: {rows[2][4] / rows[1][4]:.2f}x")


if __name__ == "__main__":
    main()
