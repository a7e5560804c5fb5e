"""The gather-only token permutation against plain indexing, whose autograd scatters."""

import pytest
import torch

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.permutation import gather_copies, sort_copies, weighted_combine

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
