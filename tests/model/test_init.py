"""Layout-independent initialisation across the linear backends."""

import torch
from torch import nn

from megatron_ds.model.init import init_weights, mark_expert_slice


def test_expert_slices_initialise_as_their_stacked_weight():
    """TE keeps each routed expert as its own [out, in] weight; marked as slices of the local backend's
    stacked [experts, in, out] weight, they draw exactly its values (layout-independent init)."""
    local, te = nn.Module(), nn.Module()
    local.w1 = nn.Parameter(torch.empty(4, 3, 5))
    te.w1 = nn.Module()
    for e in (2, 3):  # an EP rank holding experts 2 and 3 of 4
        weight = nn.Parameter(torch.empty(5, 3))
        mark_expert_slice(weight, f"w1.weight{e - 2}", "w1", e, 4, 2)
        te.w1.register_parameter(f"weight{e - 2}", weight)
    init_weights(local, seed=7, std=0.02)
    init_weights(te, seed=7, std=0.02)
    assert torch.equal(te.w1.weight0, local.w1[2].t()) and torch.equal(te.w1.weight1, local.w1[3].t())
