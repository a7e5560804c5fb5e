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
    return x[order // k]


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
    grad_copy = grad_out[order // weights.size(1)].to(acc)
    grad_rows = grad_copy * weights.flatten()[order].to(acc).unsqueeze(-1)
    grad_weights = (grad_copy * rows.to(acc)).sum(-1)[inverse]
    return grad_rows.to(rows.dtype), grad_weights.to(weights.dtype)
