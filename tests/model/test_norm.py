"""The fused RMSNorm and SwiGLU against their formulas written out and against torch's own functions
(F.rms_norm, F.silu), and what they keep for the backward."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.norm import FusedRMSNorm, FusedSwiGLU, RMSNorm, swiglu
from parallel.recompute import bytes_kept_for_backward

DIM, EPS = 24, 1e-6


def norm_and_input(dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(DIM, EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(DIM, generator=gen, dtype=torch.float64))
    x = (3 * torch.randn(2, 5, DIM, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    return norm, x


def value_and_gradients(y, leaves, seed: int = 1):
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [y.detach(), *torch.autograd.grad((y * probe.to(y.dtype)).sum(), leaves)]


def written_out(x, weight):
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS) * weight


def test_matches_rmsnorm_written_out_in_fp64():
    norm, x = norm_and_input(torch.float64)
    got = value_and_gradients(norm(x), [x, norm.weight])
    want = value_and_gradients(written_out(x, norm.weight), [x, norm.weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: FusedRMSNorm.apply(x, w, EPS), (x, norm.weight))


def test_bf16_computes_in_fp32_and_rounds_once():
    """bf16 in and out, with the value and both gradients those of F.rms_norm on fp32 copies."""
    norm, x = norm_and_input(torch.bfloat16)
    got = value_and_gradients(norm(x), [x, norm.weight])
    x32, w32 = (t.detach().float().requires_grad_() for t in (x, norm.weight))
    want = value_and_gradients(F.rms_norm(x32, (DIM,), w32, EPS), [x32, w32])
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.bfloat16().float(), rtol=8e-3, atol=1e-2)


def test_keeps_its_input_and_one_fp32_scale_per_row():
    norm, x = norm_and_input(torch.bfloat16)
    kept = bytes_kept_for_backward(lambda: norm(x), norm.parameters())
    assert kept == x.numel() * 2 + x[..., 0].numel() * 4


@pytest.mark.slow
def test_compiled_bodies_match_eager(monkeypatch):
    """The bodies as Inductor compiles them (here for CPU; on the GPU they become Triton kernels)."""
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
        norm, x = norm_and_input(torch.float32)
        results.append(value_and_gradients(norm(x), [x, norm.weight]))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def gate_and_up(dtype, rows: int = 10, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [(4 * torch.randn(rows, DIM, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
            for _ in range(2)]  # fmt: skip


def test_swiglu_matches_its_formula_in_fp64():
    gate, up = gate_and_up(torch.float64)
    got = value_and_gradients(swiglu(gate, up), [gate, up])
    want = value_and_gradients(gate * torch.sigmoid(gate) * up, [gate, up])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(FusedSwiGLU.apply, (gate, up))


def test_swiglu_in_bf16_computes_in_fp32_and_rounds_once():
    gate, up = gate_and_up(torch.bfloat16)
    got = value_and_gradients(swiglu(gate, up), [gate, up])
    gate32, up32 = (t.detach().float().requires_grad_() for t in (gate, up))
    want = value_and_gradients(F.silu(gate32) * up32, [gate32, up32])
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.bfloat16().float(), rtol=8e-3, atol=1e-2)


def test_swiglu_keeps_gate_and_up_only():
    """Eager silu(gate) * up also keeps silu(gate) for the product's backward: a third tensor."""
    gate, up = gate_and_up(torch.bfloat16)
    assert bytes_kept_for_backward(lambda: swiglu(gate, up), []) == 2 * gate.numel() * 2
    assert bytes_kept_for_backward(lambda: F.silu(gate) * up, []) == 3 * gate.numel() * 2


@pytest.mark.slow
def test_compiled_swiglu_matches_eager_for_every_row_count(monkeypatch):
    """One dynamic kernel serves the routed experts' changing row counts, with eager's values."""
    for rows in (10, 7, 33):
        results = []
        for compiled in (False, True):
            monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
            gate, up = gate_and_up(torch.float32, rows)
            results.append(value_and_gradients(swiglu(gate, up), [gate, up]))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
