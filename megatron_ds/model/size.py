"""Parameter counts of a model configuration, total and activated per token.

Counted on a meta-device model, so the numbers are those of the code, not of a formula that
could drift from it.
"""

from dataclasses import asdict, dataclass

import torch

from megatron_ds.config import ModelConfig
from megatron_ds.model.moe import GroupedExperts
from megatron_ds.model.transformer import Transformer


@dataclass
class ParameterCounts:
    embedding: int  # input embedding (shared with MTP)
    head: int  # output head (shared with MTP)
    main_total: int  # main model: embedding + layers + final norm + head
    main_activated: int  # per token: main_total minus the routed experts a token does not use
    mtp_total: int  # the MTP modules' own parameters (embedding and head are shared)
    mtp_activated: int

    def as_dict(self) -> dict:
        return asdict(self)


def _count(module: torch.nn.Module, top_k: int) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    inactive = 0
    for experts in module.modules():
        if isinstance(experts, GroupedExperts):
            per_expert = sum(p[0].numel() for p in experts.parameters())
            inactive += (experts.n_local_experts - top_k) * per_expert
    return total, total - inactive


def parameter_counts(args: ModelConfig) -> ParameterCounts:
    with torch.device("meta"):
        model = Transformer(args)
    mtp_total, mtp_activated = _count(model.mtp, args.n_activated_experts)
    all_total, all_activated = _count(model, args.n_activated_experts)
    return ParameterCounts(
        embedding=model.embed.weight.numel(),
        head=model.head.linear.weight.numel(),
        main_total=all_total - mtp_total,
        main_activated=all_activated - mtp_activated,
        mtp_total=mtp_total,
        mtp_activated=mtp_activated,
    )
