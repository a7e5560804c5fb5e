"""Jobs on a real Slurm cluster: `bash slurm/localcluster.sh up && source /tmp/mds-slurm/env.sh` first.

The job mechanics (2-task gloo world, signal -> checkpoint -> requeue -> resume, dependency chains, srun's
pmix with mpi4py) run against a small stand-in trainer that keeps the `mds train` contract; the tests
marked `train` run the real `mds train --preset tiny`.
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

# A stand-in for `mds train` that keeps its contract: joins the world through parallel.launcher, resumes
# from RUN_DIR/checkpoints/latest, appends one metrics line per step, and on SIGUSR1/SIGTERM finishes the
# step, saves and exits 75. Its "loss" depends on every rank (all_reduce) and on the whole history.
STAND_IN = r"""
import argparse, json, os, signal, sys, time
import torch, torch.distributed as dist
from parallel.launcher import init_distributed

parser = argparse.ArgumentParser()
parser.add_argument("--run-dir", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
options = dict(o.split("=", 1) for o in args.overrides)
steps, step_seconds = int(options.get("train.steps", 6)), float(options.get("stand_in.step_seconds", 0.1))
info = init_distributed(timeout_minutes=2)
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda number, frame: stop.append(number))
latest = os.path.join(args.run_dir, "checkpoints", "latest")
state = json.load(open(latest)) if os.path.exists(latest) else {"step": 0, "x": 1.0}

def save():
    if info.rank == 0:
        os.makedirs(os.path.dirname(latest), exist_ok=True)
        json.dump(state, open(latest + ".tmp", "w"))
        os.replace(latest + ".tmp", latest)

while state["step"] < steps:
    time.sleep(step_seconds)
    grad = torch.tensor([state["x"] * (info.rank + 1)])
    dist.all_reduce(grad)
    state["x"] -= 0.05 * grad.item()
    state["step"] += 1
    if info.rank == 0:
        with open(os.path.join(args.run_dir, "metrics.jsonl"), "a") as f:
            restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
            f.write(json.dumps({"step": state["step"], "loss": state["x"] ** 2, "world_size": info.world_size,
                                "tokens_per_s": 1000.0 * info.world_size ** 0.9, "mfu": 0.4, "tflops": 100.0,
                                "peak_mem_gib": 1.5, "restart": restart}) + "\n")
    stopping = torch.tensor([float(bool(stop))])
    dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
    if stopping.item():
        save()
        sys.exit(75)
save()
if info.rank == 0:
    json.dump({"status": "completed", "steps": state["step"], "tokens": 1024 * state["step"],
               "tp": 1, "pp": 1, "ep": 1, "dp": info.world_size, "world_size": info.world_size},
              open(os.path.join(args.run_dir, "summary.json"), "w"))
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stand_in") / "train.py"
    path.write_text(STAND_IN)
    return path


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


def stand_in_job(run_dir: Path, stand_in: Path, overrides: list[str], **spec) -> Path:
    spec = JobSpec(
        runs=[Run(str(run_dir), overrides)],
        log_dir=str(run_dir),
        command=[sys.executable, str(stand_in)],
        gpus_per_node=0,
        tasks_per_node=2,
        time="5",
        env={"PYTHONPATH": str(REPO)},
        **spec,
    )
    run_dir.mkdir(parents=True)
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec))
    return script


