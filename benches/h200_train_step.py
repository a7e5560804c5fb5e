"""Full training step (forward, backward, clip, AdamW) on one H200: ours vs Megatron-Core's GPTModel.

Both models train through the same optimizer: Megatron-Core's DDP and distributed optimizer (fp32
grad buffers into which TE's layers accumulate their weight gradients, fp32 master weights, the
preset's moments: BF16 as the report trains) in its precision-aware mode, each shard stepped by
parallel.fused_adamw, built by parallel.megatron_optimizer exactly as `mds train` builds it on GPUs.

    python benches/h200_train_step.py --presets dsv3-bench dsv3-slice --out $OUT

Every configuration (system x preset x micro-batch x precision) runs in its own process: memory left
by one ~5B-parameter model runs the next out of memory. Sequence 4096, random token ids (throughput
does not depend on the text), the same batches for both systems. Model TFLOP/s for BOTH systems
come from megatron_ds.flops.training_flops_per_token (3 x forward matmul and attention FLOPs,
no recomputation); MFU is against the 790 TFLOP/s bf16 matmul measured on this H200.
Also records the optimizer's share of the step (gradient reduction, clip, AdamW, and for ours the
MoE bias update). Python's garbage collector runs as `mds train` runs it for both systems
(megatron_ds.train.PythonGC, train.gc_interval; --gc-interval 0 leaves it automatic), and the time
its collections stopped the host is recorded per step.
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEAK_TFLOPS = 790.0


# Kernel names by kind, first match wins: the two systems run the same cuBLAS, CUTLASS and cuDNN
# kernels for their matrix products and attention, and the same AdamW and gradient-norm kernels.
KERNEL_KINDS = {
    "GEMM": re.compile(r"nvjet|cutlass|gemm|Gemm|xmma"),
    "attention": re.compile(r"sdpa|flash|fmha|cudnn"),
    "AdamW + gradient norm": re.compile(r"rsub_sqrt|l2norm"),
}


def kernel_categories(events) -> str:
    """One line per kind of kernel: its GPU milliseconds in the profiled step, and the rest's."""
    totals = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in events:
        kind = next((k for k, pattern in KERNEL_KINDS.items() if pattern.search(event.key)), "other")
        totals[kind] += event.self_device_time_total / 1e3
    totals["total"] = sum(totals.values())
    return "\n".join(f"{kind}: {ms:.1f}" for kind, ms in totals.items())


def gpu_idle(kineto_events, largest: int = 12) -> str:
    """When the GPU ran nothing in the profiled step: the gaps between its kernels and copies (all
    streams merged), in total and the largest, each with its start (ms into the step) and the kernels
    on either side. Between kernels queued back to back the GPU waits only a few microseconds; a
    longer gap is the GPU waiting for the host (a synchronisation, or launches slower than the work)."""
    from torch.autograd import DeviceType

    work = sorted(
        (e.start_ns(), e.end_ns(), e.name()) for e in kineto_events if e.device_type() == DeviceType.CUDA
    )
    if not work:
        return "no GPU work recorded"
    gaps, busy_until, last = [], work[0][1], work[0][2]
    for start, end, name in work[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, busy_until, last, name))
        if end > busy_until:
            busy_until, last = end, name
    span = busy_until - work[0][0]
    lines = [
        f"GPU busy span {span / 1e6:.1f} ms, idle {sum(g[0] for g in gaps) / 1e6:.1f} ms in {len(gaps)} gaps "
        f"({sum(g[0] for g in gaps if g[0] > 20_000) / 1e6:.1f} ms in gaps over 20 us)",
        "| idle ms | at ms | last kernel before | first kernel after |",
        "|---|---|---|---|",
    ]
    for length, at, before, after in sorted(gaps, reverse=True)[:largest]:
        lines.append(f"| {length / 1e6:.3f} | {(at - work[0][0]) / 1e6:.1f} | {before[:60]} | {after[:60]} |")
    return "\n".join(lines)


class CollectorPauses:
    """Seconds Python's garbage collector held the host, summed since the last `take`."""

    def __init__(self):
        self.total, self._start = 0.0, 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


def eager_step(model, cfg, system: str):
    """Forward and backward of one micro-batch; returns the loss."""
    from benches.h200_models import mcore_loss, ours_loss

    loss_fn = ours_loss if system == "ours" else mcore_loss

    def forward_backward(tokens):
        loss = loss_fn(model, cfg, tokens)
        loss.backward()
        return loss

    return forward_backward


