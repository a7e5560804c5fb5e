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
from megatron_ds.model.init import EXPERT_SLICE_ATTR, SHARD_ATTR, canonical_name, copy_layout_marks
from parallel.data_parallel import (
    gradient_groups_from_parallel_state,
    reduce_gradients,
    split_expert_parameters,
)

# Set on a parameter that several pipeline stages hold (the embedding, shared by the first stage and
# MTP on the last): how many stages hold it, so that the global norm counts it once.
STAGE_COPIES_ATTR = "mds_stage_copies"


def copies_of(param: torch.Tensor, world_size: int, pipeline: int) -> int:
    """How many ranks hold this exact tensor (the same shard), to count it once in global norms."""
    n_shards = 1
    if hasattr(param, SHARD_ATTR):
        dim, _, full = getattr(param, SHARD_ATTR)
        n_shards = full // param.size(dim)
    elif hasattr(param, EXPERT_SLICE_ATTR):  # one expert: on the ranks holding its block of experts
        _, n_experts, n_local = getattr(param, EXPERT_SLICE_ATTR)
        n_shards = n_experts // n_local
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
        me = dist.get_rank() if dist.is_initialized() else 0
        for name, p in sorted(self.params.items(), key=lambda kv: (-kv[1].numel(), kv[0])):
            group = replica_group_of(p)
            sizes = load.setdefault(group, [0] * _group_size(group))
            index = min(range(len(sizes)), key=sizes.__getitem__)
            sizes[index] += p.numel()
            owner = dist.get_global_rank(group, index) if group is not None else me
            self.owner[name] = (group, owner)
            if owner == me:
                self.state[name] = self._new_state(p)

    def _new_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {
            "exp_avg": torch.zeros_like(p, dtype=self.moment_dtype),
            "exp_avg_sq": torch.zeros_like(p, dtype=self.moment_dtype),
        }
        if p.dtype != torch.float32:
            state["master"] = p.detach().float().clone()
        for tensor in state.values():  # sharded like the parameter, for checkpoint resharding
            copy_layout_marks(p, tensor)
        return state

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW update of the owned parameters with multi-tensor (foreach) kernels, then broadcast."""
        self.step_count += 1
        beta1, beta2 = self.betas
        n = int(self.step_count)
        bias1, bias2 = 1 - beta1**n, 1 - beta2**n
        names = list(self.state)
        if names:
            params = [self.params[name] for name in names]
            masters = [self.state[name].get("master", self.params[name]) for name in names]
            grads = [p.grad.float() for p in params]
            decayed = [m for m, p in zip(masters, params) if p.dim() > 1]
            if self.weight_decay and decayed:
                torch._foreach_mul_(decayed, 1 - lr * self.weight_decay)
            exp_avgs = [self.state[name]["exp_avg"] for name in names]
            exp_avg_sqs = [self.state[name]["exp_avg_sq"] for name in names]
            moment_grads = (
                grads if self.moment_dtype == torch.float32 else [g.to(self.moment_dtype) for g in grads]
            )
            torch._foreach_lerp_(exp_avgs, moment_grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, moment_grads, moment_grads, value=1 - beta2)
            denom = torch._foreach_sqrt([v.float() for v in exp_avg_sqs])  # in torch.optim.AdamW's order
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(masters, [m.float() for m in exp_avgs], denom, value=-lr / bias1)
            for master, p in zip(masters, params):
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
                tensors[f"optim.{canonical_name(name, self.params[name])}.{slot}"] = tensor
        return tensors


@torch.no_grad()
def global_grad_norm(model: nn.Module, world_size: int, pipeline: int) -> torch.Tensor:
    """L2 norm of the full gradient: each shard's square sum counted once across all ranks."""
    params = [p for p in model.parameters() if p.grad is not None]
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    if params:
        norms = torch.stack(torch._foreach_norm([p.grad for p in params])).double()
        weights = torch.tensor([1.0 / copies_of(p, world_size, pipeline) for p in params], device=device)
        total += (norms.square() * weights.double()).sum()
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


class ZeroOneOptimizer:
    """Our optimizer backend (CPU/gloo and GPU/NCCL alike): flat all-reduce over the data-parallel
    groups, global-norm clip, ZeroAdamW. Same interface as parallel.megatron_optimizer's."""

    def __init__(self, model: nn.Module, cfg: Config, world_size: int):
        self.model, self.world_size = model, world_size
        self.pipeline, self.grad_clip = cfg.parallel.pipeline, cfg.train.grad_clip
        self.groups = gradient_groups_from_parallel_state()
        experts = {id(p) for p in split_expert_parameters(model)[1]}
        expert_group = self.groups.expert_data or self.groups.data
        self.adamw = ZeroAdamW(model, cfg, lambda p: expert_group if id(p) in experts else self.groups.data)

    def reduce_gradients(self) -> torch.Tensor:
        """Average the step's gradients over data-parallel replicas; return their global norm."""
        reduce_gradients(self.model, self.groups)
        return global_grad_norm(self.model, self.world_size, self.pipeline)

    def step(self, lr: float, grad_norm: torch.Tensor) -> None:
        clip_gradients(self.model, grad_norm, self.grad_clip)
        self.adamw.step(lr)

    def zero_grad(self) -> None:
        self.adamw.zero_grad()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.adamw.state_tensors()

    def loaded(self) -> None:
        """Nothing to do after a checkpoint load: the state was loaded in place."""
