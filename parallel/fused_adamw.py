"""AdamW for the GPU optimizer backend: one generated kernel per run of shards, the clip folded in.

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

Models with many small parameters (Transformer Engine's grouped experts hold one weight per expert:
2,304 in dsv3-bench) would pay a kernel launch and the compiled wrapper's host work per shard.
Megatron-Core's buffers already hold the shards and their gradients back to back, so the states are
laid out the same way (one flat buffer per group and kind, in address order) and every run of shards
that lies back to back in all five tensors is stepped as one 1-D span: one launch.
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
        self._runs: dict[int, tuple] = {}  # id(group) -> (its tensors' addresses, its runs)

    def create_states(self) -> None:
        """Every parameter's state now, as the first step would (so that a checkpoint can load into it):
        views of one flat buffer per group and kind, in the parameters' address order."""
        for group in self.param_groups:
            new = sorted((p for p in group["params"] if not self.state[p]), key=torch.Tensor.data_ptr)
            if not new:
                continue
            moments = [_flat_buffer(new, self.moment_dtype) for _ in range(2)]
            low_precision = [p for p in new if p.dtype != torch.float32]
            masters = _flat_buffer(low_precision, torch.float32) if low_precision else {}
            for param in new:
                state = self.state[param]
                state["exp_avg"], state["exp_avg_sq"] = (m[param] for m in moments)
                if param in masters:
                    state["master_param"] = masters[param].copy_(param.detach())

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
            # Runs are found again when any tensor moved (Megatron-Core's checkpoint loading may
            # replace states); reading the addresses costs ~1 us per parameter, a launch ~100 us.
            key = tuple(t.data_ptr() for p in params for t in (p, _gradient(p), *self.state[p].values()))
            if self._runs.get(id(group), (None,))[0] != key:
                self._runs[id(group)] = (key, _runs(params, self.state))
            for first, numel in self._runs[id(group)][1]:
                operands = [_span(t, numel) for t in _operands(first, self.state[first])]
                _kernel(adamw_to_param_ if len(operands) == 5 else adamw_)(*operands, scalars)


def _flat_buffer(params: list[torch.Tensor], dtype: torch.dtype) -> dict[torch.Tensor, torch.Tensor]:
    """One zeroed buffer for all of `params`, as a view shaped like each, in the given order."""
    flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    views, start = {}, 0
    for p in params:
        views[p] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return views


def _operands(param: torch.Tensor, state: dict) -> list[torch.Tensor]:
    """The kernel's tensors for one parameter, in its argument order."""
    master = [state["master_param"]] if "master_param" in state else []
    # dynamo would compile an nn.Parameter's shape statically: hence the detach
    return [param.detach(), *master, _gradient(param), state["exp_avg"], state["exp_avg_sq"]]


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b starts where a ends, in the same storage, both dense."""
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and a.dtype == b.dtype
        and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _runs(params: list[torch.Tensor], state) -> list[tuple[torch.Tensor, int]]:
    """The parameters in address order, cut into runs that lie back to back in every tensor the kernel
    touches: (the run's first parameter, its elements)."""
    runs: list[tuple[torch.Tensor, int]] = []
    previous = None
    for param in sorted(params, key=torch.Tensor.data_ptr):
        operands = _operands(param, state[param])
        if (
            previous is not None
            and len(previous) == len(operands)
            and all(_follows(a, b) for a, b in zip(previous, operands))
        ):
            runs[-1] = (runs[-1][0], runs[-1][1] + param.numel())
        else:
            runs.append((param, param.numel()))
        previous = operands
    return runs


def _span(first: torch.Tensor, numel: int) -> torch.Tensor:
    """numel elements from `first` on, as one 1-D view (`first` itself when it holds them all)."""
    if first.numel() == numel:
        return first
    return first.as_strided((numel,), (1,), first.storage_offset())