def graphed_step(model, cfg):
    """eager_step for ours under train.cuda_graphs, through the training loop's GraphedMicroBatches:
    its first steps eager, then replays."""
    from functools import partial

    from megatron_ds.micro_batches import GraphedMicroBatches
    from megatron_ds.precision import forward_context

    graphed = GraphedMicroBatches(model, cfg, "cuda", partial(forward_context, cfg))
    return lambda tokens: graphed(iter([{"tokens": tokens}]), 1, cfg.train.mtp_loss_weight)[0]


def measure(system: str, preset: str, micro_batch: int, fp8: str, *args, gc_interval: int = 0) -> dict:
    """One configuration's steps (and profiles), Python's collector run as `mds train` runs it."""
    from megatron_ds.train import PythonGC

    with PythonGC(gc_interval) as python_gc:
        return _measure(python_gc, system, preset, micro_batch, fp8, *args)


def _measure(
    python_gc,
    system: str,
    preset: str,
    micro_batch: int,
    fp8: str,
    warmup: int,
    steps: int,
    profile: str = "",
    overrides: tuple[str, ...] = (),
) -> dict:
    import torch

    from benches.h200_models import bench_config, build_mcore, build_ours, init_single_process
    from megatron_ds.flops import training_flops_per_token
    from megatron_ds.model.moe import update_expert_bias
    from parallel.megatron_optimizer import MegatronOptimizer

    init_single_process()
    torch.manual_seed(0)
    cfg = bench_config(preset, micro_batch, fp8, overrides=overrides)
    model = build_ours(cfg) if system == "ours" else build_mcore(cfg)
    # Before the optimizer: under CUDA graphs, DDP's hooks must be made on the graphs' stream.
    forward_backward = graphed_step(model, cfg) if cfg.train.cuda_graphs else eager_step(model, cfg, system)
    optimizer = MegatronOptimizer(model, [model], cfg)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device="cuda").manual_seed(0)
    seq = cfg.train.seq_len
    batches = [
        torch.randint(0, cfg.model.vocab_size, (micro_batch, seq + 1), device="cuda", generator=gen)
        for _ in range(4)
    ]
    step_s, opt_s, gc_s, losses = [], [], [], []
    pauses = CollectorPauses()
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        pauses.take()
        t0 = time.perf_counter()
        loss = forward_backward(batches[i % len(batches)])
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        optimizer.step(1e-4, optimizer.reduce_gradients())
        optimizer.zero_grad()
        if system == "ours":
            update_expert_bias(model, cfg.train.bias_update_speed)
        python_gc.step(i + 1)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
            gc_s.append(pauses.take())
    if profile:  # one more step under torch.profiler: the kernels that take the GPU's time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        def one_step() -> None:
            forward_backward(batches[0])
            optimizer.step(1e-4, optimizer.reduce_gradients())
            optimizer.zero_grad()
            torch.cuda.synchronize()

        with profiler(activities=[ProfilerActivity.CUDA]) as prof:
            one_step()
        # Wide names: the elementwise kernels differ only in their template arguments.
        per_kernel = prof.key_averages()
        kernels = per_kernel.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=140)
        categories = kernel_categories(per_kernel)
        idle = gpu_idle(prof.profiler.kineto_results.events())
        # The operators behind those kernels, by input shapes and dtypes (which add is which).
        with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            one_step()
        ops = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_device_time_total", row_limit=30, max_name_column_width=50,
            max_shapes_column_width=140,
        )  # fmt: skip
        # The source lines that called them (forward and custom-function operators; autograd's own
        # backward operators have no Python stack and group by name).
        with profiler(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True,
            experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True),  # keeps the stacks
        ) as prof:  # fmt: skip
            one_step()
        sources = prof.key_averages(group_by_stack_n=6).table(
            sort_by="self_device_time_total", row_limit=40, max_name_column_width=50, max_src_column_width=110
        )
        # And where the host's time goes in one more step (a host-bound step is as long as this).
        import cProfile
        import io
        import pstats

        with cProfile.Profile() as host:
            one_step()
        functions = io.StringIO()
        pstats.Stats(host, stream=functions).sort_stats("tottime").print_stats(30)
        with open(profile, "a") as f:
            f.write(f"\n## {system} {' '.join(overrides)} {preset} mb{micro_batch} {fp8}\n{kernels}\n")
            f.write(f"\n### kernel time by kind (ms)\n{categories}\n")
            f.write(f"\n### GPU idle between kernels\n{idle}\n")
            f.write(f"\n### operators by input shape\n{ops}\n")
            f.write(f"\n### operators by calling source line\n{sources}\n")
            f.write(f"\n### host functions by own time\n{functions.getvalue()}\n")
    tokens = micro_batch * seq
    seconds = statistics.median(step_s)
    tflops = training_flops_per_token(cfg.model, seq) * tokens / seconds / 1e12
    return {
        "system": system, "overrides": list(overrides), "preset": preset, "micro_batch": micro_batch,
        "precision": fp8 if fp8 != "none" else "bf16", "step_ms": 1e3 * seconds,
        "moments": "bf16" if cfg.precision.bf16_optimizer_moments else "fp32",
        "tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / PEAK_TFLOPS,
        "optimizer_ms": 1e3 * statistics.median(opt_s), "optimizer_share": statistics.median(opt_s) / seconds,
        "step_ms_each": [round(1e3 * t, 1) for t in step_s],  # the spread: host-bound steps vary
        "optimizer_ms_each": [round(1e3 * t, 1) for t in opt_s],
        "gc_interval": python_gc.interval, "gc_ms_each": [round(1e3 * t, 1) for t in gc_s],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "params": n_params, "loss": losses[-1],
        # times the allocator ran out, freed its cache and retried: each one waits for the GPU
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
    }  # fmt: skip


