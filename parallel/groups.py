"""The process-group layout: Megatron-Core's parallel_state with TP, PP, EP and DP, checked first.

The dense layers see the world as TP x DP x PP (TP fastest, so a TP group shares a node). The routed
experts see it as EP x expert-DP x PP with expert-TP 1: EP groups are runs of consecutive ranks, and
EP rank p holds experts [p L, (p + 1) L) of L = n_routed_experts / EP. Both grids are Megatron-Core's
(order tp-cp-ep-dp-pp); this module checks that a configuration fits the world and its nodes before
any group is built, with errors that say which sizes to change.
"""

from dataclasses import dataclass

import torch.distributed as dist

from megatron_ds.config import Config
from megatron_ds.config.validate import ConfigError, validate_world


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int  # TP size
    pipeline: int  # PP size
    expert: int  # EP size
    data: int  # DP size of the dense layers: how many different micro-batches run side by side
    expert_data: int  # DP size of the routed experts: replicas of each expert

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data


def expert_parallel_groups(cfg: Config, world_size: int) -> list[list[int]]:
    """Global ranks of every EP group, as Megatron-Core builds them (expert-TP 1)."""
    from megatron.core.parallel_state import RankGenerator

    p = cfg.parallel
    expert_data = world_size // (p.pipeline * p.expert)
    generator = RankGenerator(tp=1, ep=p.expert, dp=expert_data, pp=p.pipeline, cp=1, order="tp-cp-ep-dp-pp")
    return generator.get_ranks("ep")


def node_layout_errors(cfg: Config, world_size: int) -> list[str]:
    """Problems with how the layout falls onto nodes of parallel.gpus_per_node ranks."""
    p, m = cfg.parallel, cfg.model
    per_node = p.gpus_per_node
    errors = []
    if world_size > per_node and world_size % per_node:
        errors.append(
            f"world size {world_size} is not a whole number of nodes of parallel.gpus_per_node={per_node}; "
            f"launch a multiple of {per_node} ranks or correct parallel.gpus_per_node"
        )
    if p.tensor > 1 and per_node % p.tensor and world_size > p.tensor:
        errors.append(
            f"parallel.tensor={p.tensor} does not divide parallel.gpus_per_node={per_node}, so some TP "
            f"groups would span two nodes; choose a tensor-parallel size that divides {per_node}"
        )
    if errors or p.expert == 1 or m.n_layers == m.n_dense_layers:
        return errors
    experts_per_rank = m.n_routed_experts // p.expert
    experts_per_block = m.n_routed_experts // m.n_expert_nodes
    for ranks in expert_parallel_groups(cfg, world_size):
        nodes = sorted({rank // per_node for rank in ranks})
        for block in range(m.n_expert_nodes):
            first, last = block * experts_per_block, (block + 1) * experts_per_block - 1
            holders = ranks[first // experts_per_rank : last // experts_per_rank + 1]
            block_nodes = sorted({rank // per_node for rank in holders})
            if len(block_nodes) > 1:
                errors.append(
                    f"the router's node block {block} (experts {first}-{last} of model.n_expert_nodes="
                    f"{m.n_expert_nodes} blocks) would live on nodes {block_nodes} of the EP group {ranks}, "
                    f"so the node limit (model.max_nodes_per_token) would not bound the traffic; set "
                    f"model.n_expert_nodes to a multiple of {len(nodes)} (the nodes an EP group spans) or "
                    f"lower parallel.expert to at most {per_node * m.n_expert_nodes}"
                )
                return errors
    return errors


def check_layout(cfg: Config, world_size: int) -> ParallelLayout:
    """Validate the factorisation and the node layout; raises ConfigError naming what to change."""
    data = validate_world(cfg, world_size)
    errors = node_layout_errors(cfg, world_size)
    if errors:
        raise ConfigError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    p = cfg.parallel
    return ParallelLayout(p.tensor, p.pipeline, p.expert, data, world_size // (p.pipeline * p.expert))


def initialize_groups(cfg: Config, timeout_minutes: int = 30) -> ParallelLayout:
    """Build Megatron-Core's parallel_state for this configuration (torch.distributed must be up).

    A no-op when the same layout is already initialised; a different one is torn down first.
    """
    from megatron.core import parallel_state as ps

    layout = check_layout(cfg, dist.get_world_size())
    if ps.model_parallel_is_initialized():
        if current_layout() == layout:
            return layout
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes,
        # Under gloo every group already is a gloo group; the extra copies only cost start-up time.
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )
    return layout


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tensor=ps.get_tensor_model_parallel_world_size(),
        pipeline=ps.get_pipeline_model_parallel_world_size(),
        expert=ps.get_expert_model_parallel_world_size(),
        data=ps.get_data_parallel_world_size(),
        expert_data=ps.get_expert_data_parallel_world_size(),
    )
