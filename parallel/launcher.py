"""Find out which launcher started this process and join its torch.distributed world.

Four ways a training process can be started, recognised in this order:

* torchrun (or any launcher that sets its variables): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* mpirun / mpiexec, or `MDS_LAUNCHER=mpi` (e.g. under `srun --mpi=pmix`): ranks come from mpi4py, and rank 0
  broadcasts the rendezvous address and a free port.
* srun: SLURM_PROCID, SLURM_NTASKS (or SLURM_STEP_NUM_TASKS), SLURM_LOCALID; the rendezvous address is the
  first host of the step's node list and the port is derived from SLURM_JOB_ID, unless the job script
  exported MASTER_ADDR / MASTER_PORT (the sbatch scripts of `mds submit` do).
* nothing: one process, world size 1, on a free localhost port.

`MDS_LAUNCHER=torchrun|mpi|slurm|single` skips the guessing. The model and training loop never look at any
of this: they receive a LaunchInfo.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

LAUNCHERS = ("torchrun", "mpi", "slurm", "single")

# Per-job rendezvous ports lie in [PORT_BASE, PORT_BASE + PORT_SPAN): below Linux's ephemeral range
# (32768-60999), so a port picked for one job is not handed to some other connection meanwhile.
# The sbatch template of megatron_ds.jobs exports the same port; see rendezvous_port().
PORT_BASE = 12000
PORT_SPAN = 20000


class LaunchError(RuntimeError):
    """The environment describes no consistent distributed world."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int  # global rank of this process, 0 <= rank < world_size
    world_size: int  # number of processes in the job
    local_rank: int  # rank among the processes on this node; picks the GPU
    master_addr: str  # host of rank 0, where the rendezvous store listens
    master_port: int  # port of the rendezvous store
    launcher: str  # which of LAUNCHERS started the processes

    @property
    def external(self) -> bool:
        """True when a launcher started the processes, so the caller must not spawn its own."""
        return self.launcher != "single"


def rendezvous_port(job_id: int) -> int:
    """A port that every task of a Slurm job derives alike, and that differs between concurrent jobs."""
    return PORT_BASE + job_id % PORT_SPAN


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Describe the world this process belongs to, from the environment (os.environ by default).

    Only the MPI path communicates (through mpi4py); the others read variables and, for a Slurm node list
    with ranges, run `scontrol show hostnames`.
    """
    env = os.environ if env is None else env
    launcher = env.get("MDS_LAUNCHER") or _guess_launcher(env)
    if launcher == "torchrun":
        return _from_torchrun(env)
    if launcher == "mpi":
        return _from_mpi(env)
    if launcher == "slurm":
        return _from_slurm(env)
    if launcher == "single":
        return LaunchInfo(0, 1, 0, "127.0.0.1", free_port(), "single")
    raise LaunchError(f"MDS_LAUNCHER={launcher!r} is not one of {', '.join(LAUNCHERS)}")


def _guess_launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env or ("PMI_SIZE" in env and "SLURM_PROCID" not in env):
        return "mpi"  # Open MPI's mpirun, or MPICH's hydra
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return "slurm"
    return "single"


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _checked(info: LaunchInfo, source: str) -> LaunchInfo:
    if info.world_size < 1:
        raise LaunchError(f"{source}: world size {info.world_size} must be at least 1")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{source}: rank {info.rank} is outside the world of {info.world_size} processes")
    if not 0 <= info.local_rank < info.world_size:
        raise LaunchError(f"{source}: local rank {info.local_rank} is outside the world of {info.world_size}")
    if not 0 < info.master_port < 65536:
        raise LaunchError(f"{source}: port {info.master_port} is not a TCP port")
    return info


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        missing = "WORLD_SIZE" if "RANK" in env else "RANK"
        raise LaunchError(f"torchrun-style launch: RANK and WORLD_SIZE go together, but {missing} is not set")
    world_size = _int(env, "WORLD_SIZE")
    if world_size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise LaunchError(
            f"torchrun-style launch with WORLD_SIZE={world_size} needs MASTER_ADDR and MASTER_PORT "
            "(the address and port of rank 0's rendezvous store)"
        )
    info = LaunchInfo(
        rank=_int(env, "RANK"),
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", 0),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", 0) or free_port(),
        launcher="torchrun",
    )
    return _checked(info, "torchrun-style launch (RANK/WORLD_SIZE)")


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    job_id = _int(env, "SLURM_JOB_ID")
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", 0) or _int(env, "SLURM_NTASKS", 1)
    if "SLURM_STEP_ID" not in env and tasks > 1:
        # The batch script itself (or an salloc shell) is one process, whatever the job asked for.
        raise LaunchError(
            f"Slurm job {job_id} asked for {tasks} tasks, but this process runs in the batch step, which is "
            "a single task: start it with `srun` so that every task runs it"
        )
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise LaunchError("Slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
    info = LaunchInfo(
        rank=_int(env, "SLURM_PROCID"),
        world_size=tasks,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
        master_port=_int(env, "MASTER_PORT", 0) or rendezvous_port(job_id),
        launcher="slurm",
    )
    return _checked(info, f"Slurm job {job_id} (SLURM_PROCID/SLURM_NTASKS)")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[003-010,017],login1`.

    Slurm's own expansion (`scontrol show hostnames`) is used where it is installed; inside a container
    without Slurm's tools, the first element is expanded here.
    """
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    match = re.match(r"([^,\[]*)\[([^\]]+)\]", nodelist)
    if not match:
        raise LaunchError(f"cannot read the node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def _from_mpi(env: Mapping[str, str]) -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError(
            "started by an MPI launcher, but mpi4py cannot be imported: pip install 'megatron-ds[mpi]' "
            "(mpi4py built against the same MPI as mpirun)"
        ) from err
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    size_variables = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
    expected = next((_int(env, name) for name in size_variables if env.get(name)), 0)
    if expected and expected != world_size:
        raise LaunchError(
            f"the launcher started {expected} processes but mpi4py sees a world of {world_size}: mpi4py is "
            "built against another MPI than the launcher's (or srun's --mpi plugin does not match it)"
        )
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    rendezvous = (_own_address(), free_port()) if rank == 0 else None
    master_addr, master_port = comm.bcast(rendezvous, root=0)
    info = LaunchInfo(rank, world_size, local_rank, master_addr, master_port, "mpi")
    return _checked(info, "MPI launch (mpi4py COMM_WORLD)")


def _own_address() -> str:
    """This host's address as other hosts reach it, or loopback where the hostname does not resolve."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def free_port() -> int:
    """A TCP port that nothing listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


_current: LaunchInfo | None = None


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> LaunchInfo:
    """Join the world of whichever launcher started this process; a no-op if torch.distributed is up.

    backend: "nccl" or "gloo"; by default NCCL where CUDA is available, else gloo. Under NCCL the process
    takes the GPU of its local rank. timeout_minutes bounds the rendezvous and every collective.
    """
    global _current
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if _current is None or _current.world_size != dist.get_world_size():
            local_rank = _int(os.environ, "LOCAL_RANK", 0)
            _current = LaunchInfo(dist.get_rank(), dist.get_world_size(), local_rank, "", 0, "external")
        return _current
    info = detect_launch()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise LaunchError("backend nccl needs CUDA, and torch sees no GPU; use gloo on CPUs")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{_url_host(info.master_addr)}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    _current = info
    return info


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
