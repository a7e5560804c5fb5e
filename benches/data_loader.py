"""Loader throughput: tokens/s of packed micro-batches with FIM on, per process (workers=0: the loop
runs in the measuring process) and with one worker process.

Corpus: the default stdlib dataset (built in ~/.cache/megatron-ds/data on first use).
Run: /tmp/venv/bin/python benches/data_loader.py
"""

import time

from data_pipeline import DataConfig, build_loader

SEQ_LEN, MICRO_BATCH, BATCHES = 4096, 4, 200


def measure(workers: int, fim_rate: float) -> float:
    cfg = DataConfig(fim_rate=fim_rate, document_masking=True)
    loader = build_loader(
        cfg, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, dp_rank=0, dp_size=1, seed=0, num_workers=workers
    )
    it = iter(loader)
    for _ in range(20):  # warm up: worker start, first windows of every stream
        next(it)
    start = time.perf_counter()
    tokens = sum(next(it)["tokens"].numel() for _ in range(BATCHES))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    print(
        f"seq_len {SEQ_LEN}, micro-batch {MICRO_BATCH}, document masking on, {BATCHES} batches after warm-up"
    )
    print("| workers | FIM rate | tokens/s  |")
    print("|---------|----------|-----------|")
    for workers, fim in ((0, 0.1), (1, 0.1), (0, 0.0)):
        print(f"| {workers:>7} | {fim:>8} | {measure(workers, fim):>9,.0f} |")


if __name__ == "__main__":
    main()
