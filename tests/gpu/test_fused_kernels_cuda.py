"""Kernels Inductor compiles on the GPU, against eager runs: RMSNorm at DeepSeek-V3's width, SwiGLU on
changing row counts, MLA's rotary
functions at its head sizes, and the routed experts' BF16 grouped GEMMs with Megatron-Core-style fp32
main_grad views (the weight gradients added by the compiled kernel into each weight's own slice of one
buffer). Run on the H200 by benches/h200_gpu_tests.sh."""

import pytest
import torch

from megatron_ds.model import compiled
from megatron_ds.model.moe import GroupedExperts
from megatron_ds.model.norm import RMSNorm, swiglu
from megatron_ds.model.rope import keys_and_values, rotate_tail

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

EXPERTS, DIM, INTER, ROWS = 16, 1024, 512, 8192


def experts_and_batch():
    torch.manual_seed(0)
    experts = GroupedExperts(EXPERTS, DIM, INTER).cuda().bfloat16()
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=DIM**-0.5)
    counts = torch.randint(0, 2 * ROWS // EXPERTS, (EXPERTS,), device="cuda")
    counts[3] = 0
    x = torch.randn(int(counts.sum()), DIM, device="cuda").bfloat16()
    return experts, x, counts


def test_weight_gradients_go_into_main_grad_views():
    assert compiled.compiles("cuda"), "Triton is missing: the GPU would run the eager add"
    experts, x, counts = experts_and_batch()
    probe = torch.randn(x.size(0), DIM, device="cuda").bfloat16()
    experts(x, counts).backward(probe)
    want = {name: w.grad.float() for name, w in experts.named_parameters()}

    # One flat buffer, a weight's main_grad its slice at an offset (as Megatron-Core's DDP lays them).
    sizes = [w.numel() for w in experts.parameters()]
    buffer = torch.full((sum(sizes) + 128,), 0.5, device="cuda")
    start = 64
    for w, size in zip(experts.parameters(), sizes):
        w.grad, w.main_grad = None, buffer[start : start + size].view(w.shape)
        start += size
    torch._dynamo.reset()
    for _ in range(2):  # the second pass must add, and reuse the compiled kernel
        experts(x, counts).backward(probe)
    for name, w in experts.named_parameters():
        assert w.grad is None, name
        torch.testing.assert_close(w.main_grad, 0.5 + 2 * want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert (buffer[:64] == 0.5).all() and (buffer[-64:] == 0.5).all()


def test_rotary_functions_match_eager(monkeypatch):
    """bf16 at DeepSeek-V3's widths (128 heads, 128 + 64 query/key, 128 values), 512 positions."""
    assert compiled.compiles("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, nope, rope_dim, v_dim, seq = 128, 128, 64, 128, 512
    angles = torch.rand(seq, rope_dim // 2, device="cuda", generator=gen) * 100
    rope = (angles.cos(), angles.sin())
    q = torch.randn(1, seq, heads, nope + rope_dim, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(1, seq, heads, nope + v_dim, device="cuda", generator=gen).bfloat16()
    k_rope = torch.randn(1, seq, rope_dim, device="cuda", generator=gen).bfloat16()
    probes = [torch.randn(1, seq, heads, d, device="cuda", generator=gen).bfloat16() for d in (192, 192, 128)]
    results = []
    for use_compiled in (True, False):
        monkeypatch.setattr(compiled, "compiles", lambda device_type, c=use_compiled: c)
        leaves = [t.clone().requires_grad_() for t in (q, kv, k_rope)]
        outs = (rotate_tail(leaves[0], rope), *keys_and_values(leaves[1], leaves[2], rope, nope))
        sum((o.float() * p).sum() for o, p in zip(outs, probes)).backward()
        results.append([o.detach() for o in outs] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_rms_norm_matches_eager(monkeypatch):
    """bf16 at DeepSeek-V3's width (7168), 2 x 4096 rows: the output and both gradients."""
    assert compiled.compiles("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    norm = RMSNorm(7168).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(7168, device="cuda", generator=gen))
    x = (4 * torch.randn(2, 4096, 7168, device="cuda", generator=gen)).bfloat16()
    probe = torch.randn(x.shape, device="cuda", generator=gen).bfloat16()
    results = []
    for use_compiled in (True, False):
        monkeypatch.setattr(compiled, "compiles", lambda device_type, c=use_compiled: c)
        leaf = x.clone().requires_grad_()
        norm.weight.grad = None
        y = norm(leaf)
        (y.float() * probe).sum().backward()
        results.append([y.detach(), leaf.grad, norm.weight.grad])
    for got, want in zip(*results):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)


def test_swiglu_matches_eager_for_changing_row_counts(monkeypatch):
    """bf16 at the routed experts' width (2048), with row counts that change as theirs do each step;
    a forward replayed (recomputation) after other sizes ran gives the same bits as the first."""
    assert compiled.compiles("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [[(4 * torch.randn(rows, 2048, device="cuda", generator=gen)).bfloat16() for _ in range(3)]
              for rows in (8192, 8320, 6400)]  # fmt: skip
    first = None
    for gate, up, probe in inputs:
        results = []
        for use_compiled in (True, False):
            monkeypatch.setattr(compiled, "compiles", lambda device_type, c=use_compiled: c)
            leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
            h = swiglu(*leaves)
            (h.float() * probe).sum().backward()
            results.append([h.detach(), *(t.grad for t in leaves)])
        first = results[0][0] if first is None else first
        for got, want in zip(*results):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
    monkeypatch.setattr(compiled, "compiles", lambda device_type: True)
    assert torch.equal(swiglu(*inputs[0][:2]), first)
