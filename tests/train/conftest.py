"""Helpers for end-to-end `mds train` runs (the dataset fixture is in tests/conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

# Small and deterministic: fp32, deterministic kernels, 8 sequences of 64 tokens per step.
FAST = [
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.batch_rampup_start=8",
    "train.deterministic=true",
    "precision.params_dtype=fp32",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "checkpoint.save_interval_steps=0",
]


def mds_train(run_dir: Path, dataset: Path, *overrides: str, nproc: int = 2, popen: bool = False):
    """Run `mds train` on `nproc` local processes; returns CompletedProcess (or Popen if popen)."""
    cmd = [sys.executable, "-m", "megatron_ds.cli", "train", "--run-dir", str(run_dir), "--nproc", str(nproc),
           *FAST, f"data.paths=[{dataset}]", *overrides]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def loss_curve(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a resumed run appends to the same file, later records win."""
    return {r["step"]: r["loss"] for r in metrics(run_dir)}
