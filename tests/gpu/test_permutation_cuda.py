"""The fused (Inductor-compiled) token permutation on a GPU at the dsv3-slice MoE size, in BF16.

8192 tokens of dim 7168, 16 experts top-8: 65536 rows. The compiled bodies must match the eager
ones (same math, other summation order) and both an FP32 plain-indexing reference. Run on the H200:
python3 -m pytest -q -s -o addopts="" tests/gpu/test_permutation_cuda.py
"""

import pytest
import torch

from megatron_ds.model import compiled
from megatron_ds.model.permutation import gather_copies, sort_copies, weighted_combine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOKENS, DIM, K, EXPERTS = 8192, 7168, 8, 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(x, weights, indices, probe):
    """Output and gradients of gather -> (a row-wise stand-in for the experts) -> combine."""
    x, weights = (t.clone().requires_grad_() for t in (x, weights))
    order, inverse = sort_copies(indices)
    out = weighted_combine(gather_copies(x, order, inverse) * 1.5, order, inverse, weights)
    (out.float() * probe).sum().backward()
    return out, x.grad, weights.grad


def reference(x, weights, indices, probe):
    """The same in FP32 through plain indexing (autograd scatters with index_put / index_copy)."""
    x, weights = (t.float().requires_grad_() for t in (x, weights))
    order = indices.flatten().argsort(stable=True)
    rows = x[order // K] * 1.5
    unsorted = torch.empty_like(rows).index_copy(0, order, rows)
    out = (unsorted.view(TOKENS, K, DIM) * weights.unsqueeze(-1)).sum(1)
    (out * probe).sum().backward()
    return out, x.grad, weights.grad


def test_fused_permutation_matches_eager_and_reference_in_bf16(monkeypatch):
    assert compiled.compiles("cuda"), "Triton is missing: the GPU would run the eager bodies"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, DIM, device="cuda", generator=gen).bfloat16()
    scores = torch.rand(TOKENS, EXPERTS, device="cuda", generator=gen)
    scores[:, 3] = -1  # expert 3 receives no rows
    weights, indices = scores.topk(K, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).bfloat16()
    probe = torch.randn(TOKENS, DIM, device="cuda", generator=gen)

    fused = run(x, weights, indices, probe)
    monkeypatch.setattr(compiled, "compiles", lambda device_type: False)
    eager = run(x, weights, indices, probe)
    want = reference(x, weights, indices, probe)

    for name, f, e, w in zip(("out", "x grad", "weights grad"), fused, eager, want):
        assert f.dtype == torch.bfloat16, name
        torch.testing.assert_close(f, e, msg=name)  # BF16's default tolerances
        assert rel(f, w) < 1e-2, (name, rel(f, w))
