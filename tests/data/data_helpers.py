"""Helpers shared by the data pipeline tests."""

import sysconfig
from pathlib import Path

from data_pipeline import DataConfig, build_loader

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def small_stdlib_files(count: int = 16) -> list[str]:
    return [str(p) for p in sorted(STDLIB.glob("*.py")) if p.stat().st_size < 3000][:count]


def take(cfg: DataConfig, n: int, *, state=None, dp_rank=0, dp_size=1, workers=0, seq_len=64, mbs=2, seed=7):
    """The first `n` batches a loader yields (after loading `state`), and the loader."""
    loader = build_loader(
        cfg,
        seq_len=seq_len,
        micro_batch_size=mbs,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        num_workers=workers,
    )
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    return [next(it) for _ in range(n)], loader
