"""`mds preprocess --mpi` over two MPI ranks gives the same shards as one process."""

import shutil
import subprocess
import sys

import pytest
from data_helpers import STDLIB

from data_pipeline.shards import Manifest

pytest.importorskip("mpi4py")
MPIRUN = shutil.which("mpirun")

CLI = (
    "import argparse, sys; from data_pipeline.cli import register; p = argparse.ArgumentParser(); "
    "register(p.add_subparsers(dest='command', required=True)); a = p.parse_args(); sys.exit(a.func(a))"
)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not installed")
def test_preprocess_over_two_mpi_ranks_matches_one_process(subset_dataset, tmp_path):
    out = tmp_path / "mpi"
    command = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-c", CLI]
    command += ["preprocess", str(STDLIB), "--pattern", "[a-c]*.py", "--shard-size-mb", "0.03125"]
    command += ["--output", str(out), "--mpi"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "MPI ranks 2" in result.stdout  # a mismatched launcher would start two 1-rank worlds
    assert Manifest.read(out).shards == Manifest.read(subset_dataset).shards
