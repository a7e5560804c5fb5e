"""ZeRO-1 AdamW against torch.optim.AdamW, and the global gradient norm, in one process."""

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


def _fused_and_torch_adamw(params: list[torch.Tensor], n_decayed: int):
    """FusedAdamW over `params` and torch's AdamW over fp32 copies of them, the first n_decayed with
    weight decay, the rest without: (ours, the copies, reference)."""
    from parallel.fused_adamw import FusedAdamW

    theirs = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours = FusedAdamW([{"params": params[:n_decayed], "weight_decay": 0.1, **hyper},
                       {"params": params[n_decayed:], "weight_decay": 0.0, **hyper}])  # fmt: skip
    reference = torch.optim.AdamW([{"params": theirs[:n_decayed], "weight_decay": 0.1},
                                   {"params": theirs[n_decayed:], "weight_decay": 0.0}], **hyper)  # fmt: skip
    return ours, theirs, reference


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_matches_torch_adamw_with_the_clip_folded_in(param_dtype):
    """The GPU backend's inner optimizer (run here by Inductor's CPU code) against torch's AdamW on
    pre-clipped fp32 masters: shards of one parameter (views, as Megatron-Core's are) in decayed and
    undecayed groups, gradients from `decoupled_grad` (as Megatron-Core's precision-aware optimizer
    hands them) or `grad`; a bf16 parameter gets its master rounded."""
    gen = torch.Generator().manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(1317, generator=gen).to(param_dtype))
    params = [whole.view(-1)[a:b] for a, b in ((0, 300), (300, 317), (317, 1317))]  # not leaves
    ours, theirs, reference = _fused_and_torch_adamw(params, n_decayed=2)
    for scale in [1.0, 0.25, 0.5]:
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for i, (p, q, g) in enumerate(zip(params, theirs, grads)):
            if i % 2:
                p.decoupled_grad = g
            else:
                p.grad = g if param_dtype == torch.float32 else None
                p.decoupled_grad = None if param_dtype == torch.float32 else g
            q.grad = g * scale
        for group in ours.param_groups:
            group["grad_scale"] = scale
        ours.step()
        reference.step()
    for p, q in zip(params, theirs):
        master = ours.state[p].get("master_param", p)
        torch.testing.assert_close(master, q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p, master.to(param_dtype))


def test_fused_adamw_steps_back_to_back_shards_as_one_run():
    """Shards and gradients laid out back to back (as in Megatron-Core's buffers) are stepped by one
    kernel per run; a state replaced in between (as Megatron-Core's checkpoint loading does) splits
    the run, and every step still matches torch's AdamW."""
    from parallel.fused_adamw import _runs

    gen = torch.Generator().manual_seed(0)
    cuts = ((0, 300), (300, 317), (317, 1000), (1000, 1317))
    whole = torch.nn.Parameter(torch.randn(1317, generator=gen).to(torch.bfloat16))
    grads = torch.empty(1317)
    params = [whole.view(-1)[a:b] for a, b in cuts]
    for p, (a, b) in zip(params, cuts):
        p.decoupled_grad = grads[a:b]
    ours, theirs, reference = _fused_and_torch_adamw(params, n_decayed=3)
    for step in range(3):
        grads.copy_(torch.randn(1317, generator=gen))
        for q, (a, b) in zip(theirs, cuts):
            q.grad = grads[a:b].clone()
        if step == 1:
            moments = ours.state[params[1]]
            moments["exp_avg"] = moments["exp_avg"].clone()
        ours.step()
        reference.step()
        runs = [len(_runs(group["params"], ours.state)) for group in ours.param_groups]
        assert runs == ([1, 1] if step == 0 else [3, 1])
    for p, q in zip(params, theirs):
        torch.testing.assert_close(ours.state[p]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)


def test_fused_adamw_keeps_bf16_moments():
    from parallel.fused_adamw import FusedAdamW

    param = torch.randn(64, generator=torch.Generator().manual_seed(1))
    optimizer = FusedAdamW([{"params": [param], "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8,
                             "weight_decay": 0.0}], moment_dtype=torch.bfloat16)  # fmt: skip
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    torch.testing.assert_close(state["exp_avg"].float(), torch.full_like(param, 0.1), rtol=1e-2, atol=0)


def test_an_expert_slice_counts_once_like_its_stacked_shard():
    """Under EP=2 of 4 ranks, TE's expert slice and the local backend's stacked shard of experts are each
    held by the 2 ranks of one expert-data-parallel group, so the global norm weighs them alike."""
    from megatron_ds.model.init import mark_expert_slice, mark_shard
    from megatron_ds.optim import copies_of

    stacked = torch.empty(2, 3, 5)  # experts 2 and 3 of 4
    mark_shard(stacked, 0, 2, 4)
    expert = torch.empty(5, 3)
    mark_expert_slice(expert, "w1.weight0", "w1", 2, 4, 2)
    assert copies_of(stacked, world_size=4, pipeline=1) == copies_of(expert, world_size=4, pipeline=1) == 2
    replicated = torch.empty(5, 3)  # all four experts on every rank: EP=1
    mark_expert_slice(replicated, "w1.weight2", "w1", 2, 4, 4)
    assert copies_of(replicated, world_size=4, pipeline=1) == 4
