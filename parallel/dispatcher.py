"""The expert-parallel token dispatcher: tokens travel to the ranks holding their experts and back.

The routed experts of a MoE layer are split evenly over the expert-parallel (EP) group; EP rank p
holds global experts [p L, (p + 1) L). For each layer's forward:

1. permute: gather each token once per chosen expert, sorted by expert id and so by destination
   rank too (megatron_ds.model.permutation: gathers only, fused on GPU);
2. exchange the per-expert counts, so every rank knows how many rows it will receive;
3. dispatch: one `all_to_all_single` with uneven splits moves the copies to their experts;
4. run the local experts as one grouped computation on the rows sorted by local expert (each
   expert's rows padded to the block its GEMMs need, if any: permutation.align_groups);
5. combine: the reverse all-to-all brings the outputs home, where each token gathers its K rows
   and sums them with the routing weights (report section 2.1.2, eq. 12) in one pass.

All data movement is index arithmetic or an autograd-aware all-to-all, so gradients are exact and
no token is ever dropped; experts that receive nothing run an empty GEMM.

Under tensor parallelism the attention hands every rank of a TP group the same tokens. Each TP rank
therefore dispatches only its 1/TP slice of them and the routed outputs are all-gathered over TP
(Megatron's "MoE parallel folding"), so each token reaches its experts exactly once however the EP
and TP groups overlap.

The dispatch all-to-all runs asynchronously while the shared expert computes (the report overlaps
the two the same way), and on GPU its payload can travel in FP8 (E4M3, one scale per 1x128 tile,
report section 3.3.2) while the combine stays in BF16.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_ds.model.moe import tokens_per_expert
from megatron_ds.model.permutation import (
    expert_layout,
    from_layout,
    gather_copies,
    sort_copies,
    to_layout,
    weighted_combine,
)

FP8_TILE = 128


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the gradient travels back along the reverse splits."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return AllToAll.apply(grad, recv_splits, send_splits, ctx.group), None, None, None


class InFlight:
    """The pending halves of an asynchronous all-to-all, waited for by `AllToAllWait`."""

    def __init__(self):
        self.works = []
        self.finish = None  # turns the received buffers into the tokens (e.g. FP8 dequantisation)


class AllToAllStart(torch.autograd.Function):
    """Launch the dispatch all-to-all without waiting; its output is valid only after AllToAllWait.

    With `fp8` the rows travel as E4M3 with one fp32 scale per 1x128 tile and arrive in x's dtype.
    The backward is the reverse all-to-all of the incoming gradient, in full precision: the
    quantisation is treated as identity (straight-through), as in the report's FP8 dispatch.
    """

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, flight: InFlight, fp8: bool):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        n_out = sum(recv_splits)
        if not fp8:
            out = x.new_empty((n_out, *x.shape[1:]))
            flight.works = [_all_to_all_async(out, x.contiguous(), recv_splits, send_splits, group)]
            return out
        payload, scales = quantize_fp8_tiles(x)
        out_payload = payload.new_empty((n_out, payload.size(1)))
        out_scales = scales.new_empty((n_out, scales.size(1)))
        flight.works = [
            _all_to_all_async(out_payload, payload, recv_splits, send_splits, group),
            _all_to_all_async(out_scales, scales, recv_splits, send_splits, group),
        ]
        out = x.new_empty((n_out, *x.shape[1:]))
        flight.finish = lambda: out.copy_(dequantize_fp8_tiles(out_payload, out_scales))
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return AllToAll.apply(grad, recv_splits, send_splits, ctx.group), None, None, None, None, None


class AllToAllWait(torch.autograd.Function):
    """Wait for an AllToAllStart; an identity for autograd."""

    @staticmethod
    def forward(ctx, out, flight: InFlight):
        for work in flight.works:
            work.wait()
        if flight.finish is not None:
            flight.finish()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_to_all_async(out, x, recv_splits, send_splits, group):
    return dist.all_to_all_single(out, x, recv_splits, send_splits, group=group, async_op=True)


def quantize_fp8_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 payload (as uint8, which every backend can move) and one fp32 scale per 1x128 tile."""
    tiles = x.float().unflatten(-1, (-1, FP8_TILE))
    scales = tiles.abs().amax(-1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    payload = (tiles / scales.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return payload.flatten(-2).view(torch.uint8), scales


def dequantize_fp8_tiles(payload: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    tiles = payload.view(torch.float8_e4m3fn).float().unflatten(-1, (-1, FP8_TILE))
    return (tiles * scales.unsqueeze(-1)).flatten(-2)


class TokenSlice(torch.autograd.Function):
    """This TP rank's slice of tokens that every rank of `group` holds alike.

    The backward all-gathers the slices' gradients, so the full (replicated) input receives the
    gradient of every token, as the rest of the tensor-parallel model expects.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n_tokens = group, x.size(0)
        return x[_slice_range(x.size(0), group)]

    @staticmethod
    def backward(ctx, grad):
        return gather_token_slices(grad, ctx.n_tokens, ctx.group), None


class GatherTokenSlices(torch.autograd.Function):
    """All-gather each TP rank's slice of outputs; the backward keeps this rank's slice of the
    (replicated, hence already complete) output gradient."""

    @staticmethod
    def forward(ctx, x, n_tokens: int, group):
        ctx.group, ctx.n_tokens = group, n_tokens
        return gather_token_slices(x, n_tokens, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[_slice_range(ctx.n_tokens, ctx.group)], None, None


def _slice_range(n_tokens: int, group) -> slice:
    return slice(*_range_of(n_tokens, dist.get_world_size(group), dist.get_rank(group)))


def _range_of(n_tokens: int, size: int, rank: int) -> tuple[int, int]:
    """Rank r of `size` owns tokens [start, stop), the r-th piece of torch.tensor_split."""
    base, extra = divmod(n_tokens, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def gather_token_slices(x: torch.Tensor, n_tokens: int, group) -> torch.Tensor:
    """Concatenate every rank's token slice (slices may differ in length by one row)."""
    size = dist.get_world_size(group)
    longest = -(-n_tokens // size)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.size(0)] = x
    gathered = x.new_empty((size * longest, *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
    lengths = [stop - start for start, stop in (_range_of(n_tokens, size, r) for r in range(size))]
    return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(lengths)])


@dataclass
class RoutePlan:
    """Where every (token, expert) copy goes and how it comes back, for one forward."""

    order: torch.Tensor  # copies (flat token * K + slot) sorted by global expert
    inverse: torch.Tensor  # [tokens, K]: sorted position of each copy
    send_splits: list[int]  # rows to each EP rank
    recv_splits: list[int]  # rows from each EP rank
    # The experts' layout of the received rows, (order, position) of permutation.to_layout: sorted by
    # local expert, each group padded to the experts' row alignment. None: they arrive that way.
    local_layout: tuple[torch.Tensor, torch.Tensor] | None
    local_counts: torch.Tensor  # rows per local expert in that layout


@dataclass
class DispatchStats:
    """Traffic since the last `dispatch_metrics` call, counted on the sending side.

    Kept as tensors on the tokens' device so that counting never waits for the GPU.
    """

    tokens: torch.Tensor | int = 0  # token copies sent to experts (T x K per forward, TP slices summed)
    cross_node_tokens: torch.Tensor | int = 0  # distinct (token, destination node) pairs on another node
    cross_node_bytes: torch.Tensor | int = 0  # bytes this rank's all-to-alls sent to other nodes


class AllToAllDispatcher:
    """Dispatch tokens to the experts of an EP group and combine their outputs (see module doc).

    rank_nodes[p] is the node of EP rank p (from parallel.gpus_per_node), used to count the traffic
    that crosses node boundaries; the router's node limit is what keeps that traffic bounded.
    """

    def __init__(
        self,
        group,
        n_experts: int,
        tensor_group=None,
        rank_nodes: list[int] | None = None,
        overlap: bool = True,
        fp8_payload: bool = False,
    ):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} experts cannot be split evenly over {self.size} EP ranks")
        self.n_experts, self.n_local = n_experts, n_experts // self.size
        self.tensor_group = tensor_group if tensor_group is not None and tensor_group.size() > 1 else None
        self.rank_nodes = rank_nodes or [0] * self.size
        self.overlap, self.fp8_payload = overlap, fp8_payload
        self.stats = DispatchStats()
        self._expert_node = None  # node of each global expert, on the tokens' device

    def __call__(self, x, weights, indices, experts: nn.Module, shared_experts: nn.Module | None):
        tokens, n_tokens = x, x.size(0)
        if self.tensor_group is not None:
            tokens = TokenSlice.apply(x, self.tensor_group)
            weights = TokenSlice.apply(weights, self.tensor_group)
            indices = indices[_slice_range(n_tokens, self.tensor_group)]
        plan = self.plan(indices, experts.row_alignment(tokens.dtype))
        self._count_traffic(tokens, indices, plan)
        flight = InFlight()
        received = self.start_dispatch(tokens, plan, flight)
        shared = shared_experts(x) if shared_experts is not None else None  # while tokens travel
        received = AllToAllWait.apply(received, flight)
        expert_out = experts(self._by_local_expert(received, plan), plan.local_counts)
        routed = self.combine(expert_out, weights, plan)
        if self.tensor_group is not None:
            routed = GatherTokenSlices.apply(routed, n_tokens, self.tensor_group)
        return routed if shared is None else routed + shared

    def plan(self, indices: torch.Tensor, align: int = 1) -> RoutePlan:
        """Sort the copies by expert and exchange the counts (a small all-to-all, one host sync); the
        received rows will be laid out for the local experts in groups of a multiple of `align` rows."""
        flat = indices.flatten()
        order, inverse = sort_copies(indices)
        send_counts = tokens_per_expert(flat, self.n_experts).view(self.size, self.n_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.cat([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits[: self.size], splits[self.size :]
        local_counts, local_layout = recv_counts.sum(0), None
        if (self.size > 1 and self.n_local > 1) or align > 1:
            # Received rows come by source rank, then local expert; re-sort them by local expert.
            local_expert = torch.arange(self.n_local, device=flat.device).repeat(self.size)
            row_expert = local_expert.repeat_interleave(recv_counts.flatten(), output_size=sum(recv_splits))
            layout_order, position, local_counts = expert_layout(
                row_expert.argsort(stable=True), local_counts, align
            )
            local_layout = (layout_order, position)
        return RoutePlan(order, inverse, send_splits, recv_splits, local_layout, local_counts)

    def start_dispatch(self, x, plan: RoutePlan, flight: InFlight) -> torch.Tensor:
        """Launch the token all-to-all; the result is valid after AllToAllWait.apply(result, flight)."""
        copies = gather_copies(x, plan.order, plan.inverse)
        out = AllToAllStart.apply(
            copies, plan.send_splits, plan.recv_splits, self.group, flight, self._fp8(x)
        )
        if not self.overlap:
            out = AllToAllWait.apply(out, flight)
            flight.works, flight.finish = [], None
        return out

    def dispatch(self, x, indices) -> tuple[torch.Tensor, torch.Tensor, RoutePlan]:
        """Rows this rank's experts receive, sorted by local expert, with their counts."""
        plan = self.plan(indices)
        flight = InFlight()
        received = AllToAllWait.apply(self.start_dispatch(x, plan, flight), flight)
        return self._by_local_expert(received, plan), plan.local_counts, plan

    def combine(self, expert_out, weights, plan: RoutePlan) -> torch.Tensor:
        """Send expert outputs home and sum each token's K outputs by its weights."""
        by_source = expert_out if plan.local_layout is None else from_layout(expert_out, *plan.local_layout)
        returned = AllToAll.apply(by_source, plan.recv_splits, plan.send_splits, self.group)
        return weighted_combine(returned, plan.order, plan.inverse, weights)

    @staticmethod
    def _by_local_expert(received, plan: RoutePlan) -> torch.Tensor:
        return received if plan.local_layout is None else to_layout(received, *plan.local_layout)

    def _fp8(self, x: torch.Tensor) -> bool:
        return self.fp8_payload and x.size(-1) % FP8_TILE == 0

    def _count_traffic(self, x, indices, plan: RoutePlan) -> None:
        nodes, own = self.rank_nodes, self.rank_nodes[self.rank]
        dim = x.size(-1)
        dispatch_row = dim + 4 * dim // FP8_TILE if self._fp8(x) else dim * x.element_size()
        remote_sent = sum(n for p, n in enumerate(plan.send_splits) if nodes[p] != own)
        remote_returned = sum(n for p, n in enumerate(plan.recv_splits) if nodes[p] != own)
        self.stats.tokens += indices.numel()
        self.stats.cross_node_bytes += remote_sent * dispatch_row + remote_returned * dim * x.element_size()
        if remote_sent:
            # A token bound for several experts on one remote node needs to cross the boundary once.
            if self._expert_node is None or self._expert_node.device != indices.device:
                self._expert_node = torch.tensor(nodes, device=indices.device).repeat_interleave(self.n_local)
            reached = torch.zeros(indices.size(0), max(nodes) + 1, dtype=torch.bool, device=indices.device)
            reached.scatter_(1, self._expert_node[indices], True)
            reached[:, own] = False
            self.stats.cross_node_tokens += reached.sum()
