"""RMSNorm and the SwiGLU feed-forward network, the two building blocks every layer shares."""

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ds.model.compiled import accumulator, run_fused


class RMSNorm(nn.Module):
    """Root-mean-square normalisation, computed in fp32 (or wider) whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FusedRMSNorm.apply(x, self.weight, self.eps)


class FusedRMSNorm(torch.autograd.Function):
    """RMSNorm whose forward and backward are each one pass over the activations (Inductor-fused on a
    GPU, megatron_ds.model.compiled). Written as F.rms_norm(x.float()).type_as(x), a bf16 norm casts x
    and its gradient to fp32 copies and back around the kernels and keeps the fp32 copy of x for the
    backward; this keeps x as it came and one fp32 scale per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = run_fused(_rms_norm, x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        # contiguous: a gradient that arrives as a slice (MTP's concatenated norms) would compile anew
        grad_x, grad_weight = run_fused(_rms_norm_backward, grad.contiguous(), x, weight, rstd)
        return grad_x, grad_weight, None


def _rms_norm(x, weight, eps: float):
    """y = x / rms(x) * weight, in fp32 or wider, rounded once; and 1 / rms(x) per row."""
    wide = x.to(accumulator(x.dtype))
    rstd = torch.rsqrt(wide.square().mean(-1, keepdim=True) + eps)
    return (wide * rstd * weight.to(wide.dtype)).to(x.dtype), rstd


def _rms_norm_backward(grad, x, weight, rstd):
    """With x^ = x * rstd and g = grad * weight: dx = rstd (g - x^ mean(g x^)), dweight = sum over rows
    of grad x^, summed in fp32 or wider."""
    wide_grad = grad.to(rstd.dtype)
    x_hat = x.to(rstd.dtype) * rstd
    scaled = wide_grad * weight.to(rstd.dtype)
    grad_x = rstd * (scaled - x_hat * (scaled * x_hat).mean(-1, keepdim=True))
    grad_weight = (wide_grad * x_hat).flatten(0, -2).sum(0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return FusedSwiGLU.apply(gate, up)


class FusedSwiGLU(torch.autograd.Function):
    """silu(gate) * up with its forward and backward each one pass (Inductor-fused on a GPU). Eager,
    silu and the product are separate kernels (and three more in the backward), and autograd keeps
    silu(gate) for the product's backward besides gate and up; this keeps gate and up only.

    Compiled for any number of rows (dynamic): under expert parallelism the routed experts' rows change
    every step, and one kernel for all sizes gives a recomputed forward the same bits as the first."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return run_fused(_swiglu, gate, up, dynamic=True)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return run_fused(_swiglu_backward, grad.contiguous(), gate, up, dynamic=True)


def _swiglu(gate, up):
    """silu(gate) * up in fp32 or wider, rounded once."""
    wide_gate = gate.to(accumulator(gate.dtype))
    return (F.silu(wide_gate) * up.to(wide_gate.dtype)).to(gate.dtype)


def _swiglu_backward(grad, gate, up):
    """With s = sigmoid(gate): d gate = grad up s (1 + gate (1 - s)), d up = grad gate s."""
    wide = accumulator(gate.dtype)
    wide_grad, wide_gate, wide_up = grad.to(wide), gate.to(wide), up.to(wide)
    sig = torch.sigmoid(wide_gate)
    grad_gate = wide_grad * wide_up * sig * (1 + wide_gate * (1 - sig))
    grad_up = wide_grad * wide_gate * sig
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.w1(x), self.w3(x))

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """w2(SwiGLU): the part selective recomputation may replay in the backward (report 3.3.4)."""
        return self.w2(swiglu(gate, up))
