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
    return gpu_and_host_ms(fn, warmup, iters)[0]


def gpu_and_host_ms(fn, warmup: int = 5, iters: int = 20) -> tuple[float, float]:
    """On a GPU, per call: the GPU's milliseconds (`iters` calls queued back to back between two CUDA
    events) and the host's (the wall time to queue them). Where the two are equal the calls are
    host-bound: the GPU waited for the launches."""
    for _ in range(warmup):
        fn()
    if dist.is_initialized():
        dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - host) * 1e3 / iters
    end.synchronize()
    return start.elapsed_time(end) / iters, host
