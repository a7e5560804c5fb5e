"""Run check functions in a fresh world of N local processes, once per world for many checks.

On CPUs (gloo) the processes are forked from the test process, so they start with torch and
Megatron-Core already imported (a spawned process would spend seconds importing them); NCCL worlds
spawn, one GPU per rank, since CUDA does not survive a fork. One world runs all of a module's checks
in order and reports each check's outcome separately, so a failing check does not hide the others.
Checks take no arguments.
"""

import datetime
import json
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.launcher import free_port


def run_checks(
    checks, world_size: int, workdir: Path, timeout_s: int = 120, backend: str = "gloo"
) -> dict[str, str]:
    """Run `checks` (functions) on every rank; returns {check name: "" if it passed, else the errors}."""
    port = free_port()
    mp.start_processes(
        _worker,
        args=(checks, world_size, port, str(workdir), timeout_s, backend),
        nprocs=world_size,
        join=True,
        start_method="fork" if backend == "gloo" else "spawn",
    )
    outcome = {check.__name__: "" for check in checks}
    for rank in range(world_size):
        for name, error in json.loads((workdir / f"rank{rank}.json").read_text()).items():
            if error:
                outcome[name] += f"\n--- rank {rank} ---\n{error}"
    return outcome


def _worker(rank, checks, world_size, port, workdir, timeout_s, backend):
    device = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device,
    )
    results = {}
    for check in checks:
        try:
            check()
            results[check.__name__] = ""
        except Exception:
            results[check.__name__] = traceback.format_exc()
        dist.barrier()
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
