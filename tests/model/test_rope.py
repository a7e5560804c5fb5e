"""MLA's fused rotary functions against the unfused composition, with the rotation written as DeepSeek's
reference model writes it: consecutive pairs as complex numbers times e^{i angle}."""

import pytest
import torch

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.rope import keys_and_values, rotate_tail

BATCH, SEQ, HEADS, NOPE, ROPE, V = 2, 5, 3, 4, 6, 7


def reference_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, dim] rotated by angles [seq, dim / 2], in complex arithmetic."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turned = pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(turned).flatten(-2)


def inputs(dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(SEQ, ROPE // 2, generator=gen, dtype=torch.float64) * 20
    rope = (angles.cos().to(dtype), angles.sin().to(dtype))
    q = torch.randn(BATCH, SEQ, HEADS, NOPE + ROPE, generator=gen, dtype=dtype, requires_grad=True)
    kv = torch.randn(BATCH, SEQ, HEADS, NOPE + V, generator=gen, dtype=dtype, requires_grad=True)
    k_rope = torch.randn(BATCH, SEQ, ROPE, generator=gen, dtype=dtype, requires_grad=True)
    return angles.to(dtype), rope, q, kv, k_rope


def fused(q, kv, k_rope, rope):
    return (rotate_tail(q, rope), *keys_and_values(kv, k_rope, rope, NOPE))


def unfused(q, kv, k_rope, angles):
    q_out = torch.cat([q[..., :NOPE], reference_rotary(q[..., NOPE:], angles)], dim=-1)
    k_nope, v = kv.split([NOPE, V], dim=-1)
    k_shared = reference_rotary(k_rope.unsqueeze(2), angles).expand(-1, -1, HEADS, -1)
    return q_out, torch.cat([k_nope, k_shared], dim=-1), v


def values_and_gradients(outputs, leaves, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outputs, probes)), leaves)
    return [o.detach() for o in outputs], list(grads)


def test_fused_rotary_matches_reference_in_fp64():
    angles, rope, q, kv, k_rope = inputs(torch.float64)
    got = values_and_gradients(fused(q, kv, k_rope, rope), [q, kv, k_rope])
    want = values_and_gradients(unfused(q, kv, k_rope, angles), [q, kv, k_rope])
    for g, w in zip(sum(got, []), sum(want, [])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_nope_parts_pass_through_and_values_are_not_views():
    _, rope, q, kv, k_rope = inputs(torch.float32)
    q_out, k, v = fused(q, kv, k_rope, rope)
    assert torch.equal(q_out[..., :NOPE], q[..., :NOPE]) and torch.equal(k[..., :NOPE], kv[..., :NOPE])
    assert torch.equal(v, kv[..., NOPE:]) and v.is_contiguous()
    assert v.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    # One shared rope key for every head.
    assert torch.equal(k[..., NOPE:], k[:, :, :1, NOPE:].expand(-1, -1, HEADS, -1))


def test_bf16_matches_fp32_rotation_rounded_once():
    """In bf16 the rotation runs in fp32 and rounds once; the shared key's gradient sums heads in fp32."""
    angles, rope, q, kv, k_rope = inputs(torch.float32)
    want = values_and_gradients(unfused(q, kv, k_rope, angles), [q, kv, k_rope])
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, kv, k_rope)]
    got = values_and_gradients(fused(*bf16, tuple(t.float() for t in rope)), bf16)
    for g, w in zip(sum(got, []), sum(want, [])):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_compiled_bodies_match_eager(monkeypatch):
    """The bodies as Inductor compiles them (here for CPU; on the GPU they become Triton kernels)."""
    _, rope, q, kv, k_rope = inputs(torch.float32)
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
        results.append(values_and_gradients(fused(q, kv, k_rope, rope), [q, kv, k_rope]))
    for eager, compiled in zip(*(sum(r, []) for r in results)):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
