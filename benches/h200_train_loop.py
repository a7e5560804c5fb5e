"""Training-loop figures on one GPU: the optimizer step's share of a training step, and the time an
asynchronous checkpoint save blocks the loop.

1. Optimizer share: `--preset` (dsv3-bench) in bf16 with the local backend, one optimizer step per
   global batch of the preset (train.global_batch_size micro-batches of 1 x seq 4096 on one GPU):
   forward+backward of every micro-batch, then global-norm clip and ZeroAdamW (fp32 master weights
   and moments, multi-tensor kernels). Reports the median split over `--steps` steps after a warm-up.
2. Async save: megatron_ds.checkpoint.Checkpointer(async_save=True) saving model + optimizer state of
   a model cut to `--save-layers` layers (the full dsv3-bench state, ~79 GB, does not fit the 64 GB
   disk of the device machine twice); the blocking time is the GPU -> CPU snapshot, reported with the
   checkpoint size so it scales to other sizes.

    python3 benches/h200_train_loop.py                       # on the GPU machine; prints a table
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


def optimizer_share(preset: str, steps: int, device: str, overrides: list[str]) -> dict:
    import torch

    from megatron_ds.optim import ZeroAdamW, clip_gradients, global_grad_norm
    from parallel.parallelize import ModelGroups, build_model

    cfg = _cfg(preset, overrides)
    model = build_model(cfg, device, ModelGroups())
    optimizer = ZeroAdamW(model, cfg, lambda p: None)
    n_micro = cfg.train.global_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size, (1, cfg.train.seq_len + 1), device=device)
    splits = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_micro):
            out = model(tokens[:, :-1], labels=tokens[:, 1:])
            ((out.lm_loss + 0.3 * out.mtp_loss) / n_micro).backward()
        _sync(device)
        middle = time.perf_counter()
        norm = global_grad_norm(model, 1, 1)
        clip_gradients(model, norm, cfg.train.grad_clip)
        optimizer.step(1e-4)
        optimizer.zero_grad()
        _sync(device)
        end = time.perf_counter()
        if step:  # the first step warms up kernels and allocates optimizer state
            splits.append((middle - start, end - middle))
    forward_backward = statistics.median(s[0] for s in splits)
    optim = statistics.median(s[1] for s in splits)
    result = {
        "preset": preset,
        "micro_batches_per_step": n_micro,
        "forward_backward_s": forward_backward,
        "optimizer_s": optim,
        "optimizer_share": optim / (forward_backward + optim),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
    }
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def async_save_blocking(preset: str, layers: int, device: str, overrides: list[str]) -> dict:

    from megatron_ds.checkpoint import Checkpointer, model_tensors
    from megatron_ds.config import CheckpointConfig
    from megatron_ds.optim import ZeroAdamW
    from parallel.parallelize import ModelGroups, build_model

    cfg = _cfg(preset, [*overrides, f"model.n_layers={layers}"])
    model = build_model(cfg, device, ModelGroups())
    optimizer = ZeroAdamW(model, cfg, lambda p: None)
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
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. for a CPU smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/h200"))
    args = parser.parse_args()
    from parallel.launcher import init_distributed

    init_distributed()  # one process: NCCL on a GPU, gloo on a CPU
    result = {
        **optimizer_share(args.preset, args.steps, args.device, args.overrides),
        **async_save_blocking(args.preset, args.save_layers, args.device, args.overrides),
    }
    print(f"{'figure':42} value")
    for key, value in result.items():
        print(f"{key:42} {value:.4g}" if isinstance(value, float) else f"{key:42} {value}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "h200_train_loop.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
