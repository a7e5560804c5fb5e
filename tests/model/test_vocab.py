"""The vocabulary layers: the fused head loss (the GPU's path, its bodies run eagerly here, and compiled
by Inductor in the slow test) against F.cross_entropy over F.linear's fp32 logits, and both weight
gradients accumulated into a main_grad buffer against plain autograd."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ds.model import compiled as compiled_module
from megatron_ds.model.vocab import LinearCrossEntropy, embedding

TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def problem(dtype, shape=(2, 3, 5), dim=16, vocab=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, dim, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype) / dim**0.5
    labels = torch.randint(vocab, shape, generator=gen)
    probe = torch.rand(shape, generator=gen, dtype=torch.float32)  # per-token loss weights
    return h, weight, labels, probe


def reference(h, weight, labels, probe):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)
    (loss * probe).sum().backward()
    return loss, h.grad, weight.grad


def fused_loss(h, weight, labels):
    return LinearCrossEntropy.apply(h.flatten(0, -2), weight, labels.flatten()).view_as(labels)


def fused(h, weight, labels, probe):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_loss(h, weight, labels)
    (loss * probe).sum().backward()
    return loss, h.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5)])
def test_matches_cross_entropy_of_linear(dtype, shape):
    args = problem(dtype, shape)
    for got, want, name in zip(fused(*args), reference(*args), ("loss", "h grad", "weight grad")):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=name)


def test_bf16_logits_keep_fp32_loss_and_bf16_gradients():
    """In bf16 both compute the softmax in fp32 from the GEMM's bf16 logits: one rounding apart."""
    args = problem(torch.bfloat16, (4, 9), dim=64, vocab=101)
    got, want = fused(*args), reference(*args)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w, name in zip(got[1:], want[1:], ("h grad", "weight grad")):
        assert g.dtype == torch.bfloat16, name
        assert (g.float() - w.float()).norm() <= 1e-2 * w.float().norm(), name


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_accumulates_into_main_grad(weight_dtype):
    """Under Megatron-Core's DDP the weight gradient lands in its fp32 main_grad, added to what the
    buffer held (earlier micro-batches), and no .grad is left for DDP's hook to add again."""
    h, weight, labels, probe = problem(weight_dtype, (3, 4), dim=32, vocab=50)
    _, _, want = reference(h.float(), weight.float(), labels, probe)
    weight = weight.clone().requires_grad_()
    earlier = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    weight.main_grad = earlier.clone()
    (fused_loss(h, weight, labels) * probe).sum().backward()
    assert weight.grad is None
    tolerance = TOLERANCE[torch.float32] if weight_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(weight.main_grad - earlier, want, **tolerance)


def test_main_grads_found_under_saved_tensor_hooks():
    """Selective recomputation packs saved tensors through hooks, and autograd then hands a saved
    parameter back as a new tensor object without its main_grad: the head's and the embedding's
    gradients must still go to main_grad, not to a .grad."""
    h, weight, labels, probe = problem(torch.float32, (3, 4), dim=32, vocab=50)
    head, table = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    head.main_grad, table.main_grad = torch.zeros_like(weight), torch.zeros_like(weight)
    ids = labels % weight.size(0)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = (fused_loss(h, head, labels) * probe).sum() + embedding(ids, table).sum()
    loss.backward()
    assert head.grad is None and table.grad is None
    assert head.main_grad.any() and table.main_grad.any()


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_embedding_gradient_accumulates_into_main_grad(weight_dtype):
    """Two lookups (main model and MTP), repeated ids: both gradients summed into main_grad in fp32."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(11, 6, generator=gen).to(weight_dtype)
    ids = [torch.randint(11, (3, 5), generator=gen) for _ in range(2)]
    probes = [torch.randn(3, 5, 6, generator=gen) for _ in range(2)]
    ref = weight.float().clone().requires_grad_()
    sum((F.embedding(i, ref) * p).sum() for i, p in zip(ids, probes)).backward()

    ours = weight.clone().requires_grad_()
    earlier = torch.randn(weight.shape, generator=gen)
    ours.main_grad = earlier.clone()
    outs = [embedding(i, ours) for i in ids]
    assert all(torch.equal(o, F.embedding(i, weight)) for o, i in zip(outs, ids))
    sum((o * p).sum() for o, p in zip(outs, probes)).backward()
    assert ours.grad is None
    tolerance = TOLERANCE[torch.float32] if weight_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ours.main_grad - earlier, ref.grad, **tolerance)


def test_second_backward_through_the_graph_fails_loudly():
    """The backward turns the saved logits into their gradient in place; autograd's version check
    must refuse a second pass rather than compute from overwritten logits."""
    h, weight, labels, probe = problem(torch.float32)
    h.requires_grad_()
    loss = (fused_loss(h, weight, labels) * probe).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.slow
def test_compiled_kernels_match_eager(monkeypatch):
    """The loss and gradient bodies as Inductor compiles them (CPU here; Triton on the GPU)."""
    args = problem(torch.float32, (6, 5), dim=16, vocab=67)
    results = []
    for compiled in (False, True):
        monkeypatch.setattr(compiled_module, "compiles", lambda device_type, compiled=compiled: compiled)
        results.append(fused(*args))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **TOLERANCE[torch.float32])
