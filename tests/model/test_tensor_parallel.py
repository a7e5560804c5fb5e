"""Tensor parallelism over 2 gloo processes against the single-process model built in each process.

Checks, in one spawn: the TP=2 model holds exactly the TP=1 weights, sharded (layout-independent
init), and reports each projection's partition; the language-model and MTP losses agree; every
gradient, gathered from its shards, agrees; with every selective-recomputation region the sharded
model's loss and gradients are bit-identical.
And the balance-bias update sums expert loads over a group, so every rank applies the same step.
"""

import torch
import torch.distributed as dist
from model_testing import batch, run_in_processes, small_config

from megatron_ds.model.init import SHARD_ATTR
from megatron_ds.model.moe import moe_gates, update_expert_bias
from parallel.parallelize import ModelGroups, build_model
from parallel.tensor_parallel import PLAN, partition


def _gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{name}: relative difference {err:.3g} > {rtol}"


def _check_tp_equals_single():
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    cfg = small_config("parallel.tensor=2")
    single = build_model(cfg, groups=ModelGroups())
    sharded = build_model(cfg)

    full = dict(single.named_parameters())
    n_sharded = 0
    for name, param in sharded.named_parameters():
        expected = full[name]
        if hasattr(param, SHARD_ATTR):
            dim, start, full_size = getattr(param, SHARD_ATTR)
            assert full_size == expected.size(dim), name
            expected = expected.narrow(dim, start, param.size(dim))
            n_sharded += 1
        assert torch.equal(param.detach(), expected.detach()), f"{name}: TP=2 shard differs from TP=1 weights"
    assert set(full) == {name for name, _ in sharded.named_parameters()}
    # wq_b, wkv_b, wo per layer (4 with MTP), dense w1/w2/w3 and shared-expert w1/w2/w3, embedding, head.
    assert n_sharded == 4 * 3 + 4 * 3 + 2

    # The plan as other backends (Transformer Engine's) read it off the sharded model: full sizes.
    whole = dict(single.named_modules())
    for path, module in sharded.named_modules():
        for name in ("wq_a", "wkv_a", *PLAN.get(type(module), {})):
            if hasattr(module, name):
                linear = getattr(whole[path], name)
                style = PLAN.get(type(module), {}).get(name)
                expected = (linear.in_features, linear.out_features, style, tp_group if style else None)
                assert partition(getattr(module, name)) == expected, f"{path}.{name}"

    g = torch.Generator().manual_seed(3)
    for gates in (moe_gates(single), moe_gates(sharded)):
        for gate in gates.values():
            gate.bias.copy_(torch.rand(gate.bias.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    tokens, labels = batch(cfg, seed=int(torch.randint(0, 1000, (), generator=g)))
    recomputed = build_model(small_config("parallel.tensor=2", "train.recompute=[norm,mla_up_proj,swiglu]"))
    for gate in moe_gates(recomputed).values():
        gate.bias.copy_(torch.rand(gate.bias.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    losses = []
    for model in (single, sharded, recomputed):
        out = model(tokens, labels)
        (out.lm_loss + cfg.train.mtp_loss_weight * out.mtp_loss).backward()
        losses.append(out)
    assert torch.equal(losses[2].lm_loss, losses[1].lm_loss) and torch.equal(
        losses[2].mtp_loss, losses[1].mtp_loss
    )
    for (name, param), replayed in zip(sharded.named_parameters(), recomputed.parameters()):
        assert torch.equal(replayed.grad, param.grad), f"{name}: recomputation changed its gradient under TP"
    _close(losses[1].lm_loss.detach(), losses[0].lm_loss.detach(), "lm_loss")
    _close(losses[1].mtp_loss.detach(), losses[0].mtp_loss.detach(), "mtp_loss")
    assert losses[0].mtp_loss > 0

    for name, param in sharded.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        grad = param.grad
        if hasattr(param, SHARD_ATTR):
            grad = _gather(grad, getattr(param, SHARD_ATTR)[0], tp_group)
        _close(grad, full[name].grad, f"grad of {name}")


def test_tensor_parallel_2_equals_single_process():
    run_in_processes(_check_all, world_size=2, tp=2)


def _check_bias_update_over_group():
    rank = dist.get_rank()
    model = build_model(small_config(), groups=ModelGroups())
    gates = list(moe_gates(model).values())
    local = torch.tensor([4.0, 0, 2, 2] * 4) if rank == 0 else torch.tensor([0.0, 4, 2, 1] * 4)
    for gate in gates:
        gate.expert_load.copy_(local)
    loads = update_expert_bias(model, speed=0.01, group=dist.group.WORLD)
    total = torch.tensor([4.0, 4, 4, 3] * 4)  # mean 3.75: the last expert is underloaded
    for gate, load in zip(gates, loads.values()):
        torch.testing.assert_close(load, total)
        torch.testing.assert_close(gate.bias, torch.tensor([-0.01, -0.01, -0.01, 0.01] * 4))


def _check_all():
    _check_tp_equals_single()
    _check_bias_update_over_group()
