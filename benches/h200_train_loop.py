"""Training-loop figures on one GPU: the optimizer step's share of a training step, and the time an
asynchronous checkpoint save blocks the loop.

1. Optimizer share: `--preset` (dsv3-bench) in bf16 with the local backend, one optimizer step per
   global batch of the preset (train.global_batch_size micro-batches of 1 x seq 4096 on one GPU):
   forward+backward of every micro-batch, then the optimizer backend the training loop uses
   (`--optimizer-impl`: megatron = Megatron-Core DDP + distributed optimizer, zero1 = ours): gradient
   reduction, global-norm clip, AdamW with fp32 master weights and the preset's moments (BF16, as
   the report trains; fp32 with the override precision.bf16_optimizer_moments=false). Reports the
   median split over `--steps` steps after a warm-up, each step's gradient norm (whether the
   step clipped; the megatron backend folds the clip into its AdamW kernel), and, from two more steps
   with the GPU drained between them, the optimizer's phases: reduction + norm, clip + AdamW, zeroing.
2. Async save: megatron_ds.checkpoint.Checkpointer(async_save=True) saving model + optimizer state of
   a model cut to `--save-layers` layers (the full dsv3-bench state, ~79 GB, does not fit the 64 GB
   disk of the device machine twice); the blocking time is the GPU -> CPU snapshot (pinned buffers),
   reported with the checkpoint size so it scales to other sizes.

Each run measures one optimizer backend in its own process (a second model would not fit beside it):

    python3 benches/h200_train_loop.py --optimizer-impl megatron     # on the GPU machine; prints a table
    python3 benches/h200_train_loop.py --optimizer-impl megatron precision.bf16_optimizer_moments=false
    python3 benches/h200_train_loop.py --optimizer-impl zero1
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _cfg(preset: str, overrides: list[str]):
    from megatron_ds.config import load_config

    return load_config(
        preset, overrides=["precision.params_dtype=bf16", "train.micro_batch_size=1", *overrides]
    )


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _model_and_optimizer(cfg, device: str):
    import torch

    from megatron_ds.train import build_optimizer
    from parallel.groups import initialize_groups
    from parallel.parallelize import build_model

    initialize_groups(cfg)
    model = build_model(cfg, device)
    return model, build_optimizer(cfg, model, [model], torch.device(device), 1)


def optimizer_share(preset: str, steps: int, device: str, overrides: list[str]) -> dict:
    import torch

    cfg = _cfg(preset, overrides)
    model, optimizer = _model_and_optimizer(cfg, device)
    n_micro = cfg.train.global_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1), device=device)

    def forward_backward() -> None:
        for _ in range(n_micro):
            out = model(tokens[:, :-1], labels=tokens[:, 1:])
            ((out.lm_loss + 0.3 * out.mtp_loss) / n_micro).backward()

    splits = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        forward_backward()
        _sync(device)
        middle = time.perf_counter()
        grad_norm = optimizer.reduce_gradients()
        optimizer.step(1e-4, grad_norm)
        optimizer.zero_grad()
        _sync(device)
        end = time.perf_counter()
        if step:  # the first step warms up kernels and allocates optimizer state
            splits.append((middle - start, end - middle, float(grad_norm)))
    phases = []  # two more steps, the GPU drained between the optimizer's phases: where its time goes
    for _ in range(2):
        forward_backward()
        durations = []
        for phase in (
            lambda: grad_norm.copy_(optimizer.reduce_gradients()),  # reduction + norm
            lambda: optimizer.step(1e-4, grad_norm),  # clip + AdamW + parameter update
            optimizer.zero_grad,
        ):
            _sync(device)
            start = time.perf_counter()
            phase()
            _sync(device)
            durations.append(time.perf_counter() - start)
        phases.append(durations)
    forward_backward_s = statistics.median(s[0] for s in splits)
    optim = statistics.median(s[1] for s in splits)
    result = {
        "preset": preset,
        "optimizer_impl": cfg.train.optimizer_impl,
        "moments": "bf16" if cfg.precision.bf16_optimizer_moments else "fp32",
        "precision_aware": getattr(optimizer, "precision_aware", False),
        # whether the steps clipped (the megatron backend folds the clip into its AdamW kernel)
        "grad_norms": ", ".join(f"{s[2]:.3g}" for s in splits),
        "grad_clip": cfg.train.grad_clip,
        "micro_batches_per_step": n_micro,
        "forward_backward_s": forward_backward_s,
        "optimizer_s": optim,
        "reduce_and_norm_s": statistics.median(p[0] for p in phases),
        "clip_and_adamw_s": statistics.median(p[1] for p in phases),
        "zero_grad_s": statistics.median(p[2] for p in phases),
        "optimizer_share": optim / (forward_backward_s + optim),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
    }
    return result


def async_save_blocking(preset: str, layers: int, device: str, overrides: list[str]) -> dict:
    from megatron_ds.checkpoint import Checkpointer, model_tensors
    from megatron_ds.config import CheckpointConfig

    cfg = _cfg(preset, [*overrides, f"model.n_layers={layers}"])
    model, optimizer = _model_and_optimizer(cfg, device)
    tensors = {**model_tensors(model), **optimizer.state_tensors()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    result = {"save_layers": layers, "checkpoint_gib": size / 2**30}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as root:
        checkpointer = Checkpointer(Path(root), CheckpointConfig(async_save=True, keep_last=1))
        for step in (1, 2):  # the first save allocates the CPU snapshot buffers, the second reuses them
            _sync(device)
            start = time.perf_counter()
            checkpointer.save(step, tensors, {"train_state": {"step": step}})
            blocking = time.perf_counter() - start
            checkpointer.wait()
            result[f"save{step}_blocking_s"] = blocking
            result[f"save{step}_total_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-layers", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--optimizer-impl", default="megatron", choices=["megatron", "zero1"])
    parser.add_argument("--measure", nargs="+", default=["share", "save"], choices=["share", "save"])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. for a CPU smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/h200"))
    args = parser.parse_args()
    from parallel.launcher import init_distributed

    init_distributed()  # one process: NCCL on a GPU, gloo on a CPU
    overrides = [f"train.optimizer_impl={args.optimizer_impl}", *args.overrides]
    result = {}
    if "share" in args.measure:
        result.update(optimizer_share(args.preset, args.steps, args.device, overrides))
    if "save" in args.measure:
        result.update(async_save_blocking(args.preset, args.save_layers, args.device, overrides))
    print(f"{'figure':42} value")
    for key, value in result.items():
        print(f"{key:42} {value:.4g}" if isinstance(value, float) else f"{key:42} {value}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    moments = f"_{result['moments']}_moments" if "moments" in result else ""
    name = f"h200_train_loop_{args.optimizer_impl}_{'_'.join(args.measure)}{moments}.json"
    (Path(args.out) / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
