"""`mds submit`: render a training job's sbatch script into its run directory and submit it."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from megatron_ds.jobs.sbatch import GPU_ENV, JobSpec, Run, render_sbatch


class SubmitError(RuntimeError):
    """sbatch refused the job, or the configuration is invalid."""


def check_config(preset: str, overrides: list[str], world_size: int) -> None:
    """Fail before queueing when the configuration, or its layout on world_size ranks, is invalid."""
    try:
        from megatron_ds.config import ConfigError, load_config, validate_world
    except ImportError:  # the typed configuration is optional for rendering
        return
    try:
        validate_world(load_config(preset=preset, overrides=overrides), world_size)
    except (ConfigError, ValueError, KeyError, TypeError) as err:
        raise SubmitError(f"invalid configuration for {world_size} ranks: {err}") from err


def with_node_size(overrides: list[str], ranks_per_node: int) -> list[str]:
    """Tell the configuration how many ranks share a node (expert placement), unless the user did."""
    if any(o.startswith("parallel.gpus_per_node=") for o in overrides):
        return overrides
    return [*overrides, f"parallel.gpus_per_node={ranks_per_node}"]


def sbatch(script: Path, dependency: str = "") -> str:
    """Submit script and return the job id (for an array, the array's id)."""
    command = ["sbatch", "--parsable"]
    if dependency:
        command.append(f"--dependency={dependency}")
    out = subprocess.run([*command, str(script)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SubmitError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def submit_chain(script: Path, length: int, log: Path) -> list[str]:
    """Submit script `length` times, each job starting after the previous one ended, whatever its state."""
    job_ids: list[str] = []
    for _ in range(length):
        job_ids.append(sbatch(script, f"afterany:{job_ids[-1]}" if job_ids else ""))
    with log.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} submitted {script.name}: {' '.join(job_ids)}\n")
    return job_ids


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Resource and behaviour options shared by `mds submit` and (as defaults) `mds sweep`."""
    parser.add_argument("--time", default="01:00:00", help="time limit (minutes, HH:MM:SS, D-HH:MM)")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--qos", default="")
    parser.add_argument("--constraint", default="", help="node features, e.g. h100")
    parser.add_argument("--cpus-per-task", type=int, default=0, help="0 leaves Slurm's default")
    parser.add_argument("--grace", type=int, default=180, help="seconds before the limit to checkpoint")
    parser.add_argument("--max-requeues", type=int, default=5, help="restarts before exit 75 fails the job")
    parser.add_argument("--mpi", action="store_true", help="srun --mpi=pmix; ranks from mpi4py")
    parser.add_argument("--container-image", default="", help="pyxis/enroot image (srun --container-image)")
    parser.add_argument(
        "--container-mount", action="append", default=[], metavar="SRC:DST", help="repeatable; run dir added"
    )
    parser.add_argument("--python", default="", help="interpreter on the nodes (default: this one)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="repeatable export")


def job_options(args: argparse.Namespace) -> dict:
    """JobSpec fields from the options of add_job_arguments."""
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SubmitError(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    return dict(
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        cpus_per_task=args.cpus_per_task,
        grace_seconds=args.grace,
        max_requeues=args.max_requeues,
        mpi=args.mpi,
        container_image=args.container_image,
        container_mounts=args.container_mount,
        python=args.python or ("python" if args.container_image else sys.executable),
        env=env,
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit a training job to Slurm",
        description="Render the sbatch script of a training run into its run directory and submit it. "
        f"GPU jobs export {', '.join(GPU_ENV)} (see docs/slurm.md).",
    )
    parser.add_argument("--preset", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="0 for a CPU job (gloo)")
    parser.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node; default one per GPU")
    parser.add_argument("--run-dir", default="", help="default runs/PRESET-NODESxGPUS-TIMESTAMP")
    parser.add_argument("--job-name", default="")
    parser.add_argument(
        "--chain",
        type=int,
        default=0,
        metavar="K",
        help="submit K jobs chained with --dependency=afterany instead of self-requeueing",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    add_job_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted key=value configuration overrides")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ranks_per_node = args.tasks_per_node or args.gpus_per_node or 1
    default_dir = f"runs/{args.preset}-{args.nodes}x{ranks_per_node}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(os.path.abspath(args.run_dir or default_dir))
    overrides = with_node_size(args.overrides, ranks_per_node)
    spec = JobSpec(
        runs=[Run(str(run_dir), overrides)],
        log_dir=str(run_dir),
        preset=args.preset,
        job_name=args.job_name or re.sub(r"[^A-Za-z0-9._+-]", "-", f"mds-{args.preset}")[:64],
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        mode="chain" if args.chain else "requeue",
        **job_options(args),
    )
    script = render_sbatch(spec)
    check_config(args.preset, overrides, spec.world_size)
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    job_ids = submit_chain(path, max(args.chain, 1), run_dir / "submissions.log")
    print(f"submitted {' '.join(job_ids)}; run directory {run_dir}")
    return 0
