"""Render the sbatch script of a training job: one task per GPU through srun, checkpoint-and-requeue on
a signal before the time limit, resume from the latest checkpoint when the job starts again.

Every value that reaches the script is either checked against a strict pattern (the #SBATCH lines, which
sbatch parses itself and no shell quoting protects) or quoted with shlex.quote (the shell body), so no
configuration value can run code.

What the rendered script does (see docs/slurm.md):
1. exits at once if the run directory holds COMPLETED (a chained job after the run finished);
2. exports MASTER_ADDR (first host of the allocation) and MASTER_PORT (derived from the job id, as
   parallel.launcher.rendezvous_port does), OMP_NUM_THREADS, and the NCCL settings of GPU jobs;
3. starts `srun ... python -m megatron_ds.cli train --run-dir RUN_DIR ...` in the background and waits;
4. on SIGUSR1 (sent by Slurm GRACE seconds before the time limit, or by `scancel -s USR1 -b`) passes it
   to the tasks, which finish their step, save a checkpoint and exit with 75;
5. on exit 75 requeues the job (`scontrol requeue`) unless it has restarted max_requeues times already;
   in "chain" mode it only exits, and the next job of the --dependency chain resumes instead.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from parallel.launcher import PORT_BASE, PORT_SPAN

REQUEUE_EXIT_CODE = 75  # `mds train` exits with this after saving on SIGUSR1/SIGTERM: "requeue me"

# NCCL / PyTorch settings exported in GPU jobs unless the user's environment already sets them.
# docs/slurm.md explains each and the site-specific ones (NCCL_IB_HCA, NCCL_SOCKET_IFNAME) left out here.
GPU_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # one hardware queue: TP communication is issued in program order
    "NCCL_IB_TIMEOUT": "22",  # InfiniBand ack timeout 4.096 us * 2^22 (~17 s): ride out link flaps
    "NCCL_IB_RETRY_CNT": "10",  # InfiniBand retries before NCCL reports a failure
    "NCCL_DEBUG": "WARN",  # INFO prints topology, rings and transports when debugging
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a timed-out collective aborts the job instead of hanging
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",  # free communication buffers promptly (less memory)
}

_SAFE = {
    # Values that appear in #SBATCH lines. sbatch reads these lines itself, so they must be plain words.
    "job_name": re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"),
    "partition": re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*"),
    "account": re.compile(r"[A-Za-z0-9._-]+"),
    "qos": re.compile(r"[A-Za-z0-9._-]+"),
    "constraint": re.compile(r"[A-Za-z0-9._&|,\[\]*-]+"),
    "time": re.compile(r"\d+|\d+:\d{2}(:\d{2})?|\d+-\d{1,2}(:\d{2}){0,2}"),
    "path": re.compile(r"/[A-Za-z0-9._/+@=,:~-]*"),
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)


class JobSpecError(ValueError):
    """A job parameter that cannot be rendered safely or makes no sense."""


@dataclass
class Run:
    """One training run of a job: its directory and its configuration overrides."""

    run_dir: str  # absolute; holds checkpoints, metrics, the log and the job's own files
    overrides: list[str] = field(default_factory=list)  # dotted key=value, passed to `mds train`


@dataclass
class JobSpec:
    runs: list[Run]  # one run, or one per element of a job array (a sweep)
    log_dir: str  # where Slurm writes slurm-JOBID.out (slurm-ARRAYID_INDEX.out for arrays)
    preset: str = "tiny"  # configuration preset passed to `mds train --preset`
    command: list[str] = field(default_factory=list)  # replaces `PYTHON -m megatron_ds.cli train --preset P`
    job_name: str = "mds"
    nodes: int = 1
    gpus_per_node: int = 8  # 0 for a CPU job (gloo), where tasks_per_node says how many ranks per node
    tasks_per_node: int = 0  # 0 means one per GPU
    cpus_per_task: int = 0  # 0 leaves Slurm's default
    time: str = "01:00:00"  # time limit: minutes, HH:MM:SS, D-HH:MM, ...
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    grace_seconds: int = 180  # SIGUSR1 this long before the time limit: enough to finish a step and save
    max_requeues: int = 5  # restarts (SLURM_RESTART_COUNT) after which exit 75 fails the job instead
    mode: str = "requeue"  # requeue: the job requeues itself; chain: a --dependency chain continues it
    mpi: bool = False  # srun --mpi=pmix and ranks from mpi4py, instead of torch's own rendezvous
    container_image: str = ""  # pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.01-py3 or a .sqsh file
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST[:FLAGS]; run and log dirs are added
    python: str = "python"  # interpreter with megatron-ds installed, on the compute nodes
    env: dict[str, str] = field(default_factory=dict)  # extra exports, after the defaults

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def _checked_word(kind: str, value: str, what: str) -> str:
    if not _SAFE[kind].fullmatch(value):
        raise JobSpecError(
            f"{what}={value!r} cannot go into an #SBATCH line: use only the characters of "
            f"the pattern {_SAFE[kind].pattern}"
        )
    return value


def _validate(spec: JobSpec) -> None:
    if not spec.runs:
        raise JobSpecError("a job needs at least one run")
    for name in (
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "grace_seconds",
        "max_requeues",
    ):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise JobSpecError(f"{name}={value!r} must be a non-negative integer")
    if spec.nodes < 1:
        raise JobSpecError("nodes must be at least 1")
    if spec.mode not in ("requeue", "chain"):
        raise JobSpecError(f"mode={spec.mode!r} must be 'requeue' or 'chain'")
    _checked_word("path", spec.log_dir, "log directory")
    for run in spec.runs:
        _checked_word("path", run.run_dir, "run directory")
        for override in run.overrides:
            if not _OVERRIDE.fullmatch(override) or "\0" in override:
                raise JobSpecError(f"override {override!r} is not of the form dotted.key=value")
    for name in spec.env:
        if not _ENV_NAME.fullmatch(name):
            raise JobSpecError(f"environment variable name {name!r} is not a valid shell name")
    for text in [spec.preset, spec.python, spec.container_image, *spec.container_mounts, *spec.command]:
        if "\0" in text:
            raise JobSpecError("values cannot contain NUL characters")


def _sbatch_lines(spec: JobSpec) -> list[str]:
    lines = [
        f"--job-name={_checked_word('job_name', spec.job_name, 'job name')}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={spec.ranks_per_node}",
    ]
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        lines.append(f"--cpus-per-task={spec.cpus_per_task}")
    lines.append(f"--time={_checked_word('time', spec.time, 'time')}")
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(spec, name):
            lines.append(f"--{name}={_checked_word(name, getattr(spec, name), name)}")
    lines.append(f"--signal=B:USR1@{spec.grace_seconds}")
    lines.append("--requeue" if spec.mode == "requeue" else "--no-requeue")
    lines.append("--open-mode=append")  # a requeued job appends to its log
    if len(spec.runs) > 1:
        lines.append(f"--array=0-{len(spec.runs) - 1}")
        lines.append(f"--output={spec.log_dir}/slurm-%A_%a.out")
    else:
        lines.append(f"--output={spec.log_dir}/slurm-%j.out")
    return ["#SBATCH " + line for line in lines]


def _bash_array(name: str, words: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(word) for word in words)})"


def _run_selection(spec: JobSpec) -> str:
    """Shell code that sets run_dir and overrides, per array element in a sweep."""
    if len(spec.runs) == 1:
        run = spec.runs[0]
        return f"run_dir={shlex.quote(run.run_dir)}\n{_bash_array('overrides', run.overrides)}"
    cases = []
    for index, run in enumerate(spec.runs):
        cases.append(
            f"  {index})\n    run_dir={shlex.quote(run.run_dir)}\n"
            f"    {_bash_array('overrides', run.overrides)}\n    ;;"
        )
    cases.append('  *)\n    echo "unknown array index $SLURM_ARRAY_TASK_ID" >&2\n    exit 1\n    ;;')
    return 'case "$SLURM_ARRAY_TASK_ID" in\n' + "\n".join(cases) + "\nesac"


def _srun_args(spec: JobSpec) -> list[str]:
    # Not --kill-on-bad-exit: the first rank to exit 75 after a save would get the others killed while they
    # still write their part of the checkpoint. A crashed rank ends the others through the collective
    # timeout of parallel.launcher.init_distributed (and TORCH_NCCL_ASYNC_ERROR_HANDLING on GPUs).
    args = ["srun", "--kill-on-bad-exit=0"]
    if spec.mpi:
        args.append("--mpi=pmix")
    if spec.container_image:
        mounts = list(dict.fromkeys([*spec.container_mounts, *_own_mounts(spec)]))
        args += [f"--container-image={spec.container_image}", f"--container-mounts={','.join(mounts)}"]
        args.append("--no-container-mount-home")
    return args


def _own_mounts(spec: JobSpec) -> list[str]:
    dirs = [spec.log_dir, *(run.run_dir for run in spec.runs)]
    return [f"{d}:{d}" for d in dict.fromkeys(dirs)]


def _exports(spec: JobSpec) -> str:
    lines = [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
    ]
    if spec.mpi:
        lines.append("export MDS_LAUNCHER=mpi")
    if spec.gpus_per_node:
        lines += [f'export {name}="${{{name}:-{value}}}"' for name, value in GPU_ENV.items()]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in spec.env.items()]
    return "\n".join(lines)


def render_sbatch(spec: JobSpec) -> str:
    """The complete sbatch script for spec; raises JobSpecError for any value it cannot render safely."""
    _validate(spec)
    train = spec.command or [spec.python, "-m", "megatron_ds.cli", "train", "--preset", spec.preset]
    if spec.mode == "requeue":
        on_requeue_exit = (
            f"if ((restart < {spec.max_requeues})); then\n"
            '      note "checkpoint saved; requeueing"\n'
            '      scontrol requeue "$SLURM_JOB_ID" && exit 0\n'
            '      note "scontrol requeue failed"\n'
            "    else\n"
            f'      note "checkpoint saved; not requeued: restarted {spec.max_requeues} times already"\n'
            "    fi"
        )
    else:
        on_requeue_exit = 'note "checkpoint saved; the next job of the dependency chain resumes"'
    return f"""#!/bin/bash
