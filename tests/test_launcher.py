"""Launcher detection: pure unit tests on environments, and real 2-process gloo worlds started the way
torchrun and srun start them (environment variables set by the test)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from parallel.launcher import LaunchError, LaunchInfo, detect_launch, first_host, rendezvous_port

SLURM_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "3",
    "SLURM_JOB_NODELIST": "gpu007",
}


def test_no_launcher_is_a_single_process():
    info = detect_launch({})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (0, 1, 0, "single")
    assert info.master_addr == "127.0.0.1" and 0 < info.master_port < 65536
    assert not info.external


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert detect_launch(env) == LaunchInfo(5, 8, 1, "node0", 29500, "torchrun")


def test_torchrun_wins_over_the_slurm_step_it_runs_in():
    env = SLURM_STEP | {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1234"}
    assert detect_launch(env).launcher == "torchrun"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 is outside"),
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "0", "WORLD_SIZE": "4"}, "needs MASTER_ADDR and MASTER_PORT"),
        ({"RANK": "zero", "WORLD_SIZE": "1"}, "RANK='zero' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "at least 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "99999"}, "not a TCP port"),
        ({"MDS_LAUNCHER": "pbs"}, "not one of"),
    ],
)
def test_inconsistent_torchrun_environments_fail_clearly(env, message):
    with pytest.raises(LaunchError, match=message):
        detect_launch(env)


def test_slurm_step_variables():
    info = detect_launch(SLURM_STEP)
    assert info == LaunchInfo(3, 8, 3, "gpu007", rendezvous_port(4242), "slurm")


def test_slurm_step_task_count_wins_over_the_job_task_count():
    step = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    info = detect_launch(SLURM_STEP | step)
    assert info.world_size == 2


def test_slurm_uses_the_rendezvous_exported_by_the_job_script():
    info = detect_launch(SLURM_STEP | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 23456)


def test_batch_step_of_a_multi_task_job_is_refused():
    batch = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"}
    with pytest.raises(LaunchError, match="asked for 8 tasks.*start it with `srun`"):
        detect_launch(batch)


def test_batch_step_of_a_one_task_job_is_a_world_of_one():
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}
    assert detect_launch(batch).world_size == 1


def test_slurm_rank_outside_the_step_fails():
    with pytest.raises(LaunchError, match="rank 8 is outside the world of 8"):
        detect_launch(SLURM_STEP | {"SLURM_PROCID": "8"})


def test_first_host_of_a_node_list(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # the fallback parser, as inside a container
    assert first_host("gpu007") == "gpu007"
    assert first_host("gpu007,gpu009") == "gpu007"
    assert first_host("gpu[003-010,017],login1") == "gpu003"
    assert first_host("rack1-n[12,15]") == "rack1-n12"


def test_rendezvous_ports_are_below_the_ephemeral_range():
    ports = {rendezvous_port(job) for job in range(100_000, 140_000)}
    assert min(ports) >= 1024 and max(ports) < 32768


def test_mpi_launch_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(LaunchError, match="mpi4py cannot be imported"):
        detect_launch({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})


WORKER = """
import json, torch, torch.distributed as dist
from parallel.launcher import init_distributed
info = init_distributed(timeout_minutes=1)
again = init_distributed()
total = torch.tensor([float(info.rank + 1)])
dist.all_reduce(total)
print(json.dumps({"rank": info.rank, "world": info.world_size, "local": info.local_rank,
                  "launcher": info.launcher, "sum": total.item(), "again": again == info,
                  "backend": dist.get_backend()}))
dist.destroy_process_group()
"""


def _free_port_below_ephemeral() -> int:
    for port in range(rendezvous_port(os.getpid()), 32768):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _run_world(envs: list[dict[str, str]]) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MDS_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(key, None)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=base | env, stdout=subprocess.PIPE, text=True)
        for env in envs
    ]
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), outs
    return sorted((json.loads(out.strip().splitlines()[-1]) for out in outs), key=lambda r: r["rank"])


def _check_world(results: list[dict], launcher: str):
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["world"], r["launcher"], r["sum"], r["backend"]) == (2, launcher, 3.0, "gloo")
        assert r["local"] == r["rank"] and r["again"]


def test_two_processes_join_under_torchrun_variables():
    port = str(_free_port_below_ephemeral())
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    envs = [common | {"RANK": str(r), "LOCAL_RANK": str(r)} for r in range(2)]
    _check_world(_run_world(envs), "torchrun")


def test_two_processes_join_under_slurm_variables():
    port = _free_port_below_ephemeral()
    job_id = port - rendezvous_port(0)  # a job id whose derived port is free
    assert rendezvous_port(job_id) == port
    common = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}
    common["SLURM_JOB_NODELIST"] = "localhost"
    envs = [common | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(2)]
    _check_world(_run_world(envs), "slurm")


def test_single_process_without_a_launcher():
    (result,) = _run_world([{}])
    assert (result["world"], result["launcher"], result["sum"]) == (1, "single", 1.0)
