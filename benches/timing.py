"""Timing shared by the benchmark scripts."""

import statistics
import time

import torch
import torch.distributed as dist


def median_ms(fn, device: torch.device, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn() after `warmup` calls, synchronised across ranks and with the GPU."""
    samples = []
    for i in range(warmup + iters):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
