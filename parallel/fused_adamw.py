"""AdamW for the GPU optimizer backend: one generated kernel per parameter shard, the clip folded in.

Megatron-Core's distributed optimizer steps this rank's shard of every parameter through an inner
torch optimizer. The one it builds, Transformer Engine's FusedAdam, walks the shards in fixed-size
multi-tensor chunks, and the global-norm clip before it is a pass of its own over the fp32 gradients.
On the H200, for dsv3-bench's 5.65B parameters with BF16 moments, those two took 63.6 ms, and one
Inductor kernel per shard that reads the clip coefficient from a device scalar took 32.0 ms, at 3.9 TB/s
(benches/adamw_kernels.py; docs/benchmarks/h200.md). `FusedAdamW` is that kernel as the inner optimizer.

It keeps the state layout of the optimizers it replaces ("exp_avg", "exp_avg_sq", and "master_param"
beside a bf16 parameter; "step" per group), reads the gradient from `decoupled_grad` where
Megatron-Core's precision-aware optimizer puts it (an fp32 gradient for a bf16 parameter) and from
`grad` otherwise, and writes the new master into the bf16 parameter in the same kernel.
"""

from functools import cache

import torch


def _adamw(master, grad, exp_avg, exp_avg_sq, scalars) -> torch.Tensor:
    """Update the moments in place; return the new master weight (decoupled weight decay).

    `scalars` holds the group's values as one device tensor (FusedAdamW.step's order), so a new
    learning rate or clip coefficient never recompiles the kernel."""
    lr, weight_decay, beta1, beta2, eps, correction1, correction2, grad_scale = scalars.unbind()
    g = grad.float() * grad_scale
    m = exp_avg.float() * beta1 + (1 - beta1) * g
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    return master - lr * ((m / correction1) / ((v / correction2).sqrt() + eps) + weight_decay * master)


def adamw_(master, grad, exp_avg, exp_avg_sq, scalars) -> None:
    """One AdamW step of an fp32 parameter that is its own master."""
    master.copy_(_adamw(master, grad, exp_avg, exp_avg_sq, scalars))


def adamw_to_param_(param, master, grad, exp_avg, exp_avg_sq, scalars) -> None:
    """One AdamW step of the fp32 master; the low-precision parameter receives it, rounded."""
    new = _adamw(master, grad, exp_avg, exp_avg_sq, scalars)
    master.copy_(new)
    param.copy_(new)


@cache
def _kernel(fn):
    """fn compiled once per process, for every shard size (dynamic shapes)."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _gradient(param: torch.Tensor) -> torch.Tensor | None:
    grad = getattr(param, "decoupled_grad", None)
    return param.grad if grad is None else grad


class FusedAdamW(torch.optim.Optimizer):
    """AdamW over the given parameter groups (each with lr, weight_decay, betas, eps), moments in
    `moment_dtype`. Set a group's "grad_scale" (default 1) to scale its gradients in the kernel:
    the global-norm clip."""

    def __init__(self, param_groups: list[dict], moment_dtype: torch.dtype = torch.float32):
        super().__init__([{"params": []}], defaults={"grad_scale": 1.0, "step": 0})
        # Megatron-Core's shards are views of the parameters (not leaves where a parameter is fp32),
        # which add_param_group refuses: the groups are taken as they are, as Megatron-Core assigns them.
        for group in param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.param_groups = param_groups
        self.moment_dtype = moment_dtype

    def initialize_state(self, param: torch.Tensor) -> None:
        state = self.state[param]
        state["exp_avg"] = torch.zeros_like(param, dtype=self.moment_dtype)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=self.moment_dtype)
        if param.dtype != torch.float32:
            state["master_param"] = param.detach().float()

    def create_states(self) -> None:
        """Every parameter's state now, as the first step would (so that a checkpoint can load into it)."""
        for group in self.param_groups:
            for param in group["params"]:
                if not self.state[param]:
                    self.initialize_state(param)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        assert closure is None, "FusedAdamW takes no closure"
        self.create_states()
        for group in self.param_groups:
            group["step"] += 1
            params = [p for p in group["params"] if _gradient(p) is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            n = group["step"]
            values = [group["lr"], group["weight_decay"], beta1, beta2, group["eps"],
                      1 - beta1**n, 1 - beta2**n, group["grad_scale"]]  # fmt: skip
            on_gpu = params[0].is_cuda  # staged in pinned memory: a pageable copy would wait for the GPU
            scalars = torch.tensor(values, pin_memory=on_gpu).to(params[0].device, non_blocking=on_gpu)
            for param in params:
                state = self.state[param]
                moments = (state["exp_avg"], state["exp_avg_sq"], scalars)
                weights = param.detach()  # dynamo would compile an nn.Parameter's shape statically
                if "master_param" in state:
                    _kernel(adamw_to_param_)(weights, state["master_param"], _gradient(param), *moments)
                else:
                    _kernel(adamw_)(weights, _gradient(param), *moments)
