"""Selective recomputation (report section 3.2.3), applied to a built model from outside.

DeepSeek-V3 trains without tensor parallelism partly by not keeping what is cheap to recompute:
every RMSNorm and the MLA up-projections are re-run in the backward pass, and the SwiGLU's output is
recomputed from its cached inputs (section 3.3.4). Each region named in `train.recompute` runs under
a non-reentrant checkpoint, which keeps only the region's inputs and replays it when the backward
reaches it:

  norm         every RMSNorm: since the norm is one fused function that keeps only its input and one fp32
               scale per row, this drops just the scales (it dropped fp32 copies of bf16 inputs before)
  mla_up_proj  q_norm + W^UQ/W^QR and kv_norm + W^UK/W^UV: only the latents c^Q, c^KV are kept. Under
               TE each pair is one te.LayerNormLinear (wq_b, wkv_b) and q_norm, kv_norm are identities,
               so `norm` is left with the block, final and MTP norms
  swiglu       SwiGLU + the down projection, in dense FFNs, shared and routed experts: only the gate
               and up projections' outputs are kept

The checkpoint is torch's under the local backend and Transformer Engine's under the TE backend. The
replay runs in the backward, outside the forward's te.autocast: torch's checkpoint would replay the FP8
GEMMs in BF16, while TE's re-enters the autocast with the forward's recipe (and, for delayed scaling,
its scales). Under TE the regions do not nest, which TE's checkpoint assumes (its in-region flag is a
global that an inner region's exit clears).

The regions are side-effect free (no routing statistics, no communication), so replaying them
changes no model state; gradients are identical to a run without recomputation. (TE's replay does
touch TE's own delayed-scaling state: docs/training.md.)
"""

from functools import partial

import torch
from torch import nn

from megatron_ds.config import Config
from megatron_ds.config.schema import RECOMPUTE_REGIONS
from megatron_ds.model.attention import MLA
from megatron_ds.model.moe import GroupedExperts
from megatron_ds.model.norm import MLP, RMSNorm
from parallel.transformer_engine import TEGroupedExperts

REGIONS = {
    "norm": ((RMSNorm, "forward"),),
    "mla_up_proj": ((MLA, "q_up"), (MLA, "kv_up")),
    "swiglu": ((MLP, "down"), (GroupedExperts, "down"), (TEGroupedExperts, "down")),
}
assert tuple(REGIONS) == RECOMPUTE_REGIONS


def apply_recompute(model: nn.Module, cfg: Config) -> None:
    """Replay the regions named in train.recompute (keys of REGIONS) in the backward instead of keeping
    their activations, through the checkpoint of the model's backend (precision.linear_impl)."""
    if cfg.precision.linear_impl == "te":
        from transformer_engine.pytorch import checkpoint
    else:
        from torch.utils.checkpoint import checkpoint
    targets = [target for name in cfg.train.recompute for target in REGIONS[name]]
    for module in model.modules():
        for cls, method in targets:
            if isinstance(module, cls):
                setattr(module, method, partial(checkpoint, getattr(module, method), use_reentrant=False))


def bytes_kept_for_backward(forward, parameters) -> int:
    """Run forward() and return the bytes of the distinct activation storages autograd keeps for the
    backward (the parameters' own storages, which autograd also references, are not counted).

    It sees what goes through save_for_backward, as torch's checkpoint keeps a region's inputs. TE's
    checkpoint keeps them in a closure instead, which this cannot see: there, measure the CUDA allocator.
    """
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward()
    return sum(storages.values())
