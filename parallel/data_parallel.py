"""Data-parallel gradient reduction for the CPU (gloo) backend.

Megatron-Core's DistributedDataParallel keeps its buffers on the GPU, so on CPUs the gradients are
reduced here, after backward, in one flat buffer per group:

* dense parameters (everything but the sharded routed experts) are replicated over the data-parallel
  group, whose ranks ran different micro-batches: average over it;
* the routed experts of an EP group are replicated over the expert-data-parallel group. Each token
  reached its expert exactly once from one of those ranks, so summing over that group gives the sum
  over all micro-batches; dividing by the *dense* DP size makes it the same average.

The result equals the single-process gradient of the mean loss over the global batch (micro-batches
of equal token counts), which the equivalence tests check.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_ds.model.init import EXPERT_SLICE_ATTR
from megatron_ds.model.moe import GroupedExperts


@dataclass
class GradientGroups:
    data: object = None  # dense data-parallel group (None: not split)
    expert_data: object = None  # expert-data-parallel group; None when the experts are not sharded


def gradient_groups_from_parallel_state() -> GradientGroups:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return GradientGroups()
    sharded = ps.get_expert_model_parallel_world_size() > 1
    return GradientGroups(
        data=ps.get_data_parallel_group(),
        expert_data=ps.get_expert_data_parallel_group() if sharded else None,
    )


def split_expert_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, routed-expert) parameters that require gradients."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    expert_ids |= {id(p) for p in model.parameters() if hasattr(p, EXPERT_SLICE_ATTR)}  # TE's experts
    dense, experts = [], []
    for param in model.parameters():
        if param.requires_grad:
            (experts if id(param) in expert_ids else dense).append(param)
    return dense, experts


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: GradientGroups) -> None:
    """Average the gradients over data-parallel ranks (see module doc). Collective over both groups."""
    dp_size = dist.get_world_size(groups.data) if groups.data is not None else 1
    dense, experts = split_expert_parameters(model)
    if groups.expert_data is None:
        dense, experts = dense + experts, []
    _all_reduce_scaled(dense, groups.data, dp_size)
    _all_reduce_scaled(experts, groups.expert_data, dp_size)


def _all_reduce_scaled(params: list[nn.Parameter], group, divisor: int) -> None:
    """Sum the gradients over `group` in one flat buffer per dtype and divide by `divisor`.

    A parameter without a gradient (an expert that got no tokens anywhere) counts as zero, so every
    rank takes part with buffers of the same layout.
    """
    if not params or (divisor == 1 and (group is None or dist.get_world_size(group) == 1)):
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = _flatten_dense_tensors(grads)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)
