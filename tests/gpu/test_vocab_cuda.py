"""The fused output-head loss on a GPU at DeepSeek-V3's head size (dim 7168, vocabulary 129,280), BF16.

The compiled kernels must match the eager bodies and an fp32 reference, and the weight gradient
accumulated into an fp32 main_grad (cuBLAS with bf16 operands and an fp32 accumulator) must match
the bf16 gradient it replaces. Run on the H200 by benches/h200_gpu_tests.sh.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.model import compiled
from megatron_ds.model.vocab import LinearCrossEntropy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOKENS, DIM, VOCAB = 2048, 7168, 129280


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(TOKENS, DIM, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(VOCAB, DIM, device="cuda", generator=gen) / DIM**0.5).bfloat16()
    labels = torch.randint(VOCAB, (TOKENS,), device="cuda", generator=gen)
    probe = torch.rand(TOKENS, device="cuda", generator=gen) / TOKENS  # a masked mean's weights
    return h, weight, labels, probe


def fused(h, weight, labels, probe, main_grad=None):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    if main_grad is not None:
        weight.main_grad = main_grad
    loss = LinearCrossEntropy.apply(h, weight, labels)  # eager where `compiles` is patched off
    (loss * probe).sum().backward()
    return loss, h.grad, weight.grad if main_grad is None else weight.main_grad


def reference(h, weight, labels, probe):
    h, weight = h.float().requires_grad_(), weight.float().requires_grad_()
    loss = F.cross_entropy(F.linear(h, weight), labels, reduction="none")
    (loss * probe).sum().backward()
    return loss, h.grad, weight.grad


def test_fused_head_loss_matches_eager_and_fp32_reference(problem, monkeypatch):
    assert compiled.compiles("cuda"), "Triton is missing: the GPU would run the eager bodies"
    got = fused(*problem)
    fp32_main_grad = fused(*problem, main_grad=torch.zeros(VOCAB, DIM, device="cuda"))
    monkeypatch.setattr(compiled, "compiles", lambda device_type: False)
    eager = fused(*problem)
    want = reference(*problem)
    for name, g, e, w in zip(("loss", "h grad", "weight grad"), got, eager, want):
        assert g.dtype == (torch.float32 if name == "loss" else torch.bfloat16), name
        torch.testing.assert_close(g, e, msg=name)
        assert rel(g, w) < 1e-2, (name, rel(g, w))
    assert fp32_main_grad[2].dtype == torch.float32
    assert rel(fp32_main_grad[2], want[2]) < 1e-2
    assert rel(fp32_main_grad[2], got[2]) < 1e-2
