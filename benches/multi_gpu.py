"""Multi-GPU validation on one host (issue 8): every run goes through the training loop itself.

    python benches/multi_gpu.py all --data DATASET --out $OUT               # 2 GPUs (nvidia-h200-x2)
    python benches/multi_gpu.py all --device cpu --data DATASET --out DIR   # same flow on CPUs, gloo

`all` runs three phases in fresh processes:

* `single` (one process, GPU 0): the reference run of the equivalence model (fp32, 20 steps) and
  the one-GPU throughput run;
* `multi` (torchrun, 2 ranks): the equivalence model under PP=2 (1F1B, with MTP; saves at step 10),
  PP=2 x VP=2 (interleaved), EP=2, TP=2 (no sequence parallelism) and DP=2 (ZeRO-1); the PP=2
  checkpoint of step 10 resumed under EP=2 and under TP=2; two-GPU throughput (DP=2 and EP=2,
  weak scaling: same micro-batch and micro-batches per GPU); the all-to-all bandwidth of our
  dispatcher at EP=2 against NCCL's all_to_all_single of the same bytes;
* `report`: compares the loss curves and writes multi_gpu.json and a table.

On CPUs (`--device cpu`) the model is the tiny preset and pipeline layouts are skipped (the
training loop refuses them: Megatron-Core's schedules allocate on CUDA; the CPU tests in
tests/parallel/test_pipeline_schedule_cpu.py run those schedules with their CUDA calls redirected).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dsv3-bench's architecture (64 experts, top-8, 8 groups of which 4, a dense first layer, MTP 1)
# at a width that trains 20 fp32 steps in seconds.
EQUIVALENCE = {
    "cuda": (
        "dsv3-bench",
        ["model.vocab_size=8192", "model.dim=1024", "model.inter_dim=4096", "model.moe_inter_dim=256",
         "model.n_layers=4", "model.q_lora_rank=384", "model.kv_lora_rank=256", "train.seq_len=512"],
    ),
    "cpu": ("tiny", ["train.seq_len=64"]),
}  # fmt: skip
EQUIVALENCE_TRAIN = [
    "precision.params_dtype=fp32", "train.micro_batch_size=1", "train.global_batch_size=8",
    "train.batch_rampup_start=8", "train.steps=20", "train.lr=1e-3", "train.min_lr=1e-4",
    "train.warmup_steps=2", "train.decay_tokens=1e6", "train.lr_schedule=cosine",
]  # fmt: skip
# Throughput: dsv3-bench's widths and sequence (4096) in bf16, 3 layers (1 dense, 2 MoE) + MTP.
THROUGHPUT = {
    "cuda": ("dsv3-bench", ["model.n_layers=3", "model.vocab_size=32768"]),
    "cpu": ("tiny", ["train.seq_len=64"]),
}
MICRO_PER_GPU, THROUGHPUT_STEPS = 4, 6
COMMON = [
    "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_interval_steps=0",
    "checkpoint.save_on_exit=false",
]  # fmt: skip

LAYOUTS = {  # name: overrides; run on 2 ranks
    "pp2": ["parallel.pipeline=2", "checkpoint.save_interval_steps=10"],
    "pp2_vp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "ep2": ["parallel.expert=2"],
    "tp2": ["parallel.tensor=2"],
    "dp2": [],
}
RESUMES = {"pp2_to_ep2": ("pp2", ["parallel.expert=2"]), "pp2_to_tp2": ("pp2", ["parallel.tensor=2"])}
CPU_LAYOUTS = {
    "ep2": ["parallel.expert=2", "checkpoint.save_interval_steps=10"],
    "tp2": LAYOUTS["tp2"],
    "dp2": [],
}
CPU_RESUMES = {"ep2_to_tp2": ("ep2", ["parallel.tensor=2"])}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_run(name: str, args, preset: str, overrides: list[str]) -> dict:
    """One `megatron_ds.train.train` call in this process (all ranks); returns its summary or error."""
    import torch
    import torch.distributed as dist

    from megatron_ds.config import load_config
    from megatron_ds.train import train

    run_dir = Path(args.work) / name
    cfg = load_config(preset, overrides=[*COMMON, f"data.paths=[{args.data}]", *overrides])
    start = time.perf_counter()
    try:
        code = train(cfg, run_dir)
        result = {"exit_code": code}
    except Exception:
        result = {"error": traceback.format_exc()}
        log(f"{name} FAILED:\n{result['error']}")
    result["seconds"] = time.perf_counter() - start
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
    log(f"{name}: {result.get('exit_code', 'error')} in {result['seconds']:.1f} s")
    return result


def equivalence_overrides(device: str) -> tuple[str, list[str]]:
    preset, model = EQUIVALENCE[device]
    return preset, [*model, *EQUIVALENCE_TRAIN]


def throughput_overrides(device: str, world: int) -> tuple[str, list[str]]:
    preset, model = THROUGHPUT[device]
    batch = MICRO_PER_GPU * world
    return preset, [*model, "train.micro_batch_size=1", f"train.global_batch_size={batch}",
                    f"train.batch_rampup_start={batch}", f"train.steps={THROUGHPUT_STEPS}"]  # fmt: skip


def phase_single(args) -> None:
    results = {}
    preset, overrides = equivalence_overrides(args.device)
    results["reference"] = train_run("reference", args, preset, overrides)
    preset, overrides = throughput_overrides(args.device, 1)
    results["throughput_1gpu"] = train_run("throughput_1gpu", args, preset, overrides)
    Path(args.work, "single.json").write_text(json.dumps(results, indent=1))


def phase_multi(args) -> None:
    import torch.distributed as dist

    from parallel.launcher import init_distributed

    init_distributed(timeout_minutes=5)
    results = {}
    preset, overrides = equivalence_overrides(args.device)
    layouts = LAYOUTS if args.device == "cuda" else CPU_LAYOUTS
    resumes = RESUMES if args.device == "cuda" else CPU_RESUMES
    for name, layout in layouts.items():
        results[name] = train_run(name, args, preset, [*overrides, *layout])
    for name, (source, layout) in resumes.items():
        load = Path(args.work) / source / "checkpoints" / "step_00000010"
        results[name] = train_run(name, args, preset, [*overrides, *layout, f"checkpoint.load={load}"])
    preset, overrides = throughput_overrides(args.device, 2)
    results["throughput_2gpu_dp2"] = train_run("throughput_2gpu_dp2", args, preset, overrides)
    results["throughput_2gpu_ep2"] = train_run(
        "throughput_2gpu_ep2", args, preset, [*overrides, "parallel.expert=2"]
    )
    try:
        results["all_to_all"] = all_to_all_bandwidth(args.device)
    except Exception:
        results["all_to_all"] = {"error": traceback.format_exc()}
        log(results["all_to_all"]["error"])
    if dist.get_rank() == 0:
        Path(args.work, "multi.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def all_to_all_bandwidth(device_name: str) -> dict:
    """Our dispatcher's dispatch at EP = world against all_to_all_single of the same rows.

    dsv3-bench's routing (64 experts, top-8) of one micro-batch of 4096 tokens x 2048 in bf16, with
    router-like random top-8 choices. `dispatch` is the whole dispatcher step (count exchange, permute,
    all-to-all, re-sort by local expert); `nccl` is one all_to_all_single of the already permuted rows
    with the same splits. Bandwidth counts the bytes sent to other ranks.
    """
    import torch
    import torch.distributed as dist

    from parallel.dispatcher import AllToAllDispatcher

    device = (
        torch.device("cuda", torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    )
    tokens, dim, experts, top_k = (4096, 2048, 64, 8) if device_name == "cuda" else (512, 256, 16, 4)
    dtype = torch.bfloat16 if device_name == "cuda" else torch.float32
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, generator=gen)
    indices = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=-1).indices
    dispatcher = AllToAllDispatcher(dist.group.WORLD, experts)
    plan = dispatcher.plan(indices)
    rows = x[plan.order // top_k]
    out = rows.new_empty((sum(plan.recv_splits), dim))
    remote_bytes = sum(n for p, n in enumerate(plan.send_splits) if p != rank) * dim * x.element_size()

    def nccl():
        dist.all_to_all_single(out, rows, plan.recv_splits, plan.send_splits)

    def ours():
        dispatcher.dispatch(x, indices)

    from timing import median_ms

    nccl_ms, ours_ms = median_ms(nccl, device), median_ms(ours, device)
    result = torch.tensor([nccl_ms, ours_ms, remote_bytes], dtype=torch.float64, device=device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    nccl_ms, ours_ms, remote_bytes = result.tolist()
    return {
        "ep": world, "tokens": tokens, "dim": dim, "experts": experts, "top_k": top_k, "dtype": str(dtype),
        "remote_bytes_per_rank": remote_bytes,
        "nccl_ms": nccl_ms, "dispatch_ms": ours_ms,
        "nccl_GBps": remote_bytes / nccl_ms / 1e6, "dispatch_GBps": remote_bytes / ours_ms / 1e6,
        "dispatch_over_nccl": nccl_ms / ours_ms,
    }  # fmt: skip


def read_metrics(work: Path, name: str) -> list[dict]:
    path = work / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def compare(run: list[dict], ref: list[dict], key: str = "lm_loss") -> dict:
    ref_by_step = {r["step"]: r[key] for r in ref}
    diffs = [
        (r["step"], abs(r[key] - ref_by_step[r["step"]]), ref_by_step[r["step"]])
        for r in run
        if r["step"] in ref_by_step
    ]
    if not diffs:
        return {"steps": 0}
    step, worst, value = max(diffs, key=lambda d: d[1] / abs(d[2]))
    return {
        "steps": len(diffs), "first_step": diffs[0][0], "last_step": diffs[-1][0],
        "max_abs_diff": max(d[1] for d in diffs), "max_rel_diff": worst / abs(value), "worst_step": step,
        "first_step_rel_diff": diffs[0][1] / abs(diffs[0][2]),
    }  # fmt: skip


def step_stats(records: list[dict]) -> dict:
    """Median step time and tokens/s over the steps after the first two (warm-up)."""
    timed = [r for r in records if r["step"] > 2] or records
    if not timed:
        return {}
    return {
        "steps_timed": len(timed),
        "median_step_s": statistics.median(r["step_seconds"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "peak_mem_gib": max(r["peak_mem_gib"] for r in timed),
    }


def phase_report(args) -> dict:
    work = Path(args.work)
    report = {
        "device": args.device,
        "date": time.strftime("%Y-%m-%d"),
        "commit": args.commit,
        "equivalence": {},
    }
    for phase in ("single", "multi"):
        path = work / f"{phase}.json"
        report[phase] = json.loads(path.read_text()) if path.exists() else {"error": "phase did not finish"}
    ref = read_metrics(work, "reference")
    report["reference_lm_loss"] = [r["lm_loss"] for r in ref]
    layouts = LAYOUTS if args.device == "cuda" else CPU_LAYOUTS
    resumes = RESUMES if args.device == "cuda" else CPU_RESUMES
    for name in [*layouts, *resumes]:
        run = read_metrics(work, name)
        entry = {key: compare(run, ref, key) for key in ("lm_loss", "mtp_loss", "grad_norm")}
        entry["curve"] = [r["lm_loss"] for r in run]
        if name in resumes:
            entry["vs_saved_layout"] = compare(run, read_metrics(work, resumes[name][0]))
        report["equivalence"][name] = entry
    one = step_stats(read_metrics(work, "throughput_1gpu"))
    report["throughput"] = {"1gpu": one}
    for name in ("dp2", "ep2"):
        two = step_stats(read_metrics(work, f"throughput_2gpu_{name}"))
        if one and two:
            two["weak_scaling_efficiency"] = two["tokens_per_s"] / (2 * one["tokens_per_s"])
        report["throughput"][f"2gpu_{name}"] = two
    report["all_to_all"] = report["multi"].get("all_to_all") if isinstance(report["multi"], dict) else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    print(summary_table(report), flush=True)
    return report


def summary_table(report: dict) -> str:
    lines = ["| run | steps | lm_loss max rel diff | at step | mtp max rel diff | grad_norm max rel diff |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in report["equivalence"].items():
        lm, mtp, gn = e["lm_loss"], e["mtp_loss"], e["grad_norm"]
        if not lm.get("steps"):
            lines.append(f"| {name} | 0 | not run | | | |")
            continue
        steps = f"{lm['first_step']}-{lm['last_step']}"
        lines.append(
            f"| {name} | {steps} | {lm['max_rel_diff']:.2e} | {lm['worst_step']} | "
            f"{mtp.get('max_rel_diff', float('nan')):.2e} | {gn.get('max_rel_diff', float('nan')):.2e} |"
        )
    for name, t in report["throughput"].items():
        if t:
            eff = t.get("weak_scaling_efficiency")
            lines.append(
                f"throughput {name}: {t['tokens_per_s']:,.0f} tokens/s, step {t['median_step_s']:.3f} s, "
                f"peak {t['peak_mem_gib']:.1f} GiB" + (f", weak-scaling efficiency {eff:.1%}" if eff else "")
            )
    a2a = report.get("all_to_all")
    if a2a and "nccl_ms" in a2a:
        lines.append(
            f"all-to-all EP={a2a['ep']}: nccl {a2a['nccl_ms']:.3f} ms ({a2a['nccl_GBps']:.1f} GB/s), "
            f"dispatcher {a2a['dispatch_ms']:.3f} ms ({a2a['dispatch_GBps']:.1f} GB/s), "
            f"ratio {a2a['dispatch_over_nccl']:.1%}"
        )
    return "\n".join(lines)


def phase_all(args) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env[name] = "0" if name == "NCCL_NVLS_ENABLE" else "1"  # NVLink multicast stays off
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    common = ["--device", args.device, "--data", args.data, "--work", args.work, "--out", args.out]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    single_env = {**env, "CUDA_VISIBLE_DEVICES": "0"} if args.device == "cuda" else env
    log("phase single")
    subprocess.run([sys.executable, __file__, "single", *common], env=single_env, timeout=args.phase_timeout)
    log("phase multi")
    port = str(29500 + os.getpid() % 1000)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    try:
        subprocess.run([*torchrun, __file__, "multi", *common], env=env, timeout=args.phase_timeout)
    except subprocess.TimeoutExpired:
        log("phase multi timed out")
    log("report")
    phase_report(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["all", "single", "multi", "report"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--data", required=True, help="a preprocessed dataset directory")
    parser.add_argument("--work", default="/tmp/multi_gpu", help="run directories (checkpoints, metrics)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/multi_gpu"))
    parser.add_argument("--commit", default=os.environ.get("COMMIT", ""))
    parser.add_argument("--phase-timeout", type=int, default=400)
    args = parser.parse_args(argv)
    {"all": phase_all, "single": phase_single, "multi": phase_multi, "report": phase_report}[args.phase](args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
