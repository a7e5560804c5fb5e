"""Tensor parallelism, applied to a built model from outside, with Megatron-Core's layers.

The plan is Megatron's for MLA and SwiGLU: the per-head projections (wq / wq_b, wkv_b) and the
FFN's w1, w3 are column-parallel, wo and w2 row-parallel; the embedding and output head are
vocab-parallel with vocab-parallel cross-entropy. The low-rank down-projections (wq_a, wkv_a),
norms, the router and the routed experts stay replicated: their inputs and outputs are whole on
every rank, and the column-parallel layers after them all-reduce their input gradients, so their
gradients come out complete without extra communication.
"""

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn

from megatron_ds.model.attention import MLA
from megatron_ds.model.init import mark_shard
from megatron_ds.model.norm import MLP
from megatron_ds.model.transformer import OutputHead, Transformer

COLUMN, ROW = "column", "row"
PLAN = {
    MLA: {"wq": COLUMN, "wq_b": COLUMN, "wkv_b": COLUMN, "wo": ROW},
    MLP: {"w1": COLUMN, "w3": COLUMN, "w2": ROW},
}


def _skip_init(weight: torch.Tensor) -> None:
    """Weights are filled later by megatron_ds.model.init, identically for every layout."""


class ColumnParallel(ColumnParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowParallel(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabParallelHead(OutputHead):
    """Output head whose logits are split over the vocabulary; the loss never gathers them."""

    def __init__(self, linear: ColumnParallel):
        nn.Module.__init__(self)
        self.linear = linear

    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits.float(), labels)


def megatron_config(tp_size: int, dtype: torch.dtype, device: torch.device) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        gradient_accumulation_fusion=False,
    )


def _column(linear: nn.Linear, config, group) -> ColumnParallel:
    layer = ColumnParallel(
        linear.in_features, linear.out_features, config=config, init_method=_skip_init,
        bias=False, gather_output=False, skip_bias_add=True, tp_group=group,
    )  # fmt: skip
    mark_shard(layer.weight, 0, group.rank() * layer.weight.size(0), linear.out_features, group)
    return layer


def _row(linear: nn.Linear, config, group) -> RowParallel:
    layer = RowParallel(
        linear.in_features, linear.out_features, config=config, init_method=_skip_init,
        bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=group,
    )  # fmt: skip
    mark_shard(layer.weight, 1, group.rank() * layer.weight.size(1), linear.in_features, group)
    return layer


def apply_tensor_parallel(model: Transformer, group, dtype: torch.dtype, device: torch.device) -> None:
    """Swap the model's projections for Megatron-Core's tensor-parallel layers over `group`."""
    config = megatron_config(group.size(), dtype, device)
    build = {COLUMN: _column, ROW: _row}
    for module in list(model.modules()):
        for name, style in PLAN.get(type(module), {}).items():
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                setattr(module, name, build[style](linear, config, group))
    if model.embed is not None:
        vocab, dim = model.embed.weight.shape
        model.embed = VocabParallelEmbedding(
            vocab, dim, init_method=_skip_init, config=config, tp_group=group
        )
        mark_shard(model.embed.weight, 0, group.rank() * model.embed.weight.size(0), vocab, group)
    if model.head is not None:
        model.head = VocabParallelHead(_column(model.head.linear, config, group))
