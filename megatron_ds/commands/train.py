"""`mds train`: run or resume pre-training in a run directory.

Under torchrun, srun or mpirun the processes join the launcher's world. Started by hand, it
launches `--nproc` local processes itself through torchrun's engine (torch.distributed.run).
"""

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


def _launch_local(nproc: int, argv: list[str]) -> int:
    """Re-run this command in `nproc` processes under torchrun's engine; return their exit code."""
    import os
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
    )  # fmt: skip
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
