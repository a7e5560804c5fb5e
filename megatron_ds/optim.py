"""AdamW with ZeRO-1: each data-parallel rank keeps optimizer state for the parameters it owns.

After gradients are reduced, every rank updates only its own parameters (from an fp32 master
copy when the model runs in bf16) and broadcasts them to the other replicas. Ownership is a
deterministic greedy split by size, so every rank derives the same plan and a checkpoint's
per-parameter state can be redistributed under another data-parallel size. This runs
identically over gloo on CPUs and NCCL on GPUs.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from megatron_ds.config import Config
from megatron_ds.model.init import SHARD_ATTR, SHARD_GROUP_ATTR

# Set on a parameter that several pipeline stages hold (the embedding, shared by the first stage and
# MTP on the last): how many stages hold it, so that the global norm counts it once.
STAGE_COPIES_ATTR = "mds_stage_copies"


def copies_of(param: torch.Tensor, world_size: int, pipeline: int) -> int:
    """How many ranks hold this exact tensor (the same shard), to count it once in global norms."""
    n_shards = 1
    if hasattr(param, SHARD_ATTR):
        dim, _, full = getattr(param, SHARD_ATTR)
        n_shards = full // param.size(dim)
    return world_size // (pipeline * n_shards) * getattr(param, STAGE_COPIES_ATTR, 1)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


class ZeroAdamW:
    """Decoupled-weight-decay Adam (betas, eps, wd from config; no decay on 1-D norm weights)."""

    def __init__(self, model: nn.Module, cfg: Config, replica_group_of, eps: float = 1e-8):
        """replica_group_of(param) -> the group of ranks holding replicas of param (None = no replicas)."""
        t = cfg.train
        self.betas, self.eps, self.weight_decay = (t.beta1, t.beta2), eps, t.weight_decay
        self.moment_dtype = torch.bfloat16 if cfg.precision.bf16_optimizer_moments else torch.float32
        self.params = dict(model.named_parameters())
        self.step_count = torch.zeros((), dtype=torch.int64)
        self.owner: dict[str, tuple[object, int]] = {}  # name -> (group, global rank of the owner)
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        load: dict[object, list[int]] = {}
        for name, p in sorted(self.params.items(), key=lambda kv: (-kv[1].numel(), kv[0])):
            group = replica_group_of(p)
            sizes = load.setdefault(group, [0] * _group_size(group))
            index = min(range(len(sizes)), key=sizes.__getitem__)
            sizes[index] += p.numel()
            owner = dist.get_global_rank(group, index) if group is not None else dist.get_rank()
            self.owner[name] = (group, owner)
            if owner == (dist.get_rank() if dist.is_initialized() else 0):
                self.state[name] = self._new_state(p)

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {
            "exp_avg": torch.zeros_like(p, dtype=self.moment_dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=self.moment_dtype),
        }
        if p.dtype != torch.float32:
            state["master"] = p.detach().float().clone()
        for tensor in state.values():  # sharded like the parameter, for checkpoint resharding
            for attr in (SHARD_ATTR, SHARD_GROUP_ATTR):
                if hasattr(p, attr):
                    setattr(tensor, attr, getattr(p, attr))
        return state

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        n = int(self.step_count)
        bias1, bias2 = 1 - beta1**n, 1 - beta2**n
        for name, state in self.state.items():
            p = self.params[name]
            master = state.get("master", p)
            grad = p.grad.float()
            if p.dim() > 1 and self.weight_decay:
                master.mul_(1 - lr * self.weight_decay)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.float() / bias2).sqrt_().add_(self.eps)
            master.addcdiv_(exp_avg.float(), denom, value=-lr / bias1)
            if master is not p:
                p.copy_(master)
        for name, p in self.params.items():
            group, owner = self.owner[name]
            if group is not None and dist.get_world_size(group) > 1:
                dist.broadcast(p.data, src=owner, group=group)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's optimizer state as flat checkpoint keys ("optim.<param>.<slot>", "optim.step")."""
        tensors = {"optim.step": self.step_count}
        for name, state in self.state.items():
            for slot, tensor in state.items():
                tensors[f"optim.{name}.{slot}"] = tensor
        return tensors


@torch.no_grad()
def global_grad_norm(model: nn.Module, world_size: int, pipeline: int) -> torch.Tensor:
    """L2 norm of the full gradient: each shard's square sum counted once across all ranks."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.double().square().sum() / copies_of(p, world_size, pipeline)
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(total)
    return total.sqrt().float()


@torch.no_grad()
def clip_gradients(model: nn.Module, norm: torch.Tensor, max_norm: float) -> None:
    if max_norm > 0 and math.isfinite(norm.item()) and norm.item() > max_norm:
        coef = max_norm / (norm.item() + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
