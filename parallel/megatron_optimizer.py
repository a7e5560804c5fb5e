"""The GPU optimizer backend: Megatron-Core's DistributedDataParallel and distributed optimizer.

Each model chunk is wrapped in Megatron-Core's DDP, which accumulates gradients into contiguous
fp32 buffers and reduce-scatters them over the data-parallel ranks; its distributed optimizer keeps
fp32 master weights and the moments for this rank's 1/DP of every buffer and all-gathers the updated
parameters. The model itself is unchanged: DDP only hooks its parameters, and Transformer Engine's
layers (precision.linear_impl=te) write their weight gradients into those fp32 buffers from the GEMM
itself (TE's fuse_wgrad_accumulation) instead of a bf16 gradient that a hook then adds; so do the
embedding and the output head (megatron_ds.model.vocab), on either backend.

The inner optimizer that steps this rank's shards is ours, parallel.fused_adamw.FusedAdamW (one
generated kernel per shard, with the global-norm clip folded in as a device scalar); it replaces the one
Megatron-Core builds, keeping its state layout. With Transformer Engine installed the distributed
optimizer runs in Megatron-Core's precision-aware mode: the inner optimizer keeps the fp32 master
weights itself and writes the bf16 parameters in the same kernel (no separate main-to-model copy).
Without TE, Megatron-Core keeps fp32 main shards and copies them to the parameters after the step.
The moments may be BF16 either way (precision.bf16_optimizer_moments, as the report trains).

Megatron-Core's own rules then decide which gradients are reduced over which group: routed experts
(marked `allreduce = False`) over the expert-data-parallel group, everything else over data
parallel, both divided by the data-parallel size, exactly as the CPU backend
(megatron_ds.optim.ZeroOneOptimizer) does.

Checkpoints hold the same keys as the CPU backend's ("optim.<param>.exp_avg" etc.): each rank's
state is a flat range of the parameter (checkpoint.sharding's flat ranges), so a checkpoint moves
between the backends and between data-parallel sizes.
"""

import torch
from torch import nn

from megatron_ds.checkpoint.sharding import mark_flat_range
from megatron_ds.config import Config
from megatron_ds.model.init import SHARD_ATTR, canonical_name
from megatron_ds.optim import STAGE_COPIES_ATTR
from parallel.data_parallel import split_expert_parameters
from parallel.fused_adamw import FusedAdamW
from parallel.parallelize import DTYPES


def _transformer_config(cfg: Config):
    from megatron.core.transformer import TransformerConfig

    m, p = cfg.model, cfg.parallel
    dtype = DTYPES[cfg.precision.params_dtype]
    return TransformerConfig(  # DDP reads only the layout and dtypes; the model is ours
        num_layers=m.n_layers,
        hidden_size=m.dim,
        num_attention_heads=m.n_heads,
        num_moe_experts=m.n_routed_experts,
        moe_ffn_hidden_size=m.moe_inter_dim,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=1,  # routed experts stay whole under TP (parallel.groups)
        add_bias_linear=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )


def precision_aware_available() -> bool:
    """Whether Megatron-Core's precision-aware mode is available (it checks for TE's FusedAdam)."""
    from megatron.core import optimizer

    return optimizer.Adam.__module__.startswith("transformer_engine")


