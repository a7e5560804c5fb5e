"""Small fused kernels: a body compiled by Inductor on a CUDA GPU, run eagerly elsewhere.

Eager CPU keeps CI free of compilation; on the GPU eager would write and re-read every intermediate
(gathered rows, fp32 copies of bf16 tensors), which the compiled kernels keep in registers.
"""

import functools

import torch
from torch.utils._triton import has_triton


def run_fused(body, *args, dynamic: bool | None = False):
    """body(*args), compiled where Inductor can generate Triton for it (a CUDA device), eager elsewhere.

    The bodies are the insides of autograd Functions and never differentiated through, so tensors go
    in detached: guards on requires_grad or on nn.Parameter would otherwise compile a body again for
    the same shapes. Shapes are static, each new one compiled once into a kernel of its own, so a
    shape always runs the same kernel (a replay under recomputation gives the same bits). For a body
    whose sizes may change every step, dynamic=True compiles one kernel for all sizes, and
    dynamic=None is torch's automatic dynamic shapes: the first sizes static, one kernel for all
    sizes after the first change.
    """
    if compiles(args[0].device.type):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        return _compiled(body, dynamic)(*args)
    return body(*args)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate and compute softmaxes in: fp32, or the inputs' if wider."""
    return torch.promote_types(dtype, torch.float32)


@functools.cache
def compiles(device_type: str) -> bool:
    """Whether run_fused compiles on this device type."""
    return device_type == "cuda" and has_triton()


@functools.cache
def _compiled(body, dynamic: bool | None):
    return torch.compile(body, dynamic=dynamic)
