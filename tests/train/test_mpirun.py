"""`mds train` started by Open MPI's mpirun: the ranks come from mpi4py and form one world."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FAST, loss_curve


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no Open MPI (slurm/localcluster.sh up)")
def test_two_rank_mpirun_launch(train_dataset, tmp_path):
    pytest.importorskip("mpi4py")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS=1",
           sys.executable, "-m", "megatron_ds.cli", "train", "--run-dir", str(tmp_path),
           *FAST, f"data.paths=[{train_dataset}]", "train.steps=2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["layout"]["dp"] == 2
    assert sorted(loss_curve(tmp_path)) == [1, 2]
