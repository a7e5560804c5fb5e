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


def per_call_ms(fn, device: torch.device, warmup: int = 5, iters: int = 20) -> float:
    """Milliseconds per call. On a GPU: `iters` calls queued back to back between two CUDA events, so
    launches overlap the GPU's work as they do in training; elsewhere: median_ms."""
    if device.type != "cuda":
        return median_ms(fn, device, warmup, iters)
    for _ in range(warmup):
        fn()
    if dist.is_initialized():
        dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
