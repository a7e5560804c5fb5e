"""Selective recomputation: the same loss and gradients, fewer activations kept for the backward."""

import pytest
import torch
from torch import nn

from megatron_ds.config import ConfigError, load_config
from megatron_ds.model.norm import RMSNorm
from parallel.parallelize import ModelGroups, build_model
from parallel.recompute import CHECKPOINTED, REGIONS, NormOutputs, bytes_kept_for_backward


def tiny(*regions: str):
    listed = ",".join(regions)
    return load_config("tiny", overrides=["precision.params_dtype=fp32", f"train.recompute=[{listed}]"])


def kept_bytes_and_grads(regions: tuple[str, ...]):
    """Bytes autograd keeps for the backward, the loss and the gradients."""
    model = build_model(tiny(*regions), "cpu", ModelGroups())
    tokens = torch.randint(0, model.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    outputs = []
    forward = lambda: outputs.append(model(tokens[:, :-1], labels=tokens[:, 1:]))  # noqa: E731
    kept = bytes_kept_for_backward(forward, model.parameters())
    loss = outputs[0].lm_loss + 0.3 * outputs[0].mtp_loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return kept, loss.detach(), grads


@pytest.fixture(scope="module")
def baseline():
    return kept_bytes_and_grads(())


@pytest.mark.parametrize("regions", [(name,) for name in REGIONS] + [tuple(REGIONS)])
def test_recompute_keeps_less_and_changes_nothing(baseline, regions):
    base_bytes, base_loss, base_grads = baseline
    kept, loss, grads = kept_bytes_and_grads(regions)
    assert kept < base_bytes, f"{regions}: {kept} bytes kept, {base_bytes} without recomputation"
    assert torch.equal(loss, base_loss)
    assert grads.keys() == base_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, base_grads[name], rtol=0, atol=0, msg=name)


def test_recompute_config_is_checked():
    with pytest.raises(ConfigError, match="unknown regions"):
        tiny("attention")
    # The TE backend replays through TE's checkpoint, in FP8 too (tests/gpu/test_te_backend.py).
    listed = ",".join(REGIONS)
    te = ["precision.linear_impl=te", "precision.fp8=blockwise", f"train.recompute=[{listed}]"]
    assert load_config("tiny", overrides=te).train.recompute == list(REGIONS)


def test_every_region_names_a_method_of_its_class():
    """The TE backend's classes (TEGroupedExperts) only run on a GPU: catch a missing method here."""
    for name, targets in CHECKPOINTED.items():
        for cls, method in targets:
            assert callable(getattr(cls, method, None)), f"{name}: {cls.__name__} has no {method}"


@pytest.mark.slow
def test_recompute_with_compiled_bodies_changes_nothing(monkeypatch):
    """As the GPU runs them: the fused bodies compiled (here by Inductor for the CPU). A replay must
    hit the kernels the forward ran, whatever the tensors' requires_grad or Parameter-ness, or its bits
    differ from what the backward would have kept."""
    from megatron_ds.model import compiled

    monkeypatch.setattr(compiled, "compiles", lambda device_type: True)
    torch._dynamo.reset()
    runs = []
    for params, regions in [(p, r) for p in ("fp32", "bf16") for r in ("", ",".join(REGIONS))]:
        cfg = load_config(
            "tiny", overrides=[f"precision.params_dtype={params}", f"train.recompute=[{regions}]"]
        )
        model = build_model(cfg, "cpu", ModelGroups())
        tokens = torch.randint(0, model.args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        (out.lm_loss + 0.3 * out.mtp_loss).backward()
        runs.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    for base, recomputed in (runs[:2], runs[2:]):
        for name, grad in recomputed.items():
            assert torch.equal(grad, base[name]), name


class NormAndReaders(nn.Module):
    """A norm whose output two GEMMs read, one of them through a view (as the router and the shared
    experts read the MoE's normed input)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.first = nn.Linear(dim, 8, bias=False)
        self.second = nn.Linear(dim, 8, bias=False)

    def forward(self, x):
        y = self.norm(x)
        return self.first(y) * self.second(y.flatten(0, 1)).view(*x.shape[:2], 8)


def test_norm_outputs_are_recomputed_once_not_kept():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    plain, recomputed = NormAndReaders(), NormAndReaders()
    recomputed.load_state_dict(plain.state_dict())
    runs = {"norm": 0}

    def counting(x):
        runs["norm"] += 1
        return RMSNorm.forward(recomputed.norm, x)

    recomputed.norm.forward = counting
    NormOutputs().apply(recomputed)
    results = []
    for model in (plain, recomputed):
        x.grad = None
        out = []
        kept = bytes_kept_for_backward(lambda: out.append(model(x)), model.parameters())  # noqa: B023
        out[0].square().sum().backward()
        results.append((kept, out[0], x.grad, *(p.grad for p in model.parameters())))
    assert results[0][0] - results[1][0] == x.numel() * 4  # the norm's output, fp32
    assert runs["norm"] == 2  # the forward, and one replay for both readers
    for got, want in zip(results[1][1:], results[0][1:]):
        assert torch.equal(got, want)
