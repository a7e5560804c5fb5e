"""Rendering of sbatch scripts, no cluster needed: hostile values stay inert, resources come out right.

The rendered script is executed by bash with stand-ins for srun and scontrol on PATH, so the test sees
exactly the argument vector the training processes would receive.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ds.jobs.sbatch import JobSpec, JobSpecError, Run, render_sbatch

HOSTILE = [
    "data.cache_dir=$(touch {canary})",
    "data.cache_dir=`touch {canary}`",
    "data.cache_dir=x; touch {canary}",
    "data.cache_dir=x\ntouch {canary}",
    'data.cache_dir=it\'s "quoted" ${{HOME}} $HOME \\ && touch {canary} | cat',
    "data.cache_dir=x' ; touch {canary} ; echo '",
]

FAKE_SRUN = """#!{python}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, open(os.environ["ARGV_FILE"], "w"))
"""


def run_rendered(tmp_path: Path, script: str) -> dict:
    """Run script as the batch step of job 4242 would, with srun recording what it was asked to start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node001\necho node002\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "node[001-002]",
        "ARGV_FILE": str(tmp_path / "argv.json"),
    }
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "argv.json").read_text())


def test_hostile_override_values_reach_the_trainer_verbatim(tmp_path):
    canary = tmp_path / "pwned"
    overrides = [value.format(canary=canary) for value in HOSTILE]
    run_dir = tmp_path / "run"
    spec = JobSpec(
        runs=[Run(str(run_dir), overrides)], log_dir=str(run_dir), gpus_per_node=0, tasks_per_node=2
    )
    recorded = run_rendered(tmp_path, render_sbatch(spec))
    assert not canary.exists()
    argv = recorded["argv"]
    assert argv[argv.index("--run-dir") + 1] == str(run_dir)
    assert argv[argv.index("--run-dir") + 2 :] == overrides
    assert (run_dir / "COMPLETED").exists()


def test_hostile_container_python_and_env_values_are_inert(tmp_path):
    canary = tmp_path / "pwned"
    spec = JobSpec(
        runs=[Run(str(tmp_path / "run"), [])],
        log_dir=str(tmp_path),
        container_image=f"img$(touch {canary})",
        container_mounts=[f"/data:/data;touch {canary}"],
        python=f"python`touch {canary}`",
        env={"MY_VAR": f"$(touch {canary})\n"},
    )
    recorded = run_rendered(tmp_path, render_sbatch(spec))
    assert not canary.exists()
    assert f"--container-image=img$(touch {canary})" in recorded["argv"]
    assert recorded["argv"][recorded["argv"].index("-m") - 1] == f"python`touch {canary}`"
    assert recorded["env"]["MY_VAR"] == f"$(touch {canary})\n"


def test_rendezvous_and_gpu_settings_come_from_the_allocation(tmp_path):
    spec = JobSpec(runs=[Run(str(tmp_path / "run"), [])], log_dir=str(tmp_path), nodes=2, gpus_per_node=8)
    env = run_rendered(tmp_path, render_sbatch(spec))["env"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node001", str(12000 + 4242))
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NCCL_IB_TIMEOUT"] == "22"


@pytest.mark.parametrize(
    "field, value",
    [
        ("partition", "gpu\n#SBATCH --uid=0"),
        ("account", "acct;rm -rf /"),
        ("qos", "$(id)"),
        ("time", "1:00:00 --exclusive"),
        ("job_name", "name with space"),
    ],
)
def test_values_that_cannot_be_sbatch_words_are_refused(tmp_path, field, value):
    spec = JobSpec(runs=[Run(str(tmp_path), [])], log_dir=str(tmp_path), **{field: value})
    with pytest.raises(JobSpecError, match=field.replace("_", " ") if field == "job_name" else field):
        render_sbatch(spec)


@pytest.mark.parametrize("run_dir", ["relative/dir", "/tmp/a b", "/tmp/x\n#SBATCH --uid=0", "/tmp/%j"])
def test_run_directories_unsafe_in_sbatch_lines_are_refused(run_dir):
    with pytest.raises(JobSpecError, match="run directory"):
        render_sbatch(JobSpec(runs=[Run(run_dir, [])], log_dir="/tmp"))


def test_malformed_override_and_env_name_are_refused(tmp_path):
    with pytest.raises(JobSpecError, match="dotted.key=value"):
        render_sbatch(JobSpec(runs=[Run(str(tmp_path), ["--evil"])], log_dir=str(tmp_path)))
    with pytest.raises(JobSpecError, match="not a valid shell name"):
        render_sbatch(JobSpec(runs=[Run(str(tmp_path), [])], log_dir=str(tmp_path), env={"A;B": "1"}))


def test_resources_and_signal_lines(tmp_path):
    spec = JobSpec(
        runs=[Run(str(tmp_path), [])],
        log_dir=str(tmp_path),
        nodes=4,
        gpus_per_node=8,
        time="2-00:00:00",
        partition="batch",
        account="llm",
        qos="high",
        grace_seconds=300,
    )
    lines = [line for line in render_sbatch(spec).splitlines() if line.startswith("#SBATCH")]
    for expected in [
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--time=2-00:00:00",
        "--partition=batch",
        "--account=llm",
        "--qos=high",
        "--signal=B:USR1@300",
        "--requeue",
    ]:
        assert f"#SBATCH {expected}" in lines


def test_mds_submit_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ds.cli", "submit", "--preset", "tiny", "--nodes", "2"]
    cmd += ["--gpus-per-node", "2", "--run-dir", str(run_dir), "--dry-run", "train.steps=6"]
    cmd += ["train.global_batch_size=16", "train.batch_rampup_start=16"]  # 4 ranks x micro-batch 4
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and "train.steps=6" in done.stdout
    assert "parallel.gpus_per_node=2" in done.stdout
    assert not run_dir.exists()


def test_mds_submit_refuses_an_invalid_layout_before_queueing(tmp_path):
    cmd = [sys.executable, "-m", "megatron_ds.cli", "submit", "--preset", "tiny", "--gpus-per-node", "3"]
    cmd += ["--run-dir", str(tmp_path / "run"), "--dry-run", "parallel.tensor=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid configuration for 3 ranks" in done.stderr
