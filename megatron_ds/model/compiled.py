"""Small fused kernels: a body compiled by Inductor on a CUDA GPU, run eagerly elsewhere.

Eager CPU keeps CI free of compilation; on the GPU eager would write and re-read every intermediate
(gathered rows, fp32 copies of bf16 tensors), which the compiled kernels keep in registers.
"""

import functools

import torch
from torch.utils._triton import has_triton


def run_fused(body, *args):
    """body(*args), compiled where Inductor can generate Triton for it (a CUDA device), eager elsewhere."""
    if compiles(args[0].device.type):
        return _compiled(body)(*args)
    return body(*args)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate and compute softmaxes in: fp32, or the inputs' if wider."""
    return torch.promote_types(dtype, torch.float32)


@functools.cache
def compiles(device_type: str) -> bool:
    """Whether run_fused compiles on this device type."""
    return device_type == "cuda" and has_triton()


@functools.cache
def _compiled(body):
    """Compiled for the first shapes it sees; a second set of shapes recompiles it once with dynamic
    sizes (torch's automatic dynamic shapes), e.g. the FP8 experts' padded rows on TE's split path,
    whose count changes every step."""
    return torch.compile(body)