class MegatronOptimizer:
    """Megatron-Core DDP + distributed optimizer behind the loop's optimizer interface."""

    def __init__(self, model: nn.Module, chunks: list[nn.Module], cfg: Config):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer

        t = cfg.train
        self.precision_aware = precision_aware_available()
        moments = torch.bfloat16 if cfg.precision.bf16_optimizer_moments else torch.float32
        # Megatron-Core counts a gradient in the clipping norm on every tensor-parallel rank if the
        # parameter is flagged `tensor_model_parallel`, else on the first only. Its layers set the flag
        # when they initialise, which ours skip, and TE sets it on every weight, replicated or not, so
        # it is set here from the shard marks. Under expert parallelism no rank's range of a routed
        # expert is another's (the expert group splits the experts, the expert-data-parallel group
        # each expert): they count everywhere too.
        for param in model.parameters():
            param.tensor_model_parallel = hasattr(param, SHARD_ATTR)
        if cfg.parallel.expert > 1:
            for param in split_expert_parameters(model)[1]:
                param.allreduce = False  # reduced over the expert-data-parallel group
                param.tensor_model_parallel = True
        embed = getattr(model, "embed", None)
        last_stage_copy = embed is not None and getattr(embed.weight, STAGE_COPIES_ATTR, 1) > 1
        if last_stage_copy and ps.get_pipeline_model_parallel_rank() > 0:
            embed.weight.shared = True  # MTP's copy on the last stage: the first stage counts it in norms
        config = _transformer_config(cfg)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        self.chunks = [
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        for chunk in chunks:  # TE's weight-gradient GEMMs accumulate straight into DDP's fp32 buffers
            for module in chunk.modules():
                if hasattr(module, "fuse_wgrad_accumulation"):
                    module.fuse_wgrad_accumulation = True
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                min_lr=t.min_lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.beta1,
                adam_beta2=t.beta2,
                adam_eps=1e-8,
                bf16=config.bf16,
                params_dtype=config.params_dtype,
                use_distributed_optimizer=True,
                clip_grad=t.grad_clip,
                use_precision_aware_optimizer=self.precision_aware,
                store_param_remainders=False,  # the checkpoint holds fp32 masters in place
            ),
            self.chunks,
        )
        self.parts = (
            self.optimizer.chained_optimizers
            if isinstance(self.optimizer, ChainedOptimizer)
            else [self.optimizer]
        )
        for part in self.parts:  # ours steps the shards Megatron-Core laid out for its own
            part.optimizer = FusedAdamW(part.optimizer.param_groups, moments)
        for group in self.optimizer.param_groups:  # no decay on norms (wd_mult 0), as Megatron's scheduler
            group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
        self.grad_clip = t.grad_clip
        self.step_count = torch.zeros((), dtype=torch.int64)
        self._names = {param: canonical_name(name, param) for name, param in model.named_parameters()}
        self._state: dict[str, torch.Tensor] | None = None

    def reduce_gradients(self) -> torch.Tensor:
        """Reduce-scatter the step's gradients and return their global norm (a 0-d tensor)."""
        for chunk in self.chunks:
            chunk.finish_grad_sync()
        self.optimizer.prepare_grads()
        return torch.tensor(float(self.optimizer.get_grad_norm()))

    @torch.no_grad()
    def step(self, lr: float, grad_norm: torch.Tensor) -> None:
        """One AdamW step on this rank's shards, gradients clipped by the global norm inside the
        kernel (Megatron-Core's coefficient), then all-gather the parameters."""
        self.step_count += 1
        clip = 1.0
        if self.grad_clip > 0:
            clip = min(1.0, self.grad_clip / (float(grad_norm) + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["grad_scale"] = clip
        self.optimizer.step_with_ready_grads()

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the master weights and moments, in place, as checkpoint keys.

        Creates the moments now (Adam would on its first step) so that a checkpoint can load into them.
        Model parameters are paired with the optimizer's through its per-dtype groups: Megatron-Core
        0.16's own lookup (group index, order) assumes groups of one dtype, and our router is fp32.
        """
        if self._state is not None:
            return self._state
        state = {"optim.step": self.step_count}
        for part in self.parts:
            part.optimizer.create_states()
            # Precision-aware, the inner optimizer steps the bf16 shards and keeps their masters itself.
            bf16_shards = (
                part.shard_float16_groups if self.precision_aware else part.shard_fp32_from_float16_groups
            )
            pairs = [*zip(part.model_float16_groups, bf16_shards),
                     *zip(part.model_fp32_groups, part.shard_fp32_groups)]  # fmt: skip
            for model_group, optim_group in pairs:
                for model_param, optim_param in zip(model_group, optim_group):
                    name = self._names[model_param]
                    span = part._get_model_param_range_map(model_param)["param"]
                    moments = part.optimizer.state[optim_param]
                    slots = {"exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]}
                    if model_param.dtype != torch.float32:  # an fp32 parameter is its own master
                        slots["master"] = moments.get("master_param", optim_param)
                    for slot, tensor in slots.items():
                        mark_flat_range(tensor, span.start, span.end, of=model_param)
                        state[f"optim.{name}.{slot}"] = tensor
        self._state = state
        return state

    def loaded(self) -> None:
        """After a checkpoint load: Adam's step count (its bias correction) follows the checkpoint's."""
        for group in self.optimizer.param_groups:
            group["step"] = int(self.step_count)
