"""Expert parallelism on CPU/gloo, 4 processes: sharded versus single-process equivalence.

One world of 4 ranks runs every check (see spawn_world). The model checks build the tiny preset
twice on every rank -- the single-process reference, fed the whole global batch, and the sharded
model fed this rank's data-parallel shard -- and require the forward output, the losses, every
gradient (after the data-parallel reduction) and the expert bias after an update to agree within
1e-5 in fp32. Experts 4-7 (a whole group, and with EP=4 every expert of EP rank 1) and 10 are
starved through the balance bias, and the TP slices of 21 tokens are uneven.
"""

import pytest
import torch
import torch.distributed as dist
from aligned_experts import AlignedExperts
from megatron.core import parallel_state as ps
from spawn_world import run_checks

from megatron_ds.config.load import load_config
from megatron_ds.model.init import SHARD_ATTR
from megatron_ds.model.moe import GroupedExperts, LocalDispatcher, moe_gates, update_expert_bias
from parallel.data_parallel import gradient_groups_from_parallel_state, reduce_gradients
from parallel.dispatcher import AllToAllDispatcher
from parallel.expert_parallel import dispatch_metrics
from parallel.groups import initialize_groups
from parallel.parallelize import ModelGroups, build_model

WORLD = 4
MICRO_BATCH, SEQ = 3, 8  # 3 x 7 = 21 input tokens per data-parallel rank
STARVED = [4, 5, 6, 7, 10]
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def tiny_config(tensor: int, expert: int):
    data = WORLD // tensor
    return load_config(
        "tiny",
        overrides=[
            f"parallel.tensor={tensor}",
            f"parallel.expert={expert}",
            "parallel.gpus_per_node=2",
            "precision.params_dtype=fp32",
            f"train.seq_len={SEQ}",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.global_batch_size={MICRO_BATCH * data}",
            f"train.batch_rampup_start={MICRO_BATCH * data}",
        ],
    )


def starve(model) -> None:
    for gate in moe_gates(model).values():
        gate.bias[STARVED] = -10.0  # the bias steers selection only: these experts are never picked


def reference_slice(param, full: torch.Tensor) -> torch.Tensor:
    dim, start, _ = getattr(param, SHARD_ATTR, (0, 0, full.size(0)))
    return full.narrow(dim, start, param.size(dim))


