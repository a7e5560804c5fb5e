"""Expert parallelism, applied to a built (meta-device) model from outside.

Each MoE layer keeps only the routed experts of this EP rank, a contiguous block of the stacked
weights, and routes through an `AllToAllDispatcher` over the EP group. The router, shared experts
and every other weight are untouched. The expert -> EP rank -> node map follows from the
configuration: EP rank p holds experts [p L, (p + 1) L) and lives on node global_rank // gpus_per_node;
`parallel.groups` checks that each of the model's node blocks (the router's node limit) sits on one
physical node.
"""

import torch
import torch.distributed as dist
from torch import nn

from megatron_ds.config import Config
from megatron_ds.model.init import mark_shard
from megatron_ds.model.moe import GroupedExperts, MoE
from parallel.dispatcher import AllToAllDispatcher


class LocalExperts(GroupedExperts):
    """Experts [first, first + n_local) of n_experts, marked as that slice of the stacked weights.

    The marks are set again after every device or dtype move: materialising a meta parameter
    (`to_empty`) creates a new Parameter, which would drop them, and the layout-independent
    initialisation and checkpoint resharding read them.
    """

    def __init__(self, n_local: int, dim: int, inter_dim: int, first: int, n_experts: int, group):
        super().__init__(n_local, dim, inter_dim)
        self.first, self.n_experts, self.group = first, n_experts, group
        self._mark()

    def _mark(self) -> None:
        for param in (self.w1, self.w2, self.w3):
            mark_shard(param, 0, self.first, self.n_experts, self.group)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._mark()
        return self


def rank_nodes(group, gpus_per_node: int) -> list[int]:
    """The node of each rank of `group`, in group-rank order."""
    return [rank // gpus_per_node for rank in dist.get_process_group_ranks(group)]


def tensor_parallel_group(model: nn.Module):
    """The TP group the model was sharded with (Megatron-Core layers record it), or None."""
    for module in model.modules():
        group = getattr(module, "tp_group", None)
        if group is not None:
            return group
    return None


def apply_expert_parallel(model: nn.Module, group, cfg: Config, tensor_group=None) -> None:
    """Keep this EP rank's experts in every MoE layer and install the all-to-all dispatcher.

    tensor_group: the group across which the MoE input is replicated; by default the TP group of
    the model's tensor-parallel layers (apply_tensor_parallel runs first).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n_experts = cfg.model.n_routed_experts
    if n_experts % size:
        raise ValueError(f"model.n_routed_experts={n_experts} is not divisible by the EP group size {size}")
    n_local = n_experts // size
    first = rank * n_local
    tensor_group = tensor_group if tensor_group is not None else tensor_parallel_group(model)
    nodes = rank_nodes(group, cfg.parallel.gpus_per_node)
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        full = moe.experts
        with torch.device(full.w1.device):  # meta: to_empty materialises only the local experts
            moe.experts = LocalExperts(n_local, full.w1.size(1), full.w1.size(2), first, n_experts, group)
        moe.dispatcher = AllToAllDispatcher(
            group,
            n_experts,
            tensor_group=tensor_group,
            rank_nodes=nodes,
            fp8_payload=cfg.precision.fp8_dispatch,
        )


def dispatch_metrics(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """Token copies sent, and tokens / bytes that crossed node boundaries, summed over MoE layers."""
    totals = {"dispatch_tokens": 0, "cross_node_tokens": 0, "cross_node_bytes": 0}
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        stats = getattr(moe.dispatcher, "stats", None)
        if stats is None:
            continue
        totals["dispatch_tokens"] += int(stats.tokens)
        totals["cross_node_tokens"] += int(stats.cross_node_tokens)
        totals["cross_node_bytes"] += int(stats.cross_node_bytes)
        if reset:
            stats.tokens = stats.cross_node_tokens = stats.cross_node_bytes = 0
    return totals
