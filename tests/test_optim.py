"""ZeRO-1 AdamW against torch.optim.AdamW, and the global gradient norm, in one process."""

import importlib.util

import pytest
import torch

from megatron_ds.config import load_config
from megatron_ds.optim import ZeroAdamW, global_grad_norm
from parallel.parallelize import build_model


def _step(model, tokens):
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    (out.lm_loss + 0.3 * out.mtp_loss).backward()


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_zero_adamw_matches_torch_adamw(moments):
    cfg = load_config("tiny", overrides=[f"precision.bf16_optimizer_moments={moments == 'bf16'}"])
    ours, theirs = build_model(cfg), build_model(cfg)
    optimizer = ZeroAdamW(ours, cfg, lambda p: None)
    reference = torch.optim.AdamW(
        [{"params": [p for p in theirs.parameters() if p.dim() > 1], "weight_decay": cfg.train.weight_decay},
         {"params": [p for p in theirs.parameters() if p.dim() == 1], "weight_decay": 0.0}],
        lr=1e-3, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8,
    )  # fmt: skip
    start = [p.detach().clone() for p in theirs.parameters()]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        _step(ours, tokens)
        _step(theirs, tokens)
        norm = global_grad_norm(ours, world_size=1, pipeline=1)
        expected = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 1e9)
        if step == 0:  # later the bf16-moment run has drifted by design
            assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        optimizer.step(1e-3)
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    for (name, a), b, b0 in zip(ours.named_parameters(), theirs.parameters(), start):
        # Adam amplifies float rounding where moments are near zero, so compare whole updates:
        # fp32 moments agree to 0.1%, bf16 moments (rounded by design) to 5%.
        tolerance = 1e-3 if moments == "fp32" else 0.05
        assert ((a - b).norm() / (b - b0).norm()).item() < tolerance, name


def test_the_backend_follows_optimizer_impl_and_the_device():
    from megatron_ds.config import ConfigError
    from megatron_ds.optim import ZeroOneOptimizer
    from megatron_ds.train import build_optimizer

    cfg = load_config("tiny", overrides=["model.n_layers=2"])
    model = build_model(cfg, "cpu")
    assert isinstance(build_optimizer(cfg, model, [model], torch.device("cpu"), 1), ZeroOneOptimizer)
    megatron = load_config("tiny", overrides=["model.n_layers=2", "train.optimizer_impl=megatron"])
    with pytest.raises(ConfigError, match="train.optimizer_impl=zero1"):
        build_optimizer(megatron, model, [model], torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="optimizer_impl='adam'"):
        load_config("tiny", overrides=["train.optimizer_impl=adam"])


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is not None,
    reason="checks the behaviour without Transformer Engine",
)
def test_bf16_moments_without_transformer_engine_stay_on_ours_or_say_what_to_install():
    """Megatron-Core keeps BF16 moments only in TE's FusedAdam (its precision-aware optimizer)."""
    from megatron_ds.config import ConfigError
    from megatron_ds.optim import ZeroOneOptimizer
    from megatron_ds.train import build_optimizer
    from parallel.megatron_optimizer import MegatronOptimizer

    moments = ["model.n_layers=2", "precision.bf16_optimizer_moments=true"]
    cfg = load_config("tiny", overrides=moments)
    model = build_model(cfg, "cpu")
    auto = build_optimizer(cfg, model, [model], torch.device("cuda"), 1)  # a GPU without TE
    assert isinstance(auto, ZeroOneOptimizer)
    megatron = load_config("tiny", overrides=[*moments, "train.optimizer_impl=megatron"])
    with pytest.raises(ConfigError, match="install transformer-engine.*train.optimizer_impl=zero1"):
        MegatronOptimizer(model, [model], megatron)
