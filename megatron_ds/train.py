"""The training loop: one loop for CPU and GPU, read top to bottom.

Per optimizer step: pull the micro-batches of this rank's share of the global batch, run forward
and backward on each (through Megatron-Core's pipeline schedule when the model is pipelined),
reduce gradients over data-parallel replicas, clip, step AdamW (our ZeRO-1 backend, or
Megatron-Core's DDP and distributed optimizer on GPUs), update the MoE balance biases from the
step's global expert loads, log, and checkpoint when due or when the job is told to stop.
"""

import contextlib
import gc
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline import build_loader
from megatron_ds import schedules
from megatron_ds.checkpoint import Checkpointer, model_tensors
from megatron_ds.config import Config, ConfigError, config_to_dict, config_to_yaml
from megatron_ds.flops import training_flops_per_token
from megatron_ds.metrics import MetricsLogger, NullLogger, peak_memory_gib, peak_tflops
from megatron_ds.micro_batches import GraphedMicroBatches, forward_backward
from megatron_ds.model.moe import BalanceLossGrad, moe_gates, update_expert_bias
from megatron_ds.optim import ZeroOneOptimizer
from megatron_ds.precision import check_precision, forward_context
from parallel.data_parallel import gradient_groups_from_parallel_state
from parallel.expert_parallel import dispatch_metrics
from parallel.groups import initialize_groups
from parallel.launcher import init_distributed
from parallel.pipeline_schedule import PipelineSchedule, build_pipeline_model

EXIT_REQUEUE = 75  # stopped by SIGTERM/SIGUSR1 after saving: requeue the job to continue
EXIT_DIVERGED = 3  # too many consecutive non-finite steps: saved, stopped for a human to look


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens consumed by all ranks
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0


class StopRequest:
    """Remembers SIGTERM/SIGUSR1 so the loop can finish its step, save, and exit cleanly."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device) -> bool:
        """True on every rank once any rank was signalled, so all stop at the same step."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class PythonGC:
    """Python's garbage collector, run between optimizer steps instead of wherever a step's allocations
    cross its threshold.

    Left automatic, it stops the host mid-step to walk the tracked objects, a longer stop the more
    objects live (FP8's per-expert quantized weights add thousands per step): a host-bound step waits
    that long, and each rank stops at its own moment. Here the collector is off for the run and
    collects the young generations every `interval` steps, as torchtitan's gc_freq and Megatron-LM's
    manual GC do, and every generation when a checkpoint is saved (a pause among slower ones), so that
    a run of weeks does not keep its old garbage; interval 0 leaves it automatic.
    """

    def __init__(self, interval: int):
        self.interval = interval

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        if self.interval > 0:
            gc.collect()  # start from a clean heap
            gc.disable()
        return self

    def __exit__(self, *exc) -> None:
        if self.was_enabled:
            gc.enable()

    def step(self, step: int) -> None:
        """After optimizer step `step`."""
        if self.interval > 0 and step % self.interval == 0:
            gc.collect(1)

    def saved(self) -> None:
        """After a checkpoint save."""
        if self.interval > 0:
            gc.collect()


