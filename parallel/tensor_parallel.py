"""Tensor parallelism, applied to a built model from outside, with Megatron-Core's layers.

The plan is Megatron's for MLA and SwiGLU: the per-head projections (wq / wq_b, wkv_b) and the
FFN's w1, w3 are column-parallel, wo and w2 row-parallel; the embedding and output head are
vocab-parallel with vocab-parallel cross-entropy. The low-rank down-projections (wq_a, wkv_a),
norms, the router and the routed experts stay replicated: their inputs and outputs are whole on
every rank, and the column-parallel layers after them all-reduce their input gradients, so their
gradients come out complete without extra communication. The one exception is MLA's shared rope
key k^R: it comes out of wkv_a and goes straight into every head's attention, so each rank sees
only its own heads' share of its gradient; `SharedRopeKeyLinear` sums that share over the ranks.
"""

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.nn import functional as F

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


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward. (Megatron-Core's
    copy_to_tensor_model_parallel_region reduces a contiguous copy and returns the unreduced
    gradient when it is not contiguous, as a slice of a concatenation's gradient is.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def share_rope_key_gradient(kv: torch.Tensor, rope_dim: int, group) -> torch.Tensor:
    """wkv_a's output [c^KV; k^R] unchanged, with the gradient of k^R (the last rope_dim features)
    all-reduced over `group`; the latent part's gradient is already complete, as wkv_b is
    column-parallel."""
    latent, rope_key = kv.split([kv.size(-1) - rope_dim, rope_dim], -1)
    return torch.cat([latent, _SumGradOverGroup.apply(rope_key, group)], dim=-1)


class SharedRopeKeyLinear(nn.Linear):
    """MLA's replicated wkv_a, whose shared rope key's gradient is summed over the tensor-parallel group."""

    def __init__(self, linear: nn.Linear, rope_dim: int, group):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.rope_dim = rope_dim
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return share_rope_key_gradient(F.linear(x, self.weight), self.rope_dim, self.group)


class VocabParallelHead(OutputHead):
    """Output head whose logits are split over the vocabulary; the loss never gathers them."""

    def __init__(self, linear: ColumnParallel):
        nn.Module.__init__(self)
        self.linear = linear

    def token_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(h.flatten(0, -3))  # Megatron-Core's layers take 3-D [s, b, h] inputs
        return vocab_parallel_cross_entropy(logits.float(), labels.flatten(0, -2)).view_as(labels)


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


def partition(layer: nn.Module) -> tuple[int, int, str | None, object]:
    """(in_features, out_features, style, group) of one of the model's projections after
    apply_tensor_parallel: the full sizes, and COLUMN or ROW over `group` for a layer it made
    parallel, None (replicated) otherwise. Other backends read their plan from here."""
    if isinstance(layer, ColumnParallelLinear | RowParallelLinear):
        style = COLUMN if isinstance(layer, ColumnParallelLinear) else ROW
        return layer.input_size, layer.output_size, style, layer.tp_group
    return layer.in_features, layer.out_features, None, None


def apply_tensor_parallel(model: Transformer, group, dtype: torch.dtype, device: torch.device) -> None:
    """Swap the model's projections for Megatron-Core's tensor-parallel layers over `group`."""
    config = megatron_config(group.size(), dtype, device)
    build = {COLUMN: _column, ROW: _row}
    for module in list(model.modules()):
        for name, style in PLAN.get(type(module), {}).items():
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                setattr(module, name, build[style](linear, config, group))
        if isinstance(module, MLA):
            module.wkv_a = SharedRopeKeyLinear(module.wkv_a, module.args.qk_rope_head_dim, group)
    if model.embed is not None:
        vocab, dim = model.embed.weight.shape
        model.embed = VocabParallelEmbedding(
            vocab, dim, init_method=_skip_init, config=config, tp_group=group
        )
        mark_shard(model.embed.weight, 0, group.rank() * model.embed.weight.size(0), vocab, group)
    if model.head is not None:
        model.head = VocabParallelHead(_column(model.head.linear, config, group))
