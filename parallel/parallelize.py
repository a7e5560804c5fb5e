"""Build the model for this rank: define it, cut it, shard it, then materialise and initialise it.

The model is first defined on the meta device (free, even at 671B), so parallelisation only
ever allocates the shards this rank holds.
"""

from dataclasses import dataclass

import torch

from megatron_ds.config import Config
from megatron_ds.model.init import init_weights
from megatron_ds.model.moe import moe_gates
from megatron_ds.model.transformer import Transformer
from parallel.pipeline import cut_to_stage
from parallel.tensor_parallel import apply_tensor_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ModelGroups:
    """The process groups a model shard needs; None means the dimension is not split."""

    tensor: object = None
    expert: object = None
    pipeline_rank: int = 0


def groups_from_parallel_state() -> ModelGroups:
    """Read the groups from Megatron-Core's parallel_state, or none when it is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ModelGroups()
    return ModelGroups(
        tensor=ps.get_tensor_model_parallel_group(),
        expert=ps.get_expert_model_parallel_group(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
    )


def build_model(
    cfg: Config,
    device: torch.device | str = "cpu",
    groups: ModelGroups | None = None,
    initialize: bool = True,
) -> Transformer:
    """This rank's model (or pipeline stage): sharded, on the backend and dtype of the config, with
    the layout-independent initial weights, and selective recomputation applied. initialize=False
    leaves the weights as allocated, for a benchmark that fills them on the GPU itself (the
    layout-independent init draws on the CPU: minutes for billions of parameters)."""
    device = torch.device(device)
    groups = groups if groups is not None else groups_from_parallel_state()
    dtype = DTYPES[cfg.precision.params_dtype]
    with torch.device("meta"):
        model = Transformer(cfg.model)
    cut_to_stage(model, groups.pipeline_rank, cfg.parallel.pipeline, cfg.parallel.pipeline_layers)
    if groups.tensor is not None and groups.tensor.size() > 1:
        apply_tensor_parallel(model, groups.tensor, dtype, device)
    if groups.expert is not None and groups.expert.size() > 1:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, groups.expert, cfg)
    model.to_empty(device=device)
    if cfg.precision.linear_impl == "te":
        from parallel.transformer_engine import apply_transformer_engine

        apply_transformer_engine(model, cfg, groups.tensor)
    model.to(dtype)
    for gate in moe_gates(model).values():
        gate.float()  # the router stays in fp32 (report section 3.3)
    if initialize:
        init_weights(model, cfg.train.seed, cfg.model.init_std)
    if cfg.train.recompute:
        from parallel.recompute import apply_recompute

        apply_recompute(model, cfg)
    return model
