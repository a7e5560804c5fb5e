"""The gather-only token permutation against plain indexing, whose autograd scatters, and the padded
layouts of experts whose GEMMs want aligned groups."""

import pytest
import torch
from aligned_experts import AlignedExperts

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.moe import GroupedExperts, LocalDispatcher, run_on_sorted_rows
from megatron_ds.model.permutation import (
    aligned_layout,
    expert_layout,
    from_layout,
    gather_copies,
    sort_copies,
    to_layout,
    weighted_combine,
)

TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}
# tokens, K, experts, dim; experts 2-3 are never chosen, so some experts receive no rows.
SHAPES = [(1, 1, 4, 3), (1, 4, 8, 5), (0, 2, 8, 4), (29, 1, 8, 6), (37, 4, 16, 8)]


def routing(n_tokens: int, k: int, n_experts: int, dim: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(n_experts) if e not in (2, 3)])
    chosen = [allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(n_tokens)]
    indices = torch.stack(chosen) if chosen else torch.empty(0, k, dtype=torch.long)
    x = torch.randn(n_tokens, dim, generator=gen, dtype=dtype)
    weights = torch.rand(n_tokens, k, generator=gen, dtype=dtype)
    rows = torch.randn(n_tokens * k, dim, generator=gen, dtype=dtype)
    return x, weights, indices, rows


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_sort_copies_orders_by_expert_and_inverts():
    _, _, indices, _ = routing(37, 4, 16, 1, torch.float32)
    order, inverse = sort_copies(indices)
    assert torch.equal(order, indices.flatten().argsort(stable=True))
    assert inverse.shape == indices.shape
    assert torch.equal(order[inverse.flatten()], torch.arange(indices.numel()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_copies_matches_indexing(shape, dtype):
    x, _, indices, _ = routing(*shape, dtype)
    probe = torch.randn(indices.numel(), shape[3], dtype=dtype)
    order, inverse = sort_copies(indices)
    (ours, ref) = leaves(x, x)
    rows = gather_copies(ours, order, inverse)
    ref_rows = ref[order // shape[1]]
    (rows * probe).sum().backward()
    (ref_rows * probe).sum().backward()
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(ours.grad, ref.grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_combine_matches_unpermute_and_sum(shape, dtype):
    _, weights, indices, rows = routing(*shape, dtype)
    probe = torch.randn(shape[0], shape[3], dtype=dtype)
    order, inverse = sort_copies(indices)
    rows, weights, ref_rows, ref_weights = leaves(rows, weights, rows, weights)
    out = weighted_combine(rows, order, inverse, weights)
    unsorted = torch.empty_like(ref_rows).index_copy(0, order, ref_rows)
    ref_out = (unsorted.view(*weights.shape, shape[3]) * ref_weights.unsqueeze(-1)).sum(1)
    (out * probe).sum().backward()
    (ref_out * probe).sum().backward()
    for got, want in ((out, ref_out), (rows.grad, ref_rows.grad), (weights.grad, ref_weights.grad)):
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_bf16_keeps_dtypes_and_accumulates_in_fp32():
    x, weights, indices, _ = routing(37, 4, 16, 64, torch.float32)
    order, inverse = sort_copies(indices)
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        xs, ws = leaves(x.to(dtype), weights.to(dtype))
        out = weighted_combine(gather_copies(xs, order, inverse).tanh(), order, inverse, ws)
        out.float().square().sum().backward()
        results.append((out, xs.grad, ws.grad))
    for (low, high), name in zip(zip(*results), ("out", "x grad", "weights grad")):
        assert low.dtype == torch.bfloat16, name
        assert (low.float() - high).norm() <= 1e-2 * high.norm(), name


@pytest.mark.slow
def test_compiled_bodies_match_eager(monkeypatch):
    """The bodies as Inductor compiles them (here for CPU; on the GPU they become Triton kernels)."""
    shape = (37, 4, 16, 8)
    x, weights, indices, _ = routing(*shape, torch.float32)
    probe = torch.randn(shape[0], shape[3])
    order, inverse = sort_copies(indices)
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
        xs, ws = leaves(x, weights)
        out = weighted_combine(gather_copies(xs, order, inverse).tanh(), order, inverse, ws)
        (out * probe).sum().backward()
        results.append((out, xs.grad, ws.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **TOLERANCE[torch.float32])


def test_aligned_layout_pads_every_group_to_a_size_known_without_the_counts():
    """TE's FP8 GEMMs take whole 16- or 128-row groups: each expert's rows padded, the total fixed by
    the row count alone (no host read of the counts), the spare blocks spread over the experts."""
    counts = torch.tensor([3, 0, 130, 128])
    order = torch.randperm(261)
    padded_order, positions, sizes = aligned_layout(order, counts, 128)
    assert padded_order.shape == (384 + 4 * 128,)  # round_up(261, 128) + 128 per expert
    assert sizes.tolist() == [256, 128, 384, 128]  # aligned 128, 0, 256, 128 + 3 spare blocks
    starts = sizes.cumsum(0) - sizes
    assert positions.tolist() == [
        *range(3),
        *range(starts[2], starts[2] + 130),
        *range(starts[3], starts[3] + 128),
    ]
    assert torch.equal(padded_order[positions], order)
    assert int((padded_order == -1).sum()) == padded_order.numel() - 261


def test_layout_round_trips_and_its_gradients_are_the_reverse_gathers():
    counts = torch.tensor([3, 0, 17, 16])
    by_expert = torch.randperm(36)
    order, position, sizes = expert_layout(by_expert, counts, 16)
    assert sizes.tolist() == [32, 16, 48, 16] and order.numel() == 112  # 3 spare blocks of 16
    x = torch.randn(36, 8, dtype=torch.float64, requires_grad=True)
    rows = to_layout(x, order, position)
    assert torch.equal(rows[position], x) and rows[order < 0].abs().sum() == 0
    assert torch.equal(rows[: sizes[0]][:3], x[by_expert[:3]])  # expert 0's rows, sorted, then padding
    back = from_layout(rows, order, position)
    assert torch.equal(back, x)
    probe = torch.randn(112, 8, dtype=torch.float64)
    (x_grad,) = torch.autograd.grad((rows * probe).sum(), x)
    assert torch.equal(x_grad, probe[position])
    leaf = rows.detach().requires_grad_()
    (rows_grad,) = torch.autograd.grad((from_layout(leaf, order, position) * probe[:36]).sum(), leaf)
    assert torch.equal(rows_grad[position], probe[:36]) and rows_grad[order < 0].abs().sum() == 0
    assert expert_layout(by_expert, counts, 1)[0] is by_expert  # unpadded: the sort alone


@pytest.mark.parametrize(
    "compiled, shape",
    [
        (False, (37, 4, 16, 8)),
        (False, (0, 2, 8, 4)),
        pytest.param(True, (37, 4, 16, 8), marks=pytest.mark.slow),
    ],
)
def test_dispatch_to_aligned_groups_changes_nothing(monkeypatch, compiled, shape):
    """The padding rows the gather writes are zeros the combine never reads: output and every gradient
    equal the unpadded layout's, in fp64 (also with no tokens at all: only padding rows)."""
    monkeypatch.setattr(compiled_module, "compiles", lambda device_type: compiled)
    x, weights, indices, _ = routing(*shape, torch.float64)
    results = []
    for cls in (GroupedExperts, AlignedExperts):
        torch.manual_seed(0)
        experts = cls(shape[2], shape[3], 6).double()
        for w in experts.parameters():
            torch.nn.init.normal_(w)
        xs, ws = leaves(x, weights)
        out = LocalDispatcher()(xs, ws, indices, experts, None)
        out.square().sum().backward()
        results.append([out, xs.grad, ws.grad, *(w.grad for w in experts.parameters())])
    for aligned, plain in zip(*results):
        torch.testing.assert_close(aligned, plain, **TOLERANCE[torch.float64])


def test_experts_on_sorted_rows_pad_as_the_dispatchers_do():
    """moe.run_on_sorted_rows, for benchmarks and tests that drive experts directly: padded to the
    experts' groups and back, the same output and gradients as without padding."""
    counts = torch.tensor([3, 0, 17, 16])
    x = torch.randn(36, 8, dtype=torch.float64)
    results = []
    for cls in (GroupedExperts, AlignedExperts):
        torch.manual_seed(0)
        experts = cls(4, 8, 6).double()
        for w in experts.parameters():
            torch.nn.init.normal_(w)
        (xs,) = leaves(x)
        out = run_on_sorted_rows(experts, xs, counts)
        out.square().sum().backward()
        results.append([out, xs.grad, *(w.grad for w in experts.parameters())])
    for aligned, plain in zip(*results):
        torch.testing.assert_close(aligned, plain, **TOLERANCE[torch.float64])
