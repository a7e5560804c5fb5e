"""RMSNorm and the SwiGLU feed-forward network, the two building blocks every layer shares."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation, computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


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
