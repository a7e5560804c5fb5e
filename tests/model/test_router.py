"""The DeepSeek-V3 router (report section 2.1.2) against direct, loop-by-loop statements of the report.

Node- and group-limited top-K choices against a brute-force search over node and group sets; the
balance bias steering selection but not weights; the bias update rule; the sequence-wise balance
loss (eqs. 17-20), its value and the gradient that reaches the router; the fp32 affinities.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from model_testing import small_config

from megatron_ds.model.init import init_weights
from megatron_ds.model.moe import Gate, MoE, RouterAffinities, tokens_per_expert, update_expert_bias
from parallel.recompute import bytes_kept_for_backward

# (experts, K, groups, groups kept, nodes, nodes kept): DeepSeek-V3's shape scaled down (groups = nodes),
# groups inside nodes, nodes inside groups, and the group limit alone.
LAYOUTS = [(32, 8, 8, 4, 8, 4), (32, 6, 8, 3, 4, 2), (16, 4, 2, 1, 4, 3), (16, 4, 4, 2, 1, 1)]


def _gate(n_experts, k, groups, kept_groups, nodes, kept_nodes, dim=16, seed=0) -> Gate:
    values = dict(n_routed_experts=n_experts, n_activated_experts=k, n_expert_groups=groups, dim=dim)
    values.update(n_limited_groups=kept_groups, n_expert_nodes=nodes, max_nodes_per_token=kept_nodes)
    overrides = [f"model.{key}={value}" for key, value in values.items()]
    gate = Gate(small_config(*overrides).model)
    init_weights(gate, seed, 0.5)
    return gate


def _best_blocks(values: list[float], n_blocks: int, keep: int, top: int, allowed: set[int]) -> set[int]:
    """The set of `keep` blocks with the largest total block score, found by trying every set."""
    size = len(values) // n_blocks
    scores = []
    for b in range(n_blocks):
        members = sorted((values[e] for e in range(b * size, (b + 1) * size) if e in allowed), reverse=True)
        scores.append(sum(members[:top]) if len(members) >= top else float("-inf"))
    best = max(
        itertools.combinations(range(n_blocks), keep), key=lambda blocks: sum(scores[b] for b in blocks)
    )
    return {e for b in best for e in range(b * size, (b + 1) * size)}


def _reference_choice(biased: list[float], a) -> set[int]:
    everything = set(range(len(biased)))
    allowed = everything
    if a.max_nodes_per_token < a.n_expert_nodes:
        top = max(a.n_activated_experts // a.max_nodes_per_token, 1)
        allowed = _best_blocks(biased, a.n_expert_nodes, a.max_nodes_per_token, top, everything)
    if a.n_limited_groups < a.n_expert_groups:
        allowed &= _best_blocks(biased, a.n_expert_groups, a.n_limited_groups, 2, allowed)
    return set(sorted(allowed, key=lambda e: biased[e], reverse=True)[: a.n_activated_experts])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "E{}-K{}-G{}/{}-N{}/{}".format(*layout))
def test_limited_choice_matches_brute_force(layout):
    gate = _gate(*layout)
    a = gate.args
    gate.bias.copy_(torch.randn(a.n_routed_experts, generator=torch.Generator().manual_seed(1)) * 0.05)
    x = torch.randn(400, a.dim, generator=torch.Generator().manual_seed(2))
    weights, indices, _ = gate(x, seq_len=40)
    scores = torch.sigmoid(x @ gate.weight.T)
    for t in range(x.size(0)):
        chosen = set(indices[t].tolist())
        assert len(chosen) == a.n_activated_experts
        assert chosen == _reference_choice((scores[t] + gate.bias).tolist(), a), f"token {t}"
    expected = scores.gather(1, indices)
    expected = expected / expected.sum(1, keepdim=True) * a.route_scale
    torch.testing.assert_close(weights, expected)


def test_bias_changes_selection_not_weights():
    gate = _gate(16, 4, 4, 2, 1, 1)
    x = torch.randn(200, gate.args.dim, generator=torch.Generator().manual_seed(3))
    scores = torch.sigmoid(x @ gate.weight.T)
    _, unbiased_choice, _ = gate(x, seq_len=20)
    gate.bias[5] = 10.0  # so large that every token takes expert 5
    weights, indices, _ = gate(x, seq_len=20)
    assert (indices == 5).any(-1).all()
    assert not torch.equal(indices, unbiased_choice)
    # The weights are the unbiased sigmoid scores of the chosen experts, normalised and scaled.
    expected = scores.gather(1, indices)
    torch.testing.assert_close(weights, expected / expected.sum(1, keepdim=True) * gate.args.route_scale)


def test_bias_update_rule():
    model = MoE(small_config().model)
    gate = model.gate
    gate.weight.data.normal_()
    model(torch.randn(2, 32, gate.args.dim))
    assert gate.expert_load.sum() == 2 * 32 * gate.args.n_activated_experts
    load = torch.tensor([5.0, 1, 3, 3] * 4)  # mean 3: overloaded -> down, underloaded -> up, at mean -> kept
    gate.expert_load.copy_(load)
    gate.bias.fill_(0.5)
    loads = update_expert_bias(model, speed=0.001)
    torch.testing.assert_close(loads["gate"], load)
    torch.testing.assert_close(gate.bias, 0.5 + 0.001 * torch.tensor([-1.0, 1, 0, 0] * 4))
    assert gate.expert_load.eq(0).all()
    gate.expert_load.copy_(load)
    update_expert_bias(model, speed=0.0)  # gamma = 0 at the end of training: counters reset, bias kept
    torch.testing.assert_close(gate.bias, 0.5 + 0.001 * torch.tensor([-1.0, 1, 0, 0] * 4))
    assert gate.expert_load.eq(0).all()


def _balance_loss_by_formula(scores: torch.Tensor, indices: torch.Tensor, seq_len: int, a) -> torch.Tensor:
    """Eqs. 17-20, one sequence at a time: alpha * sum_i f_i P_i, averaged over sequences."""
    n, k = a.n_routed_experts, a.n_activated_experts
    losses = []
    for start in range(0, scores.size(0), seq_len):
        s, chosen = scores[start : start + seq_len], indices[start : start + seq_len]
        total = 0.0
        for i in range(n):
            f_i = n / (k * seq_len) * sum(int(i in chosen[t].tolist()) for t in range(seq_len))
            p_i = sum(s[t, i] / s[t].sum() for t in range(seq_len)) / seq_len
            total = total + f_i * p_i
        losses.append(a.balance_loss_alpha * total)
    return torch.stack(losses).mean()


def test_sequence_balance_loss_value_and_gradient():
    moe = MoE(small_config().model).train()
    init_weights(moe, 0, 0.3)
    gate, a = moe.gate, moe.gate.args
    x = torch.randn(3, 16, a.dim, generator=torch.Generator().manual_seed(4))
    _, indices, loss = gate(x.flatten(0, 1), seq_len=16)
    weight = gate.weight.detach().clone().requires_grad_()
    scores = torch.sigmoid(x.flatten(0, 1) @ weight.T)
    expected = _balance_loss_by_formula(scores, indices, 16, a)
    torch.testing.assert_close(loss, expected)
    assert loss > 0

    # In training the MoE output carries the loss's gradient to the router: with no gradient from
    # the output itself, the router's gradient is exactly that of the balance loss.
    expected.backward()
    out = moe(x)
    (out * 0).sum().backward()
    torch.testing.assert_close(gate.weight.grad, weight.grad)


def test_tokens_per_expert_counts_like_bincount():
    gen = torch.Generator().manual_seed(0)
    for n_experts in (1, 5, 64):
        indices = torch.randint(0, n_experts, (37, min(8, n_experts)), generator=gen)
        want = torch.bincount(indices.flatten(), minlength=n_experts)
        assert torch.equal(tokens_per_expert(indices, n_experts), want)
    assert tokens_per_expert(torch.empty(0, 8, dtype=torch.long), 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_affinities_are_fp32_and_keep_x_as_it_came(dtype):
    """The same scores and gradients as F.linear(x.float(), W).sigmoid() under autograd, without keeping
    x's fp32 copy for the backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(8, 16, generator=gen, requires_grad=True)
    probe = torch.randn(2, 5, 8, generator=gen)
    scores = RouterAffinities.apply(x, weight)
    got = [scores, *torch.autograd.grad((scores * probe).sum(), [x, weight])]
    reference = F.linear(x.float(), weight).sigmoid()
    want = [reference, *torch.autograd.grad((reference * probe).sum(), [x, weight])]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    kept = bytes_kept_for_backward(lambda: RouterAffinities.apply(x, weight), [weight])
    assert kept == x.numel() * x.element_size() + scores.numel() * 4
