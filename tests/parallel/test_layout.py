"""Process-group layout checks and node-limited routing; no processes needed."""

import pytest
import torch

from megatron_ds.config.load import load_config
from megatron_ds.config.validate import ConfigError
from megatron_ds.model.moe import Gate
from parallel.groups import ParallelLayout, check_layout, expert_parallel_groups


def tiny(*overrides):
    return load_config(
        "tiny", overrides=["train.global_batch_size=64", "train.batch_rampup_start=64", *overrides]
    )


def test_layout_sizes():
    cfg = tiny("parallel.tensor=2", "parallel.expert=4", "parallel.gpus_per_node=4")
    assert check_layout(cfg, 8) == ParallelLayout(tensor=2, pipeline=1, expert=4, data=4, expert_data=2)
    assert expert_parallel_groups(cfg, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_expert_groups_with_pipeline_follow_megatron():
    cfg = tiny("parallel.expert=2", "parallel.pipeline=2", "parallel.gpus_per_node=4")
    assert expert_parallel_groups(cfg, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tensor=4"], 6, "not divisible by parallel.tensor x parallel.pipeline"),
        (["parallel.expert=8", "parallel.tensor=2"], 4, "parallel.expert=8 must divide"),
        (
            ["parallel.gpus_per_node=4", "train.global_batch_size=24", "train.batch_rampup_start=24"],
            6,
            "not a whole number of nodes of parallel.gpus_per_node=4",
        ),
        (["parallel.tensor=4", "parallel.gpus_per_node=2"], 8, "some TP groups would span two nodes"),
        (["parallel.expert=8", "parallel.gpus_per_node=2"], 8, "set model.n_expert_nodes to a multiple of 4"),
    ],
)
def test_bad_layouts_say_what_to_change(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(tiny(*overrides), world)


def test_expert_blocks_on_one_node_each_pass():
    # 4 EP ranks on 2 nodes: experts 0-7 (node block 0) on node 0, 8-15 on node 1.
    check_layout(tiny("parallel.expert=4", "parallel.gpus_per_node=2"), 4)
    check_layout(tiny("parallel.expert=8", "parallel.gpus_per_node=2", "model.n_expert_nodes=4"), 8)


def allowed_experts_by_loops(choice: list[float], a) -> set[int]:
    """The node limit, then the group limit, written out with plain loops over one token."""
    per_node = a.n_routed_experts // a.n_expert_nodes
    per_group = a.n_routed_experts // a.n_expert_groups
    top_per_node = max(a.n_activated_experts // a.max_nodes_per_token, 1)
    node_scores = []
    for node in range(a.n_expert_nodes):
        values = sorted(choice[node * per_node : (node + 1) * per_node], reverse=True)
        node_scores.append((sum(values[:top_per_node]), node))
    nodes = {node for _, node in sorted(node_scores, reverse=True)[: a.max_nodes_per_token]}
    group_scores = []
    for group in range(a.n_expert_groups):
        if (group * per_group) // per_node in nodes:
            values = sorted(choice[group * per_group : (group + 1) * per_group], reverse=True)
            group_scores.append((sum(values[:2]), group))
    groups = {group for _, group in sorted(group_scores, reverse=True)[: a.n_limited_groups]}
    return {e for e in range(a.n_routed_experts) if e // per_group in groups}


@pytest.mark.parametrize(
    "shape",
    [
        # experts, groups, limited groups, nodes, max nodes, K
        (32, 8, 3, 4, 2, 6),  # two groups per node
        (64, 8, 4, 8, 4, 8),  # DeepSeek-V3's pattern: a group per node, 4 of 8
        (16, 4, 2, 2, 1, 4),  # every token on a single node
    ],
)
def test_node_limited_routing_by_brute_force(shape):
    experts, groups, limited, nodes, max_nodes, k = shape
    cfg = tiny(
        f"model.n_routed_experts={experts}",
        f"model.n_expert_groups={groups}",
        f"model.n_limited_groups={limited}",
        f"model.n_expert_nodes={nodes}",
        f"model.max_nodes_per_token={max_nodes}",
        f"model.n_activated_experts={k}",
    )
    a = cfg.model
    gen = torch.Generator().manual_seed(sum(shape))
    gate = Gate(a)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen) * 0.05)  # no sigmoid ties
    for trial in range(10):
        with torch.no_grad():
            gate.bias.copy_(torch.randn(experts, generator=gen) * 0.3 * (trial % 3))
        x = torch.randn(64, a.dim, generator=gen)
        _, indices, _ = gate(x, seq_len=64)
        scores = torch.nn.functional.linear(x, gate.weight).sigmoid() + gate.bias
        for token, chosen in enumerate(indices.tolist()):
            choice = scores[token].tolist()
            assert len({e // (experts // nodes) for e in chosen}) <= max_nodes
            assert len({e // (experts // groups) for e in chosen}) <= limited
            allowed = allowed_experts_by_loops(choice, a)
            expected = sorted(allowed, key=lambda e: choice[e], reverse=True)[:k]
            assert sorted(chosen) == sorted(expected)
