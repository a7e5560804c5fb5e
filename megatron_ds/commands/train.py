"""`mds train`: run or resume pre-training in a run directory.

Under torchrun, srun or mpirun the processes join the launcher's world. Started by hand, it
launches `--nproc` local processes itself through torchrun's engine (torch.distributed.run).
"""

import os
import signal
import sys
from pathlib import Path

from megatron_ds.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pre-train (or resume) in a run directory")
    p.add_argument("--preset", default="tiny", help="preset name (default: tiny)")
    p.add_argument("--config", help="YAML file applied over the preset")
    p.add_argument("--run-dir", help="where config, metrics and checkpoints go (default: runs/PRESET)")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="local processes to start when no launcher started us (default: 2 for tiny, else 1)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 parallel.expert=2")
    p.set_defaults(func=run)  # fmt: skip


def _child_pids() -> list[int]:
    """Processes whose parent is this one (Linux /proc): the local training ranks."""
    me, children = os.getpid(), []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                children.append(int(entry.name))
    return children


def _forward_to_ranks(signum, frame) -> None:
    """Pass SIGTERM/SIGUSR1 on to the ranks, which finish their step, save and exit 75."""
    for pid in _child_pids():
        os.kill(pid, signum)


def _launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command in `nproc` processes under torchrun's engine; return their exit code."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",  # SIGTERM is forwarded for a clean save instead
    )  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _forward_to_ranks)
    # As torchrun does: one intra-op thread per process unless told otherwise, or the processes
    # oversubscribe the cores and every step slows down several times.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)("-m", "megatron_ds.cli", *argv)
    except ChildFailedError as e:
        return max(failure.exitcode for failure in e.failures.values())
    return 0


def run(args) -> int:
    from parallel.launcher import detect_launch

    cfg = load_config(args.preset, args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    nproc = args.nproc if args.nproc is not None else (2 if args.preset == "tiny" else 1)
    if not detect_launch().external and nproc > 1:
        argv = ["train", "--preset", args.preset, "--run-dir", str(run_dir), "--nproc", "1"]
        argv += ["--config", args.config] if args.config else []
        return _launch_local(nproc, argv + list(args.overrides))
    from megatron_ds.train import train

    return train(cfg, run_dir)