def _setup_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _all_mean(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
        values /= dist.get_world_size(group)
    return values


def build_optimizer(cfg: Config, model, chunks, device: torch.device, world_size: int):
    """The optimizer backend train.optimizer_impl names (see config/schema.py)."""
    impl = cfg.train.optimizer_impl
    if impl == "auto":
        impl = "megatron" if device.type == "cuda" else "zero1"
    if impl == "zero1":
        return ZeroOneOptimizer(model, cfg, world_size)
    if device.type != "cuda":
        raise ConfigError(
            "train.optimizer_impl=megatron runs Megatron-Core's DDP and distributed optimizer, which need "
            "CUDA GPUs; on CPUs set train.optimizer_impl=zero1 (or auto)"
        )
    from parallel.megatron_optimizer import MegatronOptimizer

    return MegatronOptimizer(model, chunks, cfg)


def _total_steps(cfg: Config, granularity: int) -> int:
    """Steps until train.steps or train.train_tokens, whichever comes first (ramp-up included)."""
    t = cfg.train
    steps, tokens = 0, 0
    while tokens < t.train_tokens and (t.steps == 0 or steps < t.steps):
        tokens += schedules.global_batch_size(t, tokens, granularity) * t.seq_len
        steps += 1
        if t.steps == 0 and steps > 10_000_000:
            break
    return steps


def train(cfg: Config, run_dir: Path) -> int:
    """Run (or resume) training in RUN_DIR; returns the process exit code."""
    with PythonGC(cfg.train.gc_interval) as python_gc:
        return _train(cfg, run_dir, python_gc)


def _train(cfg: Config, run_dir: Path, python_gc: PythonGC) -> int:
    from megatron.core import parallel_state as ps

    if cfg.parallel.pipeline > 1 and not torch.cuda.is_available():
        raise ConfigError(
            "parallel.pipeline > 1 runs through Megatron-Core's pipeline schedules, which allocate on CUDA "
            "GPUs only; on CPUs set parallel.pipeline=1"
        )
    if cfg.train.cuda_graphs and not torch.cuda.is_available():
        raise ConfigError(
            "train.cuda_graphs replays the step from CUDA graphs, on CUDA GPUs only: on CPUs set "
            "train.cuda_graphs=false"
        )
    launch = init_distributed()
    dp_size = initialize_groups(cfg).data
    dp_group, dp_rank = gradient_groups_from_parallel_state().data, ps.get_data_parallel_rank()
    device = _setup_device(launch.local_rank)
    check_precision(cfg, device)
    rank0 = launch.rank == 0
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    run_dir.mkdir(parents=True, exist_ok=True)
    if rank0:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    t = cfg.train
    model, chunks = build_pipeline_model(cfg, device)  # chunks: this rank's pipeline stages
    context = partial(forward_context, cfg, dp_group)
    if cfg.parallel.pipeline > 1:  # Megatron-Core's 1F1B, interleaved with parallel.virtual_pipeline > 1
        run_micro_batches = PipelineSchedule(model, chunks, cfg, device, context)
    elif t.cuda_graphs:
        run_micro_batches = GraphedMicroBatches(
            model, cfg, device, context, log=lambda text: logger.message(text)
        )
    else:
        run_micro_batches = partial(forward_backward, model, cfg, device, context=context)
    optimizer = build_optimizer(cfg, model, chunks, device, launch.world_size)
    fp8_weights = None
    if cfg.precision.fp8 != "none":
        from parallel.transformer_engine import FP8WeightCache

        fp8_weights = FP8WeightCache(model)  # quantized once per step, not per micro-batch
    loader = build_loader(
        cfg.data, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
        dp_rank=dp_rank, dp_size=dp_size, seed=t.seed,
    )  # fmt: skip
    state = TrainState()
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    tensors = {**model_tensors(model), **optimizer.state_tensors()}
    resume_from = Path(cfg.checkpoint.load) if cfg.checkpoint.load else checkpointer.latest()
    if resume_from is not None:
        extra = checkpointer.load(resume_from, tensors, config_to_dict(cfg))
        optimizer.loaded()
        state = TrainState(**extra["train_state"])
        if extra.get("data") is not None:
            loader.load_state_dict(extra["data"])

    granularity = t.micro_batch_size * dp_size
    total_steps = _total_steps(cfg, granularity)
    flops_per_token = training_flops_per_token(cfg.model, t.seq_len)
    peak = peak_tflops(device) * launch.world_size
    if rank0:
        logger = MetricsLogger(
            run_dir, total_steps, state.step, cfg.logging.tensorboard, cfg.logging.progress_bar
        )
    else:
        logger = NullLogger()
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {state.step}")
    if state.step >= total_steps:
        logger.message(f"nothing to do: at step {state.step} of {total_steps}; raise train.steps to go on")
    stop = StopRequest()
    batches = iter(loader)
    model.train()
    run_start, start_tokens, exit_code = time.perf_counter(), state.tokens, 0
    saved_step = state.step if resume_from is not None else None
    record: dict = {}

    def save() -> None:
        nonlocal saved_step
        data_states = [None] * dp_size
        if dp_size > 1:
            dist.all_gather_object(data_states, loader.state_dict(), group=dp_group)
        else:
            data_states = [loader.state_dict()]
        extra = {
            "train_state": asdict(state),
            "data": type(loader).merge_states(data_states),
            "config": config_to_dict(cfg),
        }
        checkpointer.save(state.step, tensors, extra)
        python_gc.saved()
        saved_step = state.step
        logger.message(f"saved checkpoint at step {state.step}")

    while state.step < total_steps:
        step_start = time.perf_counter()
        batch_size = schedules.global_batch_size(t, state.tokens, granularity)
        n_micro = batch_size // granularity
        lr = schedules.learning_rate(t, state.step, state.tokens)
        mtp_weight = schedules.mtp_loss_weight(t, state.tokens)
        BalanceLossGrad.scale = 1.0 / n_micro

        with fp8_weights.step(n_micro) if fp8_weights is not None else contextlib.nullcontext():
            losses = run_micro_batches(batches, n_micro, mtp_weight)  # total, lm, mtp, balance
        grad_norm = optimizer.reduce_gradients()
        losses = _all_mean(losses, dp_group)
        finite = math.isfinite(grad_norm.item()) and math.isfinite(losses[0].item())
        if finite:
            optimizer.step(lr, grad_norm)
            state.consecutive_skips = 0
        else:
            state.skipped += 1
            state.consecutive_skips += 1
        optimizer.zero_grad()
        loads = update_expert_bias(model, schedules.bias_update_speed(t, state.tokens) if finite else 0.0,
                                   dp_group)  # fmt: skip
        for gate in moe_gates(model).values():
            gate.balance_loss_sum.zero_()

        state.step += 1
        python_gc.step(state.step)
        step_tokens = batch_size * t.seq_len
        state.tokens += step_tokens
        seconds = time.perf_counter() - step_start
        tflops = flops_per_token * step_tokens / seconds / 1e12
        record = {
            "step": state.step,
            "tokens": state.tokens,
            "loss": losses[0].item() + losses[3].item(),
            "lm_loss": losses[1].item(),
            "mtp_loss": losses[2].item(),
            "balance_loss": losses[3].item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "global_batch": batch_size,
            "tokens_per_s": step_tokens / seconds,
            "tflops": tflops,
            "mfu": tflops / peak,
            "skipped": state.skipped,
            "peak_mem_gib": peak_memory_gib(device),
            "step_seconds": seconds,
        }
        traffic = dispatch_metrics(model)
        if cfg.parallel.expert > 1:  # expert-parallel traffic of the step, summed over all ranks
            counts = torch.tensor(list(traffic.values()), dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            record.update(zip(traffic, counts.tolist()))
        for name, load in loads.items():
            record[f"expert_imbalance/{name.removesuffix('.ffn.gate')}"] = (load.max() / load.mean()).item()
        if state.step % cfg.logging.log_interval == 0 or state.step == total_steps:
            logger.log(record)

        if state.consecutive_skips >= t.max_consecutive_skips:
            logger.message(
                f"stopping: {state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                f"(last loss {losses[0].item()}, grad norm {grad_norm.item()}); saving for inspection. "
                "Lower train.lr or check the data around this step."
            )
            save()
            exit_code = EXIT_DIVERGED
            break
        if stop.agreed(device):
            logger.message(f"signal received: saving at step {state.step} and exiting with {EXIT_REQUEUE}")
            save()
            exit_code = EXIT_REQUEUE
            break
        if checkpointer.due(state.step):
            save()
    else:
        if cfg.checkpoint.save_on_exit and saved_step != state.step:
            save()

    checkpointer.wait()
    elapsed = time.perf_counter() - run_start
    if rank0:
        summary = {
            "status": {0: "completed", EXIT_REQUEUE: "requeue", EXIT_DIVERGED: "diverged"}[exit_code],
            "steps": state.step,
            "tokens": state.tokens,
            "seconds": elapsed,
            "tokens_per_s": (state.tokens - start_tokens) / elapsed,
            "mfu": record.get("mfu", 0.0),
            "final_loss": record.get("loss"),
            "skipped_steps": state.skipped,
            "world_size": launch.world_size,
            "layout": {
                "tp": cfg.parallel.tensor,
                "pp": cfg.parallel.pipeline,
                "ep": cfg.parallel.expert,
                "dp": dp_size,
            },  # fmt: skip
            "checkpoint": str(checkpointer.latest() or ""),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.close()
        print(_summary_text(summary), flush=True)
    return exit_code


def _summary_text(s: dict) -> str:
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    return (
        f"{s['status']}: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f} s "
        f"({s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.1f}%), final loss {loss}, "
        f"checkpoint {s['checkpoint'] or 'none'}"
    )
