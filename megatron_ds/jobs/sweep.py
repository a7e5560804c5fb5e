"""`mds sweep SPEC.yaml`: a grid of short training runs, submitted as Slurm job arrays.

A spec (every key but `grid` is optional):

    name: moe-scaling          # job name; runs go to RUNS_DIR/NAME/NNN-<params>
    preset: tiny
    runs_dir: runs             # or --runs-dir
    gpus_per_node: 8           # node size; 0 for CPU ranks (gloo), then ranks_per_node says the node size
    ranks_per_node: 8
    time: "00:20:00"           # and partition, account, qos, constraint, container_image,
    overrides: [train.steps=50]   # container_mounts, python, env: as for `mds submit`;
                               # command: [prog, args] replaces `python -m megatron_ds.cli train --preset P`
    grid:
      gpus: [8, 16, 32]                        # ranks per run
      layout:                                  # a list of mappings varies several keys together
        - {parallel.tensor: 1, parallel.expert: 8}
        - {parallel.tensor: 2, parallel.expert: 4}
      train.micro_batch_size: [1, 2]           # any dotted configuration key
      precision.params_dtype: [bf16]

Runs that share a resource shape (nodes x ranks per node) form one job array; a run whose configuration
is invalid at its size is not submitted, and its run directory records why (`mds report` lists it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

import yaml

from megatron_ds.jobs.sbatch import JobSpec, Run, render_sbatch
from megatron_ds.jobs.submit import SubmitError, check_config, sbatch, with_node_size

JOB_KEYS = (
    "time", "partition", "account", "qos", "constraint",
    "container_image", "container_mounts", "env", "command",
)  # fmt: skip


class SweepError(ValueError):
    """The sweep spec is malformed."""


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of the grid, as {"gpus": N, "overrides": {key: value}, "params": {name: value}}."""
    if "gpus" not in grid:
        raise SweepError("grid.gpus is required: the list of rank counts to run")
    axes = []
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{name} must be a non-empty list, not {values!r}")
        axes.append([(name, value) for value in values])
    points = []
    for combination in itertools.product(*axes):
        point = {"gpus": None, "overrides": {}, "params": {}}
        for name, value in combination:
            if name == "gpus":
                point["gpus"] = int(value)
            elif isinstance(value, dict):
                point["overrides"].update(value)
            else:
                point["overrides"][name] = value
            point["params"][name] = value
        points.append(point)
    return points


def run_name(index: int, point: dict) -> str:
    parts = [f"{index:03d}", f"gpus{point['gpus']}"]
    parts += [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in point["overrides"].items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))[:120]


def shape(gpus: int, per_node: int) -> tuple[int, int]:
    """(nodes, ranks per node) for a run of `gpus` ranks on nodes of `per_node`."""
    nodes = math.ceil(gpus / per_node)
    if gpus % nodes:
        raise SweepError(f"{gpus} ranks cannot be spread evenly over {nodes} nodes of {per_node}")
    return nodes, gpus // nodes


def _format(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def plan(spec: dict, runs_dir: Path) -> dict[tuple[int, int], list[tuple[Run, dict]]]:
    """Group the grid's runs by resource shape; write each run's run.json (and invalid.txt if refused)."""
    gpus_per_node = int(spec.get("gpus_per_node", 8))
    per_node = int(spec.get("ranks_per_node", gpus_per_node or 1))
    common = [str(o) for o in spec.get("overrides", [])]
    groups: dict[tuple[int, int], list[tuple[Run, dict]]] = {}
    for index, point in enumerate(expand_grid(spec["grid"])):
        run_dir = runs_dir / run_name(index, point)
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = common + [f"{k}={_format(v)}" for k, v in point["overrides"].items()]
        record = {"gpus": point["gpus"], "params": point["params"], "overrides": overrides}
        try:
            nodes, ranks = shape(point["gpus"], per_node)
            record["nodes"], record["overrides"] = nodes, with_node_size(overrides, ranks)
            check_config(spec.get("preset", "tiny"), record["overrides"], point["gpus"])
        except (SweepError, SubmitError) as err:
            (run_dir / "invalid.txt").write_text(f"{err}\n")
            record["invalid"] = str(err)
        (run_dir / "run.json").write_text(json.dumps(record, indent=1, default=str))
        if "invalid" not in record:
            groups.setdefault((nodes, ranks), []).append((Run(str(run_dir), record["overrides"]), record))
    return groups


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="submit a grid of short runs as Slurm job arrays")
    parser.add_argument("spec", help="sweep YAML (see `mds sweep --help` and docs/slurm.md)")
    parser.add_argument("--runs-dir", default="", help="overrides the spec's runs_dir")
    parser.add_argument("--python", default="", help="interpreter on the nodes (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the scripts; submit nothing")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    spec = yaml.safe_load(Path(args.spec).read_text()) or {}
    if not isinstance(spec, dict) or "grid" not in spec:
        raise SweepError(f"{args.spec} must be a mapping with a `grid`")
    name = str(spec.get("name", Path(args.spec).stem))
    runs_dir = Path(os.path.abspath(args.runs_dir or spec.get("runs_dir", "runs"))) / name
    groups = plan(spec, runs_dir)
    gpus_per_node = int(spec.get("gpus_per_node", 8))
    python = (
        args.python or spec.get("python") or ("python" if spec.get("container_image") else sys.executable)
    )
    submitted = []
    for (nodes, ranks), members in sorted(groups.items()):
        job = JobSpec(
            runs=[run for run, _ in members],
            log_dir=str(runs_dir / "logs"),
            preset=str(spec.get("preset", "tiny")),
            job_name=re.sub(r"[^A-Za-z0-9._+-]", "-", name)[:64],
            nodes=nodes,
            gpus_per_node=ranks if gpus_per_node else 0,
            tasks_per_node=ranks,
            python=python,
            max_requeues=int(spec.get("max_requeues", 1)),
            **{key: spec[key] for key in JOB_KEYS if key in spec},
        )
        script = render_sbatch(job)
        if args.dry_run:
            print(script)
            continue
        (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
        path = runs_dir / f"sweep-{nodes}x{ranks}.sbatch"
        path.write_text(script)
        job_id = sbatch(path)
        for index, (run, record) in enumerate(members):
            (Path(run.run_dir) / "run.json").write_text(
                json.dumps(record | {"job_id": f"{job_id}_{index}" if len(members) > 1 else job_id}, indent=1)
            )
        submitted.append(job_id)
        print(f"submitted {job_id}: {len(members)} run(s) of {nodes} node(s) x {ranks} rank(s)")
    print(f"runs in {runs_dir}")
    return 0
