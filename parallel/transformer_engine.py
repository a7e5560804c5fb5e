"""The Transformer Engine backend (precision.linear_impl=te), applied to a materialised model from outside.

What is swapped, and why (the report's FP8 rule, section 3.3: embedding, output head, gating,
normalisation and the attention core stay in BF16/FP32):
- every projection of MLA, the dense FFNs, the shared experts and MTP's eh_proj become `te.Linear`;
- MLA's up-projections absorb the RMSNorm before them: q_norm + wq_b and kv_norm + wkv_b become one
  `te.LayerNormLinear` each (fused norm + cast + GEMM), and the model's q_norm / kv_norm become identities;
- the routed experts, when they run in FP8 (megatron_ds.precision.te_grouped_experts), become
  `TEGroupedExperts`: three `te.GroupedLinear` (gate w1, up w3, down w2), with GroupedExperts' `down`
  split (parallel/recompute.py may replay it); in BF16 they stay on torch's grouped GEMM. Where TE
  and cuBLAS allow it (TE's grouped-tensor path: cuBLASLt 13.4+, 13.6+ for FP8 block scaling on
  Hopper) the split sizes stay on the GPU and each projection is one cuBLASLt grouped GEMM; elsewhere
  TE takes them on the host, one wait per layer;
- MLA's attention core becomes `TEAttention`, TE's DotProductAttention (BF16, as the report keeps it).
Under `te.autocast` (megatron_ds.precision.forward_context) these run in FP8; without it, in the
parameters' dtype.

Parameter names and initialisation. megatron_ds.model.init initialises the TE model as it does the
local one (norm weights 1, matrices N(0, std) seeded by name). The names differ from the local
backend's in two places, marked on the TE parameters (`local_counterpart` reads the marks back):
- `attn.q_norm.weight` -> `attn.wq_b.layer_norm_weight`,
  `attn.kv_norm.weight` -> `attn.wkv_b.layer_norm_weight`: marked (model.init.mark_renamed)
  so that checkpoints hold them under the local names;
- (FP8 experts) `ffn.experts.w{1,2,3}[e]` ([in, out]) -> `ffn.experts.w{1,2,3}.weight{i}` ([out, in],
  transposed; i = e - first, the rank's first expert under expert parallelism): marked as slices of
  the stacked weight (model.init.mark_expert_slice), so each expert initialises to the local
  backend's values and checkpoints hold the stacked tensor.
Every other parameter keeps its name and value.

Tensor parallelism. The plan stays parallel/tensor_parallel.py's: it swaps the projections on the meta
device, before materialisation, and this pass, which needs real memory for TE's modules, runs after it
and replaces each projection with its TE twin of the same partition (tensor_parallel.partition: TE's
`parallel_mode` column or row over the same group; TE's constructor takes the full sizes and allocates
this rank's shard). Without sequence parallelism TE communicates as Megatron-Core's layers do: a
column-parallel layer all-reduces its input gradient in the backward (for `te.LayerNormLinear` before
the norm's backward, so the norm weight's gradient is complete on every rank), a row-parallel layer
all-reduces its output in the forward. A twin takes over its predecessor's shard mark (so init draws
its slice of the full tensor and checkpoints assemble it) and, for MLA's wkv_a, the sum of the shared
rope key's gradient (a forward hook on the TE layer). The attention core gets this rank's heads;
the norms fused into the column-parallel up-projections and the routed experts stay replicated.
"""

import contextlib

import torch
from torch import nn

from megatron_ds.config import Config
from megatron_ds.model.attention import MLA, Attention
from megatron_ds.model.init import (
    EXPERT_SLICE_ATTR,
    canonical_name,
    copy_layout_marks,
    mark_expert_slice,
    mark_renamed,
    stacked_name,
)
from megatron_ds.model.moe import GroupedExperts, MoE
from megatron_ds.model.norm import MLP, swiglu
from megatron_ds.model.transformer import MTPModule
from megatron_ds.precision import te_grouped_experts
from parallel.parallelize import DTYPES
from parallel.tensor_parallel import SharedRopeKeyLinear, partition, share_rope_key_gradient

# FP8 GEMMs need each expert's token count to be a multiple of 16 (TE's alignment for all
# per-tensor and blockwise FP8 recipes); the dispatcher lays the groups out zero-padded to it.
# TE's grouped-tensor path quantizes all groups in one kernel, in whole 128-row blocks.
FP8_GROUP_ALIGN = 16
GROUPED_FP8_GROUP_ALIGN = 128


def _skip_init(weight: torch.Tensor) -> None:
    """Weights are filled afterwards by megatron_ds.model.init, identically to the local backend."""