# Rendered by `mds submit` / `mds sweep` (megatron_ds/jobs/sbatch.py). Submit with: sbatch THIS_FILE
{chr(10).join(_sbatch_lines(spec))}
set -uo pipefail

{_run_selection(spec)}
{_bash_array("train", train)}
{_bash_array("srun_args", _srun_args(spec))}
restart="${{SLURM_RESTART_COUNT:-0}}"
mkdir -p "$run_dir"
note() {{ echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID restart $restart: $*" | tee -a "$run_dir/jobs.log"; }}

if [[ -e "$run_dir/COMPLETED" ]]; then
  note "run already completed; nothing to do"
  exit 0
fi

{_exports(spec)}

note "start on $SLURM_JOB_NODELIST ($SLURM_NTASKS tasks), rendezvous $MASTER_ADDR:$MASTER_PORT"
"${{srun_args[@]}}" "${{train[@]}}" --run-dir "$run_dir" "${{overrides[@]}}" &
step=$!
cancelled=0
trap 'note "SIGUSR1: tasks checkpoint and stop"; kill -USR1 "$step" 2>/dev/null' USR1
trap 'note "SIGTERM: job cancelled or preempted"; cancelled=1' TERM

# `wait` returns early whenever a trap runs; wait again until srun itself has ended.
while :; do
  status=0
  wait "$step" || status=$?
  kill -0 "$step" 2>/dev/null || break
done

case $status in
  0)
    touch "$run_dir/COMPLETED"
    note "completed"
    ;;
  {REQUEUE_EXIT_CODE})
    if ((cancelled)); then
      note "checkpoint saved; cancelled, so not requeued"
      exit {REQUEUE_EXIT_CODE}
    fi
    {on_requeue_exit}
    ;;
  *)
    note "failed with exit status $status"
    ;;
esac
exit "$status"
"""
