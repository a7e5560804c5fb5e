"""The routed experts' grouped GEMM with its weight gradient added into an fp32 main_grad (the GPU's path
under Megatron-Core's DDP; torch._grouped_mm runs on the CPU too) against torch's own autograd."""

import pytest
import torch

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.moe import GroupedMatmulIntoMainGrad

ROWS, DIM, OUT = 24, 16, 8
# Expert 1 gets no rows, expert 3 all the rest.
OFFSETS = torch.tensor([5, 5, 13, ROWS], dtype=torch.int32)


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, DIM, generator=gen).bfloat16()
    weights = torch.randn(len(OFFSETS), DIM, OUT, generator=gen).bfloat16()
    probe = torch.randn(ROWS, OUT, generator=gen).bfloat16()
    earlier = torch.randn(len(OFFSETS), DIM, OUT, generator=gen)  # a previous micro-batch's sum
    return x, weights, probe, earlier


def test_matches_autograd_and_accumulates_like_ddp_hook():
    x, weights, probe, earlier = problem()
    xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = torch._grouped_mm(xs, ws, offs=OFFSETS)
    out.backward(probe)

    xm, wm = x.clone().requires_grad_(), weights.clone().requires_grad_()
    wm.main_grad = earlier.clone()
    got = GroupedMatmulIntoMainGrad.apply(xm, wm, OFFSETS)
    got.backward(probe)

    assert torch.equal(got, out) and torch.equal(xm.grad, xs.grad)
    assert wm.grad is None, "the weight gradient must go to main_grad only"
    assert torch.equal(wm.main_grad, earlier + ws.grad.float())  # DDP's hook: main_grad.add_(grad)
    assert not wm.main_grad[1].ne(earlier[1]).any(), "an expert without rows gets no gradient"


def test_main_grad_found_under_saved_tensor_hooks():
    """Selective recomputation packs saved tensors through hooks, and autograd then hands a saved
    parameter back as a new tensor object without its main_grad: the gradient must still get there."""
    x, weights, probe, earlier = problem()
    wm = weights.clone().requires_grad_()
    wm.main_grad = earlier.clone()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = GroupedMatmulIntoMainGrad.apply(x, wm, OFFSETS)
    out.backward(probe)
    torch._grouped_mm(x, weights.requires_grad_(), offs=OFFSETS).backward(probe)
    assert wm.grad is None
    assert torch.equal(wm.main_grad, earlier + weights.grad.float())


def test_frozen_input_gets_no_gradient():
    x, weights, probe, earlier = problem()
    wm = weights.clone().requires_grad_()
    wm.main_grad = torch.zeros_like(earlier)
    GroupedMatmulIntoMainGrad.apply(x, wm, OFFSETS).backward(probe)
    torch._grouped_mm(x, weights.requires_grad_(), offs=OFFSETS).backward(probe)
    assert torch.equal(wm.main_grad, weights.grad.float())


@pytest.mark.slow
def test_compiled_accumulation_matches_eager(monkeypatch):
    """The fused add as Inductor compiles it (here for CPU; on the GPU a Triton kernel), into a view
    of a larger buffer as DDP's main_grad is."""
    x, weights, probe, earlier = problem()
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
        buffer = torch.zeros(earlier.numel() + 64)
        wm = weights.clone().requires_grad_()
        wm.main_grad = buffer[32 : 32 + earlier.numel()].view_as(earlier).copy_(earlier)
        GroupedMatmulIntoMainGrad.apply(x, wm, OFFSETS).backward(probe)
        assert not buffer[:32].any() and not buffer[-32:].any()
        results.append(wm.main_grad)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