def _fp8_recipe():
    """The FP8 recipe of the enclosing te.autocast, or None outside FP8."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager

    return FP8GlobalStateManager.get_fp8_recipe() if FP8GlobalStateManager.is_fp8_enabled() else None


class TEAttention(nn.Module):
    """MLA's attention core on TE's DotProductAttention (its fused cuDNN kernels take queries and keys
    of one head width and values of another, in bf16 or fp16). Document masks (data.document_masking)
    and fp32 runs (tests, debugging) go to the local core: TE would need the masks as packed sequence
    offsets, and has no fused kernel for fp32."""

    def __init__(self, n_heads: int, qk_head_dim: int, v_head_dim: int, softmax_scale: float):
        super().__init__()
        import transformer_engine.pytorch as te

        self.core = te.DotProductAttention(
            n_heads, (qk_head_dim, v_head_dim), qkv_format="bshd", attn_mask_type="causal",
            softmax_scale=softmax_scale,
        )  # fmt: skip
        self.local = Attention()

    def forward(self, q, k, v, attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        if attn_mask is not None or q.dtype == torch.float32:
            return self.local(q, k, v, attn_mask, scale)
        return self.core(q, k, v.contiguous()).flatten(2)  # the scale was given at construction


class TEGroupedExperts(nn.Module):
    """The routed experts' SwiGLU FFNs on TE's grouped GEMM (FP8 under te.autocast)."""

    def __init__(
        self, experts: GroupedExperts, dtype: torch.dtype, device, fp8: bool, grouped_tensor: bool = True
    ):
        """Experts [first, first + n_local) of n_experts, as `experts` (the local backend's) holds them.
        fp8: the run trains in FP8; grouped_tensor: use TE's grouped-tensor path where TE and cuBLAS
        support it."""
        super().__init__()
        import transformer_engine.pytorch as te

        n_local, dim, inter_dim = experts.w1.shape
        first, n_experts = getattr(experts, "first", 0), getattr(experts, "n_experts", n_local)
        # In FP8 the grouped path is taken only for experts of whole 128-blocks: the tiny model (64-wide
        # experts) trained measurably worse through it on the H200, so narrower experts keep the split
        # path. TE picks the path for the module, not per call: decided here.
        self.grouped_tensor = grouped_tensor and (not fp8 or (dim % 128 == 0 and inter_dim % 128 == 0))
        kw = dict(bias=False, params_dtype=dtype, device=device, init_method=_skip_init)
        if self.grouped_tensor:
            kw["use_grouped_tensor"] = True
        self.w1 = te.GroupedLinear(n_local, dim, inter_dim, **kw)  # gate
        self.w3 = te.GroupedLinear(n_local, dim, inter_dim, **kw)  # up
        self.w2 = te.GroupedLinear(n_local, inter_dim, dim, **kw)  # down
        self.n_local_experts = n_local
        for name in ("w1", "w3", "w2"):  # each expert's [out, in] weight is a slice of the local [E, in, out]
            for e in range(n_local):
                weight = getattr(self, name).get_parameter(f"weight{e}")
                mark_expert_slice(weight, f"{name}.weight{e}", name, first + e, n_experts, n_local)

    def row_alignment(self, dtype: torch.dtype) -> int:
        """Rows per expert group the GEMMs need, padded by the dispatcher (permutation.align_groups):
        in FP8 TE quantizes whole 16-row groups, and whole 128-row blocks on the grouped-tensor path."""
        recipe = _fp8_recipe()
        if recipe is None:
            return 1
        return GROUPED_FP8_GROUP_ALIGN if self._grouped_path(recipe, dtype) else FP8_GROUP_ALIGN

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x holds tokens sorted by local expert, each expert's group padded to row_alignment();
        counts[e] of them belong to expert e."""
        # The grouped-tensor path takes the sizes on the GPU; TE's split path wants them on the host.
        splits = counts if self._grouped_path(_fp8_recipe(), x.dtype) else counts.tolist()
        return self.down(self.w1(x, splits), self.w3(x, splits), splits)

    def _grouped_path(self, recipe, dtype: torch.dtype) -> bool:
        return self.grouped_tensor and grouped_tensor_path(recipe, dtype)

    def down(self, gate: torch.Tensor, up: torch.Tensor, splits) -> torch.Tensor:
        """w2(SwiGLU) per expert, as GroupedExperts.down: the part selective recomputation may replay."""
        return self.w2(swiglu(gate, up), splits)


def grouped_tensor_path(recipe, dtype: torch.dtype) -> bool:
    """Whether TE's GroupedLinear runs its grouped-tensor path (split sizes on the GPU, one cuBLASLt
    grouped GEMM) for this recipe (None: no FP8) and activation dtype on this GPU and cuBLAS."""
    from transformer_engine.pytorch.module import grouped_linear

    supported = getattr(grouped_linear, "is_module_grouped_tensor_path_supported", None)
    return supported is not None and supported(recipe, dtype)


def _linear(linear: nn.Module, dtype, device, norm: nn.Module | None = None):
    """The TE layer standing in for `linear` (with the RMSNorm `norm` before it fused in, if given):
    same full shape, same tensor-parallel partition, same shard mark."""
    import transformer_engine.pytorch as te

    in_features, out_features, style, group = partition(linear)
    kw = dict(
        bias=False, params_dtype=dtype, device=device, init_method=_skip_init, parallel_mode=style,
        tp_group=group,
    )  # fmt: skip
    if norm is None:
        layer = te.Linear(in_features, out_features, **kw)
    else:
        layer = te.LayerNormLinear(in_features, out_features, eps=norm.eps, normalization="RMSNorm", **kw)
    copy_layout_marks(linear.weight, layer.weight)
    if isinstance(linear, SharedRopeKeyLinear):
        rope_dim, tp_group = linear.rope_dim, linear.group
        layer.register_forward_hook(lambda _, __, kv: share_rope_key_gradient(kv, rope_dim, tp_group))
    return layer


def apply_transformer_engine(model: nn.Module, cfg: Config, tp_group=None) -> None:
    """Swap the model's projections, attention cores and routed experts for TE modules, in place.

    Call after the model is materialised on its CUDA device (and split by apply_tensor_parallel over
    `tp_group`, if at all) and before init_weights; the new modules are allocated there in the model's
    dtype.
    """
    dtype = DTYPES[cfg.precision.params_dtype]
    device = next(model.parameters()).device
    tp_size = tp_group.size() if tp_group is not None else 1
    swap_experts = te_grouped_experts(cfg)
    for module in list(model.modules()):
        if isinstance(module, MLA):
            for name in ("wq", "wq_a", "wkv_a", "wo"):
                if hasattr(module, name):
                    setattr(module, name, _linear(getattr(module, name), dtype, device))
            if module.args.q_lora_rank:
                module.wq_b = _linear(module.wq_b, dtype, device, norm=module.q_norm)
                module.q_norm = nn.Identity()
                mark_renamed(module.wq_b.layer_norm_weight, "wq_b.layer_norm_weight", "q_norm.weight")
            module.wkv_b = _linear(module.wkv_b, dtype, device, norm=module.kv_norm)
            module.kv_norm = nn.Identity()
            mark_renamed(module.wkv_b.layer_norm_weight, "wkv_b.layer_norm_weight", "kv_norm.weight")
            a = module.args  # the column-parallel projections give each rank n_heads / tp_size heads
            module.attention = TEAttention(
                a.n_heads // tp_size, a.qk_head_dim, a.v_head_dim, module.softmax_scale
            )
        elif isinstance(module, MLP):
            for name in ("w1", "w3", "w2"):
                setattr(module, name, _linear(getattr(module, name), dtype, device))
        elif isinstance(module, MTPModule):
            module.eh_proj = _linear(module.eh_proj, dtype, device)
        elif swap_experts and isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            module.experts = TEGroupedExperts(module.experts, dtype, device, cfg.precision.fp8 != "none")


class FP8WeightCache:
    """Each TE layer quantizes its weights to FP8 in its first forward of an optimizer step and reuses
    that copy for the step's other micro-batches (TE's `is_first_microbatch`), as Megatron-Core's
    schedules arrange: one quantization per step instead of one per micro-batch. Steps of one
    micro-batch have nothing to reuse, so caching stays off there (the copy would only hold memory).

    Set from outside the model: a forward pre-hook on each TE projection adds the flag, inside `step`
    only, so a forward outside a training step never sees a copy from before the last update. A replay
    of the forward (selective recomputation) finds its layers already quantized this step.
    """

    def __init__(self, model: nn.Module):
        import transformer_engine.pytorch as te

        projections = (te.Linear, te.LayerNormLinear, te.GroupedLinear)
        self.layers = [m for m in model.modules() if isinstance(m, projections)]
        self.unquantized: set[nn.Module] = set()  # layers yet to quantize their weights this step
        self.enabled = False
        for layer in self.layers:
            layer.register_forward_pre_hook(self._flag, with_kwargs=True)

    @contextlib.contextmanager
    def step(self, n_micro: int):
        """Around the forward and backward passes of one optimizer step's n_micro micro-batches."""
        self.enabled = n_micro > 1
        self.unquantized = set(self.layers)
        try:
            yield
        finally:
            self.enabled = False

    def _flag(self, layer: nn.Module, args: tuple, kwargs: dict):
        if not self.enabled:
            return None
        kwargs["is_first_microbatch"] = layer in self.unquantized
        self.unquantized.discard(layer)
        return args, kwargs


def local_counterpart(name: str, param: torch.Tensor, local: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `param` (called `name` in a TE-backend model) holds of the local backend's tensors `local`
    (by name: parameters, or their gradients), read from the marks `apply_transformer_engine` left on
    it: the tensor of its local name, or, for an expert slice, that expert of the stacked weight,
    transposed."""
    local_name = canonical_name(name, param)
    if not hasattr(param, EXPERT_SLICE_ATTR):
        return local[local_name]
    expert = getattr(param, EXPERT_SLICE_ATTR)[0]
    return local[stacked_name(local_name)][expert].t()


@torch.no_grad()
def copy_local_weights(te_model: nn.Module, local_model: nn.Module) -> None:
    """Load a local-backend model's weights into a TE-backend model of the same config."""
    local = dict(local_model.named_parameters())
    for name, param in te_model.named_parameters():
        param.copy_(local_counterpart(name, param, local))
    te_buffers = dict(te_model.named_buffers())
    for name, buffer in local_model.named_buffers():
        te_buffers[name].copy_(buffer)
