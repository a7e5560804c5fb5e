"""Jobs on a real Slurm cluster running the real `mds train`: `bash slurm/localcluster.sh up &&
source /tmp/mds-slurm/env.sh` first (`make test` does both).

Covered: a 2-task gloo job, signal -> checkpoint -> requeue -> resume with the uninterrupted loss curve,
the requeue limit, dependency chains, srun's pmix with mpi4py, and a sweep with its report.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ds.jobs.sbatch import JobSpec, Run, render_sbatch
from megatron_ds.jobs.submit import sbatch, submit_chain

REPO = Path(__file__).resolve().parents[2]
# Small and quick: 8 sequences of 64 tokens per step.
FAST = [
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.batch_rampup_start=8",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _cluster_problem() -> str:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm client tools not installed (bash slurm/localcluster.sh up)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF unset: bash slurm/localcluster.sh up && source /tmp/mds-slurm/env.sh"
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return f"no Slurm cluster answers: {out.stderr.strip()}"
    return ""


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_cluster_problem()), reason=_cluster_problem())]


def job_fields(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True
    )
    first = out.stdout.splitlines()[0]
    return dict(item.split("=", 1) for item in first.split() if "=" in item)


def wait_for_job(job_id: str, timeout: float = 180) -> dict[str, str]:
    """Poll until the job (every element of an array) ends; `sbatch --wait` is unreliable here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
        states = [dict(i.split("=", 1) for i in line.split() if "=" in i) for line in out.stdout.splitlines()]
        if states and all(s.get("JobState") in TERMINAL for s in states):
            return states[0]
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} did not finish within {timeout} s: {out.stdout}")


def wait_for_file(path: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.5)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def real_job(run_dir: Path, dataset: Path, overrides: list[str], **spec) -> Path:
    """An sbatch script for `mds train --preset tiny` on 2 CPU tasks, with FAST settings."""
    spec = JobSpec(
        runs=[Run(str(run_dir), [*FAST, f"data.paths=[{dataset}]", *overrides])],
        log_dir=str(run_dir),
        python=sys.executable,
        gpus_per_node=0,
        tasks_per_node=2,
        time="10",
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        **spec,
    )
    run_dir.mkdir(parents=True)
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec))
    return script


def test_tiny_preset_as_a_two_task_job(tmp_path, train_dataset):
    run_dir = tmp_path / "tiny"
    job = submit_tiny(run_dir, train_dataset)
    fields = wait_for_job(job, timeout=600)
    assert fields["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-3000:]
    records = metrics(run_dir)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    for key in (
        "tokens",
        "loss",
        "lm_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "tflops",
        "mfu",
        "peak_mem_gib",
    ):
        assert all(isinstance(m[key], int | float) and m[key] >= 0 for m in records), key
    assert [m["tokens"] for m in records] == [step * 8 * 64 for step in (1, 2, 3, 4)]  # batch x seq_len
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["layout"]["dp"] == 2
    assert (run_dir / "config.yaml").exists() and (run_dir / "job.sbatch").exists()


def test_tiny_preset_preempted_resumes_with_the_uninterrupted_loss_curve(tmp_path, train_dataset):
    reference = submit_tiny(tmp_path / "reference", train_dataset)
    preempted = submit_tiny(tmp_path / "preempted", train_dataset)
    wait_for_file(tmp_path / "preempted" / "metrics.jsonl", timeout=600)
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True)
    fields = wait_for_job(preempted, timeout=600)
    log = (tmp_path / "preempted" / f"slurm-{preempted}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    assert wait_for_job(reference, timeout=600)["JobState"] == "COMPLETED"
    resumed, uninterrupted = metrics(tmp_path / "preempted"), metrics(tmp_path / "reference")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]


def test_requeues_stop_at_the_maximum(tmp_path, train_dataset):
    run_dir = tmp_path / "run"
    job = sbatch(real_job(run_dir, train_dataset, ["train.steps=500"], max_requeues=0))
    wait_for_file(run_dir / "metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    fields = wait_for_job(job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"].startswith("75"), fields
    assert "not requeued" in (run_dir / "jobs.log").read_text()
    assert (run_dir / "checkpoints" / "latest").exists()


def test_dependency_chain_continues_a_run_and_stops_once_it_completed(tmp_path, train_dataset):
    run_dir = tmp_path / "run"
    script = real_job(run_dir, train_dataset, ["train.steps=12"], mode="chain")
    first, second, third = submit_chain(script, 3, run_dir / "submissions.log")
    wait_for_file(run_dir / "metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
    assert wait_for_job(first)["JobState"] == "FAILED"  # exit 75: saved, not requeued
    assert wait_for_job(second)["JobState"] == "COMPLETED"
    assert wait_for_job(third)["JobState"] == "COMPLETED"
    steps = [m["step"] for m in metrics(run_dir)]
    assert sorted(set(steps)) == list(range(1, 13)) and steps[-1] == 12
    assert "nothing to do" in (run_dir / "jobs.log").read_text()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed")
def test_mpi_job_discovers_ranks_through_mpi4py(tmp_path, train_dataset):
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "run"
    job = sbatch(real_job(run_dir, train_dataset, ["train.steps=2"], mpi=True))
    fields = wait_for_job(job)
    assert fields["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2


def test_sweep_of_one_and_two_tasks_and_its_report(tmp_path, train_dataset):
    spec = {
        "name": "scaling",
        "preset": "tiny",
        "gpus_per_node": 0,
        "ranks_per_node": 2,
        "time": "10",
        "python": sys.executable,
        "env": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        "overrides": [*FAST, f"data.paths=[{train_dataset}]", "train.steps=3"],
        "grid": {"gpus": [1, 2, 3]},  # 3 ranks cannot spread evenly over 2 nodes of 2: a refused run
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    mds = [sys.executable, "-m", "megatron_ds.cli"]
    done = subprocess.run([*mds, "sweep", str(tmp_path / "sweep.yaml"), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    job_ids = [
        line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("submitted")
    ]
    assert len(job_ids) == 2  # one array per resource shape: 1 node x 1 rank, 1 node x 2 ranks
    for job in job_ids:
        assert wait_for_job(job, timeout=600)["JobState"] == "COMPLETED"
    runs_dir = tmp_path / "runs" / "scaling"
    done = subprocess.run([*mds, "report", str(runs_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with (runs_dir / "report" / "runs.csv").open() as f:
        rows = {row["gpus"]: row for row in csv.DictReader(f)}
    assert rows["1"]["status"] == rows["2"]["status"] == "completed"
    assert rows["3"]["status"] == "failed" and "cannot be spread evenly" in rows["3"]["reason"]
    for gpus in ("1", "2"):
        assert float(rows[gpus]["tokens_per_s"]) > 0 and float(rows[gpus]["mfu"]) > 0
    assert float(rows["2"]["strong_efficiency"]) > 0
    markdown = (runs_dir / "report" / "runs.md").read_text()
    assert "## Failed runs" in markdown and "000-gpus1" in markdown and "001-gpus2" in markdown
    for name in ("throughput.png", "scaling.png", "memory.png"):
        data = (runs_dir / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def submit_tiny(run_dir: Path, dataset: Path, *extra: str) -> str:
    """`mds submit` of the tiny preset as 2 CPU tasks, as a user would."""
    cmd = [sys.executable, "-m", "megatron_ds.cli", "submit", "--preset", "tiny", "--gpus-per-node", "0",
           "--tasks-per-node", "2", "--time", "20", "--grace", "30", "--run-dir", str(run_dir),
           *FAST, f"data.paths=[{dataset}]", "train.steps=4", *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1].rstrip(";")
