"""FP8 through Transformer Engine: the recipe from configuration, the forward context, the start-up check.

The default FP8 recipe is DeepSeek-V3's (report section 3.3): E4M3 for every GEMM operand, scales
computed online from the max-abs of 1x128 activation tiles (and output-gradient tiles) and of
128x128 weight blocks, FP32 accumulation. `delayed` and `current` select TE's per-tensor recipes.
Only the layers that parallel/transformer_engine.py swaps for TE modules run in FP8; embedding,
output head, router, norms and the attention core stay in BF16/FP32, as the report keeps them.
"""

import contextlib
import functools

import torch

from megatron_ds.config import Config, ConfigError

# FP8 tensor cores arrive with Ada (8.9) and Hopper (9.0).
FP8_MIN_CAPABILITY = (8, 9)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def check_precision(cfg: Config, device: torch.device) -> None:
    """Fail at start-up, with the setting to change, when the precision asked for cannot run here."""
    pr = cfg.precision
    if pr.linear_impl != "te" and pr.fp8 == "none":
        return
    if not transformer_engine_available():
        raise ConfigError(
            f"precision.linear_impl={pr.linear_impl} precision.fp8={pr.fp8} needs NVIDIA Transformer Engine, "
            "which is not importable here: install transformer-engine[pytorch], or set "
            "precision.linear_impl=local precision.fp8=none"
        )
    if device.type != "cuda":
        raise ConfigError(
            f"precision.linear_impl=te runs on CUDA GPUs only (device is {device}): "
            "set precision.linear_impl=local precision.fp8=none"
        )
    if pr.fp8 == "none":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"precision.fp8={pr.fp8} needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: "
            "set precision.fp8=none"
        )
    import transformer_engine.pytorch as te

    available, reason = (
        te.is_fp8_block_scaling_available(return_reason=True)
        if pr.fp8 == "blockwise"
        else te.is_fp8_available(return_reason=True)
    )
    if not available:
        raise ConfigError(f"precision.fp8={pr.fp8} is not available here ({reason}): set precision.fp8=none")


def te_grouped_experts(cfg: Config) -> bool:
    """Whether the routed experts run on TE's GroupedLinear (precision.expert_gemm).

    Only FP8 needs it. In BF16 torch's grouped GEMM is the better tool: it takes the experts' split
    offsets on the GPU, where TE's split path (any cuBLAS too old for TE's grouped-tensor path) reads
    split sizes back to the host in every MoE layer (the GPU drains while the CPU catches up), and one
    stacked weight per projection keeps per-parameter work in DDP and the optimizer to 3 tensors per
    layer instead of 3 per expert.
    """
    pr = cfg.precision
    return pr.expert_gemm == "te" or (pr.expert_gemm == "auto" and pr.fp8 != "none")


@functools.cache
def fp8_recipe(fp8: str):
    """The Transformer Engine recipe named by precision.fp8 (None for `none`).

    One object per name for the whole run: the forward context asks for it every micro-batch, and
    delayed scaling keeps its amax history with the recipe it was started with.
    """
    if fp8 == "none":
        return None
    if fp8 not in ("blockwise", "delayed", "current"):
        raise ConfigError(f"precision.fp8={fp8!r}: choose none, blockwise, delayed or current")
    from transformer_engine.common import recipe

    if fp8 == "blockwise":
        return recipe.Float8BlockScaling(
            fp8_format=recipe.Format.E4M3,
            x_block_scaling_dim=1,
            w_block_scaling_dim=2,
            grad_block_scaling_dim=1,
        )
    if fp8 == "delayed":
        return recipe.DelayedScaling(
            fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        )
    return recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)


def forward_context(cfg: Config, group=None):
    """Context for the model forward: TE's FP8 autocast when precision.fp8 is set, else nothing.

    The backward pass needs no context: TE records the recipe with the saved tensors.
    `group`: the ranks over which delayed scaling reduces its amax history (the data-parallel group).
    """
    if cfg.precision.fp8 == "none":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    return te.autocast(enabled=True, recipe=fp8_recipe(cfg.precision.fp8), amax_reduction_group=group)
