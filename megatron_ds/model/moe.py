"""DeepSeekMoE (report section 2.1.2): shared experts plus fine-grained routed experts.

The router scores experts with sigmoid affinities, limits each token to a few nodes and groups,
and picks the top-K by score plus a per-expert balance bias. The bias steers *which* experts
are chosen; the weights come from the unbiased scores. Routed experts run behind a token
dispatcher, so expert parallelism can move tokens between ranks without this file knowing.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ds.config import ModelConfig
from megatron_ds.model.compiled import run_fused
from megatron_ds.model.norm import MLP, swiglu
from megatron_ds.model.permutation import (
    align_groups,
    expert_layout,
    from_layout,
    gather_copies,
    sort_copies,
    to_layout,
    weighted_combine,
)


def limit_to_blocks(scores: torch.Tensor, n_blocks: int, n_keep: int, top_per_block: int) -> torch.Tensor:
    """Mask (-inf) all experts outside the n_keep best of n_blocks contiguous blocks.

    A block's score is the sum of its top_per_block expert scores: the report's node limit
    (sum of the K/M highest affinities per node) and its group limit (top-2 per group).
    """
    if n_keep >= n_blocks:
        return scores
    blocks = scores.unflatten(-1, (n_blocks, -1))
    block_scores = blocks.topk(top_per_block, dim=-1).values.sum(-1)
    keep = torch.zeros_like(block_scores, dtype=torch.bool)
    keep.scatter_(-1, block_scores.topk(n_keep, dim=-1).indices, True)
    return blocks.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)


def tokens_per_expert(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many token copies each expert receives. A scatter-add: on a GPU, bincount would read the
    largest index back to the host, a synchronisation in every MoE layer."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


class Gate(nn.Module):
    """The router: sigmoid affinities, node- and group-limited top-K, bias-steered selection."""

    def __init__(self, args: ModelConfig):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # b_i of the auxiliary-loss-free balance (report eq. 16); updated by `update_expert_bias`.
        self.register_buffer("bias", torch.zeros(args.n_routed_experts))
        # Tokens routed to each expert since the last bias update (the step's micro-batches).
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts), persistent=False)
        self.register_buffer("balance_loss_sum", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x is [tokens, dim] in sequences of seq_len. Returns weights, indices, balance loss."""
        a = self.args
        scores = RouterAffinities.apply(x, self.weight)
        choice = scores.detach() + self.bias
        choice = limit_to_blocks(
            choice,
            a.n_expert_nodes,
            a.max_nodes_per_token,
            max(a.n_activated_experts // a.max_nodes_per_token, 1),
        )
        choice = limit_to_blocks(choice, a.n_expert_groups, a.n_limited_groups, 2)
        indices = choice.topk(a.n_activated_experts, dim=-1).indices
        weights = scores.gather(-1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * a.route_scale

        with torch.no_grad():
            self.expert_load += tokens_per_expert(indices, a.n_routed_experts)
        balance_loss = self.sequence_balance_loss(scores, indices, seq_len)
        self.balance_loss_sum += balance_loss.detach()
        return weights.type_as(x), indices, balance_loss

    def sequence_balance_loss(
        self, scores: torch.Tensor, indices: torch.Tensor, seq_len: int
    ) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence (report eqs. 17-20), averaged over sequences."""
        a = self.args
        n_experts, k = a.n_routed_experts, a.n_activated_experts
        probs = (scores / scores.sum(-1, keepdim=True)).view(-1, seq_len, n_experts)
        chosen = torch.zeros_like(scores).scatter_(-1, indices, 1.0).view(-1, seq_len, n_experts)
        f = chosen.sum(1) * n_experts / (k * seq_len)
        p = probs.mean(1)
        return a.balance_loss_alpha * (f * p).sum(-1).mean()


class RouterAffinities(torch.autograd.Function):
    """sigmoid(x W^T), computed in fp32 whatever x's dtype (the report keeps gating in high precision),
    keeping x as it came for the backward. F.linear(x.float(), W) keeps x's fp32 copy, twice the bytes
    of a bf16 x, which the shared experts keep anyway."""

    @staticmethod
    def forward(ctx, x, weight):
        scores = F.linear(x.float(), weight.float()).sigmoid()
        ctx.save_for_backward(x, weight, scores)
        return scores

    @staticmethod
    def backward(ctx, grad):
        x, weight, scores = ctx.saved_tensors
        grad_logits = torch.ops.aten.sigmoid_backward(grad, scores)
        grad_x = (grad_logits @ weight.float()).to(x.dtype)
        grad_weight = grad_logits.flatten(0, -2).t() @ x.flatten(0, -2).float()
        return grad_x, grad_weight.to(weight.dtype)


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU FFNs stacked as [experts, in, out], ready for grouped GEMMs."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # down

    @property
    def n_local_experts(self) -> int:
        return self.w1.size(0)

    def row_alignment(self, dtype: torch.dtype) -> int:
        """Rows per expert group the GEMMs need (permutation.align_groups pads to it): any number."""
        return 1

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x holds tokens sorted by local expert; counts[e] of them belong to expert e."""
        groups = _expert_groups(x, counts)
        return self.down(_grouped_mm(x, self.w1, groups), _grouped_mm(x, self.w3, groups), groups)

    def down(self, gate: torch.Tensor, up: torch.Tensor, groups: torch.Tensor | list[int]) -> torch.Tensor:
        """w2(SwiGLU) per expert: the part selective recomputation may replay in the backward."""
        return _grouped_mm(swiglu(gate, up), self.w2, groups)


def _expert_groups(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | list[int]:
    """Where each expert's rows are, found once per layer: end offsets for the GPU's grouped GEMM,
    else split sizes for a loop of GEMMs."""
    if x.is_cuda and x.dtype == torch.bfloat16:
        return counts.cumsum(0).to(torch.int32)
    return counts.tolist()


def _grouped_mm(x: torch.Tensor, weights: torch.Tensor, groups: torch.Tensor | list[int]) -> torch.Tensor:
    """Rows of expert e (as `groups` places them) times weights[e]: one grouped GEMM on GPU."""
    if isinstance(groups, torch.Tensor):
        if getattr(weights, "main_grad", None) is not None:
            return GroupedMatmulIntoMainGrad.apply(x, weights, groups)
        return torch._grouped_mm(x, weights, offs=groups)
    chunks = x.split(groups)
    per_expert = weights.unbind(0)  # one stack in the backward; weights[e] would zero-fill all E per expert
    return torch.cat([chunk @ w for chunk, w in zip(chunks, per_expert)]) if chunks else x[:0]


class GroupedMatmulIntoMainGrad(torch.autograd.Function):
    """torch._grouped_mm whose weight gradient is added into the weights' fp32 `main_grad` (Megatron-Core
    DDP's buffer) by one fused kernel, and not handed to DDP's hook as a bf16 `.grad`: the hook's
    mixed-dtype add is an unvectorised kernel (0.9 ms per [16, 7168, 2048] weight on the H200).

    The weights stay on ctx, not among the saved tensors, for their main_grad (vocab.EmbeddingIntoMainGrad
    says why)."""

    @staticmethod
    def forward(ctx, x, weights, offs):
        ctx.save_for_backward(x, offs)
        ctx.weights = weights
        return torch._grouped_mm(x, weights, offs=offs)

    @staticmethod
    def backward(ctx, grad):
        (x, offs), weights = ctx.saved_tensors, ctx.weights
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad, weights.transpose(-2, -1), offs=offs)
        if ctx.needs_input_grad[1]:
            run_fused(_accumulate_, weights.main_grad, torch._grouped_mm(x.t(), grad, offs=offs))
        return grad_x, None, None


def _accumulate_(total: torch.Tensor, addend: torch.Tensor) -> None:
    total.add_(addend.to(total.dtype))


def run_on_sorted_rows(experts: nn.Module, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """experts(x, counts) for rows already sorted by expert, padded to the groups the experts want
    (row_alignment) and the padding dropped after, as the dispatchers do: for benchmarks and tests
    that drive the experts directly. Under FP8, call it inside the te.autocast."""
    align = experts.row_alignment(x.dtype)
    if align == 1:
        return experts(x, counts)
    order, position, counts = expert_layout(torch.arange(x.size(0), device=x.device), counts, align)
    return from_layout(experts(to_layout(x, order, position), counts), order, position)


class LocalDispatcher:
    """All routed experts live in this process: sort tokens by expert, run, weight and sum back."""

    def __call__(self, x, weights, indices, experts: GroupedExperts, shared_experts: nn.Module | None):
        order, inverse = sort_copies(indices)
        counts = tokens_per_expert(indices, experts.n_local_experts)
        order, inverse, counts = align_groups(order, inverse, counts, experts.row_alignment(x.dtype))
        routed = experts(gather_copies(x, order, inverse), counts)
        out = weighted_combine(routed, order, inverse, weights)
        return out if shared_experts is None else out + shared_experts(x)


class BalanceLossGrad(torch.autograd.Function):
    """Identity on the MoE output whose backward also feeds the balance loss its gradient.

    This lets every pipeline stage back-propagate its own layers' balance losses without the
    loss travelling to the last stage (as Megatron-Core's MoEAuxLossAutoScaler does).
    `scale` is set by the training loop to the gradient scale of the main loss (1 / micro-batches).
    """

    scale = 1.0

    @staticmethod
    def forward(ctx, output, loss):
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, BalanceLossGrad.scale)


class MoE(nn.Module):
    def __init__(self, args: ModelConfig):
        super().__init__()
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None
        )
        self.dispatcher = LocalDispatcher()  # replaced by expert parallelism

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        x = x.reshape(-1, dim)
        weights, indices, balance_loss = self.gate(x, seqlen)
        out = self.dispatcher(x, weights, indices, self.experts, self.shared_experts)
        if self.training and balance_loss.requires_grad:
            out = BalanceLossGrad.apply(out, balance_loss)
        return out.view(bsz, seqlen, dim)


def moe_gates(model: nn.Module) -> dict[str, Gate]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Gate)}


def balance_loss_total(model: nn.Module, device: torch.device) -> torch.Tensor:
    """The sequence balance losses this rank's MoE layers accumulated since their last reset."""
    return sum((g.balance_loss_sum for g in moe_gates(model).values()), torch.zeros((), device=device))


@torch.no_grad()
def update_expert_bias(model: nn.Module, speed: float, group=None) -> dict[str, torch.Tensor]:
    """The auxiliary-loss-free balance step: b_i += gamma * sign(mean load - load_i).

    Loads are summed over `group` (the data-parallel ranks) first, so every rank applies the
    same update. Returns each gate's global load for metrics and resets the counters.
    """
    gates = moe_gates(model)
    if not gates:
        return {}
    loads = torch.stack([gate.expert_load for gate in gates.values()])  # one all-reduce for all layers
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads, group=group)
    for gate, load in zip(gates.values(), loads):
        if speed:
            gate.bias += speed * torch.sign(load.mean() - load)
        gate.expert_load.zero_()
    return dict(zip(gates, loads))
