"""Selective recomputation (report section 3.2.3), applied to a built model from outside.

DeepSeek-V3 trains without tensor parallelism partly by not keeping what is cheap to recompute:
every RMSNorm and the MLA up-projections are re-run in the backward pass, and the SwiGLU's output is
recomputed from its cached inputs (section 3.3.4). Each region named in `train.recompute` runs under
a non-reentrant `torch.utils.checkpoint`, which keeps only the region's inputs and replays it when
the backward reaches it:

  norm         every RMSNorm: its fp32 intermediates are not kept
  mla_up_proj  q_norm + W^UQ/W^QR and kv_norm + W^UK/W^UV: only the latents c^Q, c^KV are kept
  swiglu       SwiGLU + the down projection, in dense FFNs, shared and routed experts: only the gate
               and up projections' outputs are kept

The regions are side-effect free (no routing statistics, no communication), so replaying them
changes no state; gradients are identical to a run without recomputation.
"""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ds.config.schema import RECOMPUTE_REGIONS
from megatron_ds.model.attention import MLA
from megatron_ds.model.moe import GroupedExperts
from megatron_ds.model.norm import MLP, RMSNorm

REGIONS = {
    "norm": ((RMSNorm, "forward"),),
    "mla_up_proj": ((MLA, "q_up"), (MLA, "kv_up")),
    "swiglu": ((MLP, "down"), (GroupedExperts, "down")),
}
assert tuple(REGIONS) == RECOMPUTE_REGIONS


def apply_recompute(model: nn.Module, regions: list[str]) -> None:
    """Replay the named regions (keys of REGIONS) in the backward instead of keeping their activations."""
    targets = [target for name in regions for target in REGIONS[name]]
    for module in model.modules():
        for cls, method in targets:
            if isinstance(module, cls):
                setattr(module, method, partial(checkpoint, getattr(module, method), use_reentrant=False))


def bytes_kept_for_backward(forward, parameters) -> int:
    """Run forward() and return the bytes of the distinct activation storages autograd keeps for the
    backward (the parameters' own storages, which autograd also references, are not counted)."""
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