def test_two_task_job_runs_to_completion(tmp_path, stand_in):
    run_dir = tmp_path / "run"
    job = sbatch(stand_in_job(run_dir, stand_in, ["train.steps=4"]))
    fields = wait_for_job(job)
    assert fields["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    assert {m["world_size"] for m in metrics(run_dir)} == {2}
    assert (run_dir / "COMPLETED").exists()


def test_signalled_job_checkpoints_requeues_and_resumes_without_lost_steps(tmp_path, stand_in):
    overrides = ["train.steps=12", "stand_in.step_seconds=0.5"]
    reference = sbatch(stand_in_job(tmp_path / "reference", stand_in, overrides))
    preempted_dir = tmp_path / "preempted"
    preempted = sbatch(stand_in_job(preempted_dir, stand_in, overrides, grace_seconds=30))
    wait_for_file(preempted_dir / "metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True)
    fields = wait_for_job(preempted)
    log = (preempted_dir / f"slurm-{preempted}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log
    assert "requeueing" in log and "completed" in log
    assert wait_for_job(reference)["JobState"] == "COMPLETED"
    resumed, uninterrupted = metrics(preempted_dir), metrics(tmp_path / "reference")
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert {m["restart"] for m in resumed} == {0, 1}
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]


def test_requeues_stop_at_the_maximum(tmp_path, stand_in):
    run_dir = tmp_path / "run"
    job = sbatch(
        stand_in_job(run_dir, stand_in, ["train.steps=40", "stand_in.step_seconds=0.5"], max_requeues=0)
    )
    wait_for_file(run_dir / "metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    fields = wait_for_job(job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"].startswith("75"), fields
    assert "not requeued" in (run_dir / "jobs.log").read_text()


def test_dependency_chain_continues_a_run_and_stops_once_it_completed(tmp_path, stand_in):
    run_dir = tmp_path / "run"
    script = stand_in_job(run_dir, stand_in, ["train.steps=30", "stand_in.step_seconds=0.3"], mode="chain")
    first, second, third = submit_chain(script, 3, run_dir / "submissions.log")
    wait_for_file(run_dir / "metrics.jsonl")
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)
    assert wait_for_job(first)["JobState"] == "FAILED"  # exit 75: saved, not requeued
    assert wait_for_job(second)["JobState"] == "COMPLETED"
    assert wait_for_job(third)["JobState"] == "COMPLETED"
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 31))
    assert "nothing to do" in (run_dir / "jobs.log").read_text()


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed")
def test_mpi_job_discovers_ranks_through_mpi4py(tmp_path, stand_in):
    pytest.importorskip("mpi4py")
    run_dir = tmp_path / "run"
    job = sbatch(stand_in_job(run_dir, stand_in, ["train.steps=2"], mpi=True))
    fields = wait_for_job(job)
    assert fields["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()
    assert {m["world_size"] for m in metrics(run_dir)} == {2}


def test_sweep_of_one_and_two_tasks_and_its_report(tmp_path, stand_in):
    spec = {
        "name": "scaling",
        "preset": "tiny",
        "gpus_per_node": 0,
        "ranks_per_node": 2,
        "time": "5",
        "command": [sys.executable, str(stand_in)],
        "env": {"PYTHONPATH": str(REPO)},
        "overrides": ["train.steps=3"],
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
        assert wait_for_job(job)["JobState"] == "COMPLETED"
    runs_dir = tmp_path / "runs" / "scaling"
    done = subprocess.run([*mds, "report", str(runs_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with (runs_dir / "report" / "runs.csv").open() as f:
        rows = {row["gpus"]: row for row in csv.DictReader(f)}
    assert rows["1"]["status"] == rows["2"]["status"] == "completed"
    assert rows["3"]["status"] == "failed" and "cannot be spread evenly" in rows["3"]["reason"]
    assert float(rows["2"]["tokens_per_s"]) > float(rows["1"]["tokens_per_s"])
    assert 0.9 < float(rows["2"]["strong_efficiency"]) < 1.0
    markdown = (runs_dir / "report" / "runs.md").read_text()
    assert "## Failed runs" in markdown and "000-gpus1" in markdown and "001-gpus2" in markdown
    for name in ("throughput.png", "scaling.png", "memory.png"):
        data = (runs_dir / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def _train_available() -> bool:
    from megatron_ds.cli import COMMAND_MODULES

    return "megatron_ds.commands.train" in COMMAND_MODULES


TINY = [
    "train.steps=4",
    "train.global_batch_size=8",
    "train.batch_rampup_start=8",
    "train.micro_batch_size=4",
]


def submit_tiny(run_dir: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "megatron_ds.cli", "submit", "--preset", "tiny", "--gpus-per-node", "0"]
    cmd += [
        "--tasks-per-node",
        "2",
        "--time",
        "20",
        "--grace",
        "30",
        "--run-dir",
        str(run_dir),
        *TINY,
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1].rstrip(";")


@pytest.mark.skipif(not _train_available(), reason="`mds train` is not registered in megatron_ds.cli")
def test_tiny_preset_as_a_two_task_job(tmp_path):
    run_dir = tmp_path / "tiny"
    job = submit_tiny(run_dir)
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
        assert all(isinstance(m[key], int | float) for m in records), key
    assert [m["tokens"] for m in records] == [step * 8 * 256 for step in (1, 2, 3, 4)]  # batch x seq_len
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (run_dir / "config.yaml").exists() and (run_dir / "job.sbatch").exists()


@pytest.mark.skipif(not _train_available(), reason="`mds train` is not registered in megatron_ds.cli")
def test_tiny_preset_preempted_resumes_with_the_uninterrupted_loss_curve(tmp_path):
    reference = submit_tiny(tmp_path / "reference")
    preempted = submit_tiny(tmp_path / "preempted")
    wait_for_file(tmp_path / "preempted" / "metrics.jsonl", timeout=600)
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], check=True)
    fields = wait_for_job(preempted, timeout=600)
    log = (tmp_path / "preempted" / f"slurm-{preempted}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    assert wait_for_job(reference, timeout=600)["JobState"] == "COMPLETED"
    resumed, uninterrupted = metrics(tmp_path / "preempted"), metrics(tmp_path / "reference")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]