def run_all(args) -> list[dict]:
    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "h200_train_step.jsonl", "a")  # noqa: SIM115
    for preset in args.presets:
        for fp8 in args.precisions:
            for micro_batch in args.micro_batches:
                for system in args.systems:
                    cmd = [sys.executable, __file__, "--one", system, preset, str(micro_batch), fp8,
                           "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
                    if args.profile:
                        cmd += ["--profile-file", str(out / "h200_train_step_profiles.txt")]
                    cmd += ["--gc-interval", str(args.gc_interval)]
                    if system == "ours" and args.ours_overrides:
                        cmd += ["--ours-overrides", *args.ours_overrides]
                    start = time.perf_counter()
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if lines:
                        result = json.loads(lines[-1][len("RESULT ") :])
                    else:
                        tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
                        result = {"system": system, "preset": preset, "micro_batch": micro_batch,
                                  "precision": fp8 if fp8 != "none" else "bf16",
                                  "error": " | ".join(tail)}  # fmt: skip
                    result["wall_s"] = time.perf_counter() - start
                    print(json.dumps(result), flush=True)
                    log.write(json.dumps(result) + "\n")
                    log.flush()
                    results.append(result)
    return results


def table(results: list[dict]) -> str:
    rows = ["| preset | mb | precision | system | tokens/s | TFLOP/s | MFU | step ms | optimizer share "
            "| peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        system = " ".join([r["system"], *r.get("overrides", [])])
        if "error" in r:
            rows.append(f"| {r['preset']} | {r['micro_batch']} | {r['precision']} | {system} | error: "
                        f"{r['error'][-160:]} |||||")  # fmt: skip
            continue
        rows.append(
            f"| {r['preset']} | {r['micro_batch']} | {r['precision']} | {system} "
            f"| {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | {100 * r['mfu']:.1f}% | {r['step_ms']:.0f} "
            f"| {100 * r['optimizer_share']:.1f}% | "
            f"{r['peak_mem_gib']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    from megatron_ds.config.schema import TrainConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", nargs=4, metavar=("SYSTEM", "PRESET", "MICRO_BATCH", "FP8"))
    parser.add_argument("--presets", nargs="+", default=["dsv3-slice", "dsv3-bench"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["none", "blockwise"])
    parser.add_argument("--systems", nargs="+", default=["ours", "mcore"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)  # host-bound steps vary: take a median of many
    parser.add_argument("--timeout", type=int, default=150)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step each: kernels (each, by kind, by operator, by source line), the host",
    )
    parser.add_argument("--profile-file", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--ours-overrides", nargs="+", default=[], help="config overrides for ours: precision.expert_gemm=te"
    )
    parser.add_argument(
        "--gc-interval", type=int, default=TrainConfig().gc_interval,
        help="Python's garbage collector as `mds train` runs it (train.gc_interval); 0: automatic",
    )  # fmt: skip
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/h200"))
    args = parser.parse_args()
    if args.one:
        system, preset, micro_batch, fp8 = args.one
        result = measure(
            system, preset, int(micro_batch), fp8, args.warmup, args.steps, args.profile_file,
            tuple(args.ours_overrides), gc_interval=args.gc_interval,
        )  # fmt: skip
        print("RESULT " + json.dumps(result))
        return
    results = run_all(args)
    text = table(results)
    (Path(args.out) / "h200_train_step.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