def check_model_equivalence(tensor: int, expert: int) -> None:
    cfg = tiny_config(tensor, expert)
    layout = initialize_groups(cfg)
    assert (layout.tensor, layout.expert, layout.data) == (tensor, expert, WORLD // tensor)
    ref = build_model(cfg, "cpu", ModelGroups())
    model = build_model(cfg, "cpu")
    assert type(next(m for m in model.modules() if hasattr(m, "dispatcher")).dispatcher) is AllToAllDispatcher
    starve(ref)
    starve(model)
    dp_group, dp_rank = ps.get_data_parallel_group(), ps.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.model.vocab_size, (MICRO_BATCH * layout.data, SEQ), generator=gen)
    shard = tokens[dp_rank * MICRO_BATCH : (dp_rank + 1) * MICRO_BATCH]

    with torch.no_grad():
        ref_logits, logits = ref(tokens[:, :-1]), model(shard[:, :-1])
    ref_out = ref(tokens[:, :-1], labels=tokens[:, 1:])
    (ref_out.lm_loss + ref_out.mtp_loss).backward()
    out = model(shard[:, :-1], labels=shard[:, 1:])
    (out.lm_loss + out.mtp_loss).backward()
    reduce_gradients(model, gradient_groups_from_parallel_state())
    losses = torch.stack([out.lm_loss, out.mtp_loss]).detach()
    dist.all_reduce(losses, group=dp_group)
    ref_loads = update_expert_bias(ref, cfg.train.bias_update_speed)
    loads = update_expert_bias(model, cfg.train.bias_update_speed, dp_group)
    biases = torch.stack([g.bias for g in moe_gates(model).values()])
    all_biases = [torch.empty_like(biases) for _ in range(WORLD)]
    dist.all_gather(all_biases, biases)
    local_experts = next(m for m in model.modules() if isinstance(m, GroupedExperts))
    received = torch.tensor([float(local_experts.w1.grad is not None and local_experts.w1.grad.any())])
    ps.destroy_model_parallel()

    vocab_shard = logits.size(-1)
    tp_rank = dist.get_rank() % tensor
    expected_logits = ref_logits[dp_rank * MICRO_BATCH : (dp_rank + 1) * MICRO_BATCH]
    torch.testing.assert_close(
        logits, expected_logits.narrow(-1, tp_rank * vocab_shard, vocab_shard), **TOLERANCE
    )
    torch.testing.assert_close(
        losses / layout.data, torch.stack([ref_out.lm_loss, ref_out.mtp_loss]).detach()
    )
    for name, param in model.named_parameters():
        expected = reference_slice(param, ref.get_parameter(name).grad)
        torch.testing.assert_close(param.grad, expected, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")
    for name, load in loads.items():
        assert torch.equal(load, ref_loads[name]), name
        assert not load[STARVED].any(), "the batch was meant to starve some experts"
    ref_biases = torch.stack([g.bias for g in moe_gates(ref).values()])
    for rank_biases in all_biases:
        assert torch.equal(rank_biases, ref_biases)
    assert received.item() or (expert == 4 and dist.get_rank() % expert == 1)


def check_ep2_dp4():
    check_model_equivalence(tensor=1, expert=2)


def check_ep4_dp4():
    check_model_equivalence(tensor=1, expert=4)


def check_ep2_tp2_dp2():
    check_model_equivalence(tensor=2, expert=2)


def check_ep4_tp2_dp2():
    check_model_equivalence(tensor=2, expert=4)


def random_routing(rank: int, n_experts: int, k: int, dim: int):
    """Rank-dependent token counts (some zero-heavy); experts 4-7 (all of EP rank 1 at EP=4) unused."""
    gen = torch.Generator().manual_seed(100 + rank)
    n_tokens = [5, 0, 9, 2][rank]
    allowed = torch.tensor([e for e in range(n_experts) if e not in STARVED])
    rows = [allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(n_tokens)]
    indices = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)
    x = torch.randn(n_tokens, dim, generator=gen)
    weights = torch.rand(n_tokens, k, generator=gen)
    return x, weights, indices


def check_received_tokens_match_router():
    n_experts, k, dim = 16, 4, 8
    dispatcher = AllToAllDispatcher(dist.group.WORLD, n_experts)
    x, _, indices = random_routing(dist.get_rank(), n_experts, k, dim)
    received, counts, _ = dispatcher.dispatch(x, indices)
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, (x, indices))
    local = range(dist.get_rank() * 4, dist.get_rank() * 4 + 4)
    expected = [xs[t] for e in local for xs, idx in everyone for t, j in (idx == e).nonzero().tolist()]
    expected_counts = [sum(int((idx == e).sum()) for _, idx in everyone) for e in local]
    assert counts.tolist() == expected_counts
    assert torch.equal(received, torch.stack(expected) if expected else x.new_zeros(0, dim))


