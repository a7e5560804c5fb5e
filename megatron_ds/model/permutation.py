"""Token permutation for the routed experts: each token's K copies sorted by expert, and back.

The experts want their rows contiguous, so the T x K (token, slot) copies are sorted by expert id
(report section 2.1.2). Going there is a gather, rows[i] = x[order[i] // K]; coming back is the
weighted sum of each token's K rows (eq. 12), a gather through the inverse permutation. The
backwards are gathers too: a token's gradient sums its K copies' gradients read through the
inverse, and a row's gradient reads its token's output gradient. Nothing is scattered, so there
are no atomics or accumulating index_put, and no [T, K, D] intermediate is kept: on a CUDA GPU
Inductor compiles each body into one fused kernel that streams its rows once (the combine's
backward adds a tiny one for the [T, K] weight gradients). Sums over the K copies and the weight
gradients accumulate in fp32 (or wider) and come back in the inputs' dtypes.

Experts whose GEMMs want each expert's rows in whole blocks (TE's FP8 GEMMs quantize 16 or 128 rows at
a time) get the sorted layout with every expert's group padded (`align_groups`): zero rows that the
gather writes and the combine never reads, so padding costs no pass of its own.
"""

import torch

from megatron_ds.model.compiled import accumulator, run_fused


def sort_copies(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the copies of [T, K] expert `indices` by expert (stable), for one forward.

    order[i] is the flat copy t K + j at sorted position i; inverse[t, j] is where copy (t, j) went.
    """
    order = indices.flatten().argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse.view_as(indices)


def align_groups(
    order: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sorted layout of (order, inverse) with each expert's rows padded to a multiple of `align`:
    the padded order (-1 at a padding row), where each copy now sits, and the padded counts. The size,
    round_up(rows, align) + align * experts, depends on the row count alone, so nothing is read back to
    the host; the whole blocks left after aligning each group are spread over the groups."""
    if align == 1:
        return order, inverse, counts
    padded_order, positions, padded_counts = aligned_layout(order, counts, align)
    return padded_order, positions[inverse], padded_counts


def aligned_layout(
    order: torch.Tensor, counts: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert (order[i] the source of sorted row i, counts[e] rows of expert e) laid out
    with each group padded to a multiple of `align` rows, in the fixed total of align_groups: the
    padded order (-1 at a padding row), each sorted row's new position, and the padded counts."""
    n, n_rows = counts.numel(), order.numel()
    total = _round_up(n_rows, align) + align * n
    aligned = _round_up(counts, align)
    spare = (total - aligned.sum()) // align  # whole blocks, >= 0
    padded = aligned + align * (spare // n + (torch.arange(n, device=counts.device) < spare % n))
    added = padded - counts
    expert = torch.repeat_interleave(torch.arange(n, device=counts.device), counts, output_size=n_rows)
    positions = torch.arange(n_rows, device=order.device) + (added.cumsum(0) - added)[expert]
    padded_order = torch.full((total,), -1, dtype=order.dtype, device=order.device)
    return padded_order.scatter_(0, positions, order), positions, padded


def expert_layout(
    by_expert: torch.Tensor, counts: torch.Tensor, align: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout experts want for rows that arrive in another order (by_expert[i]: the row at sorted
    position i; counts[e] rows of expert e), padded as in align_groups: (order, position) for
    to_layout / from_layout, and the counts in it."""
    if align > 1:
        order, positions, counts = aligned_layout(by_expert, counts, align)
    else:
        order, positions = by_expert, torch.arange(by_expert.numel(), device=by_expert.device)
    return order, torch.empty_like(positions).scatter_(0, by_expert, positions), counts


def _round_up(n, align: int):
    """n (an int, or a tensor of them) rounded up to a multiple of align."""
    return -(-n // align) * align


def to_layout(x: torch.Tensor, order: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Rows x[order[i]], zeros where order[i] is -1: x's rows in another (maybe padded) layout, where
    position[r] is the place of row r. The backward reads the rows back: both directions are gathers."""
    return ToLayout.apply(x, order, position)


def from_layout(rows: torch.Tensor, order: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The inverse of to_layout: x[r] = rows[position[r]]."""
    return FromLayout.apply(rows, order, position)


class ToLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, position):
        ctx.save_for_backward(order, position)
        # sizes change every step where they come from an all-to-all; a gather is the same bits in any kernel
        return run_fused(_row_or_zero, x, order, dynamic=None)

    @staticmethod
    def backward(ctx, grad):
        order, position = ctx.saved_tensors
        return FromLayout.apply(grad, order, position), None, None


class FromLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, order, position):
        ctx.save_for_backward(order, position)
        return rows.index_select(0, position)

    @staticmethod
    def backward(ctx, grad):
        order, position = ctx.saved_tensors
        return ToLayout.apply(grad, order, position), None, None


def _row_or_zero(x, index):
    """x[index[i]], or zeros where index[i] is -1 (padding; all of them when x is empty)."""
    if x.size(0) == 0:
        return x.new_zeros(index.size(0), *x.shape[1:])
    keep = (index >= 0).view(*index.shape, *[1] * (x.dim() - 1))
    return torch.where(keep, x[index.clamp(min=0)], 0)


def gather_copies(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The rows the experts read: token x[order[i] // K] at position i, [T K, D]."""
    return GatherCopies.apply(x, order, inverse)


def weighted_combine(
    rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] rows[inverse[t, j]]: the experts' outputs home, [T, D]."""
    return WeightedCombine.apply(rows, order, inverse, weights)


class GatherCopies(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return run_fused(_gather_rows, x, order, inverse.size(1))

    @staticmethod
    def backward(ctx, grad_rows):
        (inverse,) = ctx.saved_tensors
        return run_fused(_sum_copies, grad_rows, inverse), None, None


class WeightedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, order, inverse, weights):
        ctx.save_for_backward(rows, order, inverse, weights)
        return run_fused(_weighted_sum, rows, inverse, weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, order, inverse, weights = ctx.saved_tensors
        grad_rows, grad_weights = run_fused(_weighted_sum_backward, grad_out, rows, order, inverse, weights)
        return grad_rows, None, None, grad_weights


def _gather_rows(x, order, k: int):
    return _row_or_zero(x, _token_of(order, k))


def _token_of(order, k: int):
    """The token of each sorted copy (flat copy t K + j), -1 at padding rows."""
    return torch.where(order >= 0, order // k, -1)


# The sums over the K copies are unrolled into K row gathers: as a reduction over a gathered
# [T, K, D] middle dimension, Inductor's kernel reads across rows instead of streaming them.


def _sum_copies(grad_rows, inverse):
    acc = accumulator(grad_rows.dtype)
    return sum(grad_rows[inverse[:, j]].to(acc) for j in range(inverse.size(1))).to(grad_rows.dtype)


def _weighted_sum(rows, inverse, weights):
    acc = accumulator(rows.dtype)
    copies = (rows[inverse[:, j]].to(acc) * weights[:, j, None].to(acc) for j in range(inverse.size(1)))
    return sum(copies).to(rows.dtype)


def _weighted_sum_backward(grad_out, rows, order, inverse, weights):
    """Both gradients from one pass over the sorted rows; the weights' come back through `inverse`."""
    acc = accumulator(rows.dtype)
    grad_copy = _row_or_zero(grad_out, _token_of(order, weights.size(1))).to(acc)  # zeros at padding rows
    grad_rows = grad_copy * _row_or_zero(weights.flatten(), order).to(acc).unsqueeze(-1)
    grad_weights = (grad_copy * rows.to(acc)).sum(-1)[inverse]
    return grad_rows.to(rows.dtype), grad_weights.to(weights.dtype)
