"""`mds report RUNS_DIR`: one table and a few plots from a directory of runs (a sweep, or any runs).

Per run: throughput (median over steps after the first, which includes warm-up), MFU, achieved TFLOP/s
per GPU, peak memory per GPU, final loss. Scaling efficiency compares runs that differ only in GPU count:
strong scaling among runs with equal tokens per step, weak scaling among runs with equal tokens per step
per GPU; both are (tokens/s per GPU) / (tokens/s per GPU of the smallest run), 1.0 being perfect.
Runs without a completed summary are listed as failed, with the reason found in their files.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

COLUMNS = [
    "run", "status", "gpus", "tp", "pp", "ep", "dp", "params", "steps", "tokens_per_step", "tokens_per_s",
    "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "peak_mem_gib", "final_loss", "strong_efficiency",
    "weak_efficiency", "reason",
]  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def _steady(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records[1:] or records if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def _layout(summary: dict, name: str):
    return summary.get(name, (summary.get("parallel") or {}).get(name))


def _failure_reason(run_dir: Path, info: dict) -> str:
    if (run_dir / "invalid.txt").exists():
        return (run_dir / "invalid.txt").read_text().strip()
    logs = sorted(run_dir.glob("slurm-*.out"))
    if info.get("job_id"):
        logs.append(run_dir.parent / "logs" / f"slurm-{info['job_id']}.out")
    errors = []
    for log in logs:
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            errors += [line.strip() for line in lines if "Error" in line or "error:" in line]
    notes = (run_dir / "jobs.log").read_text().splitlines() if (run_dir / "jobs.log").exists() else []
    if errors:
        return errors[-1][:300]
    if notes:
        return notes[-1].split(": ", 1)[-1]
    return "no job output: not started yet, or submitted elsewhere"


def collect(runs_dir: Path) -> list[dict]:
    """One row per run directory (a folder with run.json, summary.json or metrics.jsonl)."""
    markers = ("run.json", "summary.json", "metrics.jsonl")
    dirs = sorted({p.parent for m in markers for p in runs_dir.rglob(m) if "checkpoints" not in p.parts})
    rows = []
    for run_dir in dirs:
        info, summary, records = (
            _read_json(run_dir / "run.json"),
            _read_json(run_dir / "summary.json"),
            _metrics(run_dir),
        )
        gpus = info.get("gpus") or summary.get("world_size")
        tokens_per_s = _steady(records, "tokens_per_s") or summary.get("tokens_per_s")
        steps = summary.get("steps") or (records[-1].get("step") if records else None)
        completed = summary.get("status") in ("completed", "complete", "finished", "done", "ok")
        params = {k: v for k, v in (info.get("params") or {}).items() if k != "gpus"}
        row = {
            "run": str(run_dir.relative_to(runs_dir)) or ".",
            "status": "completed" if completed else "failed",
            "gpus": gpus,
            **{name: _layout(summary, name) for name in ("tp", "pp", "ep", "dp")},
            "params": "; ".join(f"{k}={json.dumps(v)}" for k, v in params.items()),
            "steps": steps,
            "tokens_per_step": summary["tokens"] / steps if summary.get("tokens") and steps else None,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / gpus if tokens_per_s and gpus else None,
            "tflops_per_gpu": _steady(records, "tflops"),
            "mfu": _steady(records, "mfu") or summary.get("mfu"),
            "peak_mem_gib": max((r["peak_mem_gib"] for r in records if "peak_mem_gib" in r), default=None),
            "final_loss": summary.get("final_loss") or (records[-1].get("loss") if records else None),
            "reason": "" if completed else _failure_reason(run_dir, info),
        }
        row["_group"] = json.dumps(
            {k: v for k, v in params.items() if "global_batch" not in k}, sort_keys=True
        )
        rows.append(row)
    _add_efficiency(rows)
    return rows


def _add_efficiency(rows: list[dict]) -> None:
    done = [
        r for r in rows if r["status"] == "completed" and r["tokens_per_s_per_gpu"] and r["tokens_per_step"]
    ]
    for column, problem in (("strong_efficiency", lambda r: r["tokens_per_step"]),
                            ("weak_efficiency", lambda r: r["tokens_per_step"] / r["gpus"])):  # fmt: skip
        families: dict[tuple, list[dict]] = {}
        for row in done:
            families.setdefault((row["_group"], round(problem(row), 6)), []).append(row)
        for family in families.values():
            if len({r["gpus"] for r in family}) < 2:
                continue
            base = min(family, key=lambda r: r["gpus"])
            for row in family:
                row[column] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_tables(rows: list[dict], out: Path) -> None:
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in COLUMNS if c != "reason"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in shown) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "completed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['run']}`: {_cell(r['reason'])}" for r in failed]
    (out / "runs.md").write_text("# Runs\n\n" + "\n".join(lines) + "\n")


def _plot_by_group(axis, rows: list[dict], key: str, label: str) -> None:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "completed" and row.get(key) is not None and row["gpus"]:
            groups.setdefault(row["params"] or "runs", []).append(row)
    for name, members in sorted(groups.items()):
        members.sort(key=lambda r: r["gpus"])
        axis.plot([r["gpus"] for r in members], [r[key] for r in members], marker="o", label=name[:60])
    axis.set_xlabel("GPUs (ranks)")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    if groups:
        axis.legend(fontsize="x-small")
    else:
        axis.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=axis.transAxes)


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "throughput.png": [("tokens_per_s", "tokens/s"), ("mfu", "MFU")],
        "scaling.png": [("strong_efficiency", "strong scaling efficiency"),
                        ("weak_efficiency", "weak scaling efficiency")],
        "memory.png": [("peak_mem_gib", "peak memory per GPU (GiB)")],
    }  # fmt: skip
    paths = []
    for filename, panels in figures.items():
        figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for axis, (key, label) in zip(axes[0], panels):
            _plot_by_group(axis, rows, key, label)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=100)
        plt.close(figure)
        paths.append(out / filename)
    return paths


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="table and plots of a directory of runs")
    parser.add_argument("runs_dir")
    parser.add_argument("--out", default="", help="where to write the report (default RUNS_DIR/report)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    runs_dir = Path(args.runs_dir).resolve()
    out = Path(args.out).resolve() if args.out else runs_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(runs_dir)
    write_tables(rows, out)
    write_plots(rows, out)
    failed = sum(r["status"] != "completed" for r in rows)
    print(f"{len(rows)} run(s), {failed} failed; report in {out} (runs.md, runs.csv, *.png)")
    return 0