def check_dispatcher_matches_local(overlap: bool = True, fp8: bool = False, aligned: bool = False):
    """Output and gradients (tokens, weights, experts, shared expert) against LocalDispatcher."""
    n_experts, k, dim, inter = 16, 4, 128, 16
    rank = dist.get_rank()
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts, dim, inter)
    shared = torch.nn.Linear(dim, dim, bias=False)
    for w in (experts.w1, experts.w2, experts.w3):
        torch.nn.init.normal_(w, std=0.1)
    local_experts = (AlignedExperts if aligned else GroupedExperts)(4, dim, inter)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(local_experts, name).copy_(getattr(experts, name)[rank * 4 : rank * 4 + 4])
    dispatcher = AllToAllDispatcher(
        dist.group.WORLD, n_experts, rank_nodes=[0, 0, 1, 1], overlap=overlap, fp8_payload=fp8
    )
    inputs = [random_routing(r, n_experts, k, dim) for r in range(WORLD)]
    probes = [
        torch.randn(x.shape, generator=torch.Generator().manual_seed(r)) for r, (x, _, _) in enumerate(inputs)
    ]

    x, weights, indices = (t.clone().requires_grad_(t.is_floating_point()) for t in inputs[rank])
    out = dispatcher(x, weights, indices, local_experts, shared)
    (out * probes[rank]).sum().backward()
    metrics = {
        "tokens": int(dispatcher.stats.tokens),
        "cross_node_tokens": int(dispatcher.stats.cross_node_tokens),
    }

    # The reference runs every rank's tokens at once through all experts.
    ref_x, ref_weights = (torch.cat([t[i] for t in inputs]).requires_grad_() for i in (0, 1))
    ref_shared = torch.nn.Linear(dim, dim, bias=False)
    ref_shared.load_state_dict(shared.state_dict())
    ref_out = LocalDispatcher()(ref_x, ref_weights, torch.cat([t[2] for t in inputs]), experts, ref_shared)
    (ref_out * torch.cat(probes)).sum().backward()
    start = sum(len(t[0]) for t in inputs[:rank])
    own = slice(start, start + len(x))

    if fp8:  # E4M3 keeps 3 mantissa bits: a few percent of error in the norm, no more
        for got, want in ((out, ref_out[own]), (x.grad, ref_x.grad[own])):
            assert (got - want).norm() <= 0.05 * want.norm(), ((got - want).norm(), want.norm())
    else:
        torch.testing.assert_close(out, ref_out[own], **TOLERANCE)
        torch.testing.assert_close(x.grad, ref_x.grad[own], **TOLERANCE)
    if not fp8:
        torch.testing.assert_close(weights.grad, ref_weights.grad[own], **TOLERANCE)
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name).grad[rank * 4 : rank * 4 + 4]
            torch.testing.assert_close(getattr(local_experts, name).grad, full, **TOLERANCE)
        shared_grad = shared.weight.grad.clone()
        dist.all_reduce(shared_grad)  # each rank saw its own tokens; the reference saw all of them
        torch.testing.assert_close(shared_grad, ref_shared.weight.grad, **TOLERANCE)
    own_node = [0, 0, 1, 1][rank]
    remote = sum(len({[0, 0, 1, 1][e // 4] for e in row} - {own_node}) for row in indices.tolist())
    assert metrics == {"tokens": indices.numel(), "cross_node_tokens": remote}


def check_dispatcher_synchronous():
    check_dispatcher_matches_local(overlap=False)


def check_dispatcher_fp8_payload():
    check_dispatcher_matches_local(fp8=True)


def check_dispatcher_aligned_groups():
    """The received rows laid out in padded 8-row groups per local expert (permutation.expert_layout)."""
    check_dispatcher_matches_local(aligned=True)


def check_dispatch_metrics_reset():
    cfg = tiny_config(1, 4)
    initialize_groups(cfg)
    model = build_model(cfg, "cpu")
    tokens = torch.randint(0, cfg.model.vocab_size, (1, SEQ))
    with torch.no_grad():
        model(tokens)
    metrics = dispatch_metrics(model)
    ps.destroy_model_parallel()
    moe_layers = cfg.model.n_layers - cfg.model.n_dense_layers
    assert metrics["dispatch_tokens"] == moe_layers * SEQ * cfg.model.n_activated_experts
    assert metrics["cross_node_bytes"] > 0 or metrics["cross_node_tokens"] == 0
    assert dispatch_metrics(model)["dispatch_tokens"] == 0


CHECKS = [
    check_received_tokens_match_router,
    check_dispatcher_matches_local,
    check_dispatcher_synchronous,
    check_dispatcher_fp8_payload,
    check_dispatcher_aligned_groups,
    check_ep2_dp4,
    check_ep4_dp4,
    check_ep2_tp2_dp2,
    check_ep4_tp2_dp2,
    check_dispatch_metrics_reset,
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    return run_checks(CHECKS, WORLD, tmp_path_factory.mktemp("ep_world"))


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_expert_parallel(outcomes, check):
    assert not outcomes[check], outcomes[check]
