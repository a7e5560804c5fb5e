"""Pipeline parallelism on CPUs: Megatron-Core's real schedules over gloo against one process.

Megatron-Core's pipeline schedules touch CUDA in three places only: the p2p receive buffers
(`torch.cuda.current_device()`), a token counter made with `device="cuda"`, and a
`torch.cuda.synchronize()` after batched p2p. `schedules_on_cpu()` gives those two modules a `torch`
whose `cuda` points at the CPU, so the real 1F1B and interleaved schedules, with real gloo send/recv,
run here (training itself refuses pipelines on CPUs). Each layout is checked against the
single-process model fed the whole global batch: the losses (main, MTP, balance), every gradient
after the data-parallel and embedding-group reductions, the global gradient norm, and the expert
biases after an update, in fp32.
"""

import types
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from spawn_world import run_checks

from megatron_ds.config import ConfigError, load_config
from megatron_ds.model.init import SHARD_ATTR
from megatron_ds.model.moe import BalanceLossGrad, moe_gates, update_expert_bias
from megatron_ds.optim import STAGE_COPIES_ATTR, copies_of, global_grad_norm
from parallel.data_parallel import gradient_groups_from_parallel_state, reduce_gradients
from parallel.groups import initialize_groups
from parallel.parallelize import ModelGroups, build_model
from parallel.pipeline_schedule import (
    PipelineChunk,
    PipelineSchedule,
    build_pipeline_model,
    merge_chunks,
    schedule_config,
    to_batch_major,
    to_sequence_major,
)

SEQ, MICRO_BATCH, N_MICRO = 8, 2, 4
MTP_WEIGHT = 0.3
TOLERANCE = {"atol": 2e-6, "rtol": 1e-5}


def small(*overrides: str):
    """The tiny preset, 4 layers (1 dense, 3 MoE) plus MTP, with a balance loss large enough to see."""
    return load_config(
        "tiny",
        overrides=[
            "model.vocab_size=512",
            "model.dim=64",
            "model.inter_dim=128",
            "model.moe_inter_dim=32",
            "model.balance_loss_alpha=0.01",
            "model.init_std=0.1",
            "precision.params_dtype=fp32",
            f"train.seq_len={SEQ}",
            f"train.micro_batch_size={MICRO_BATCH}",
            *overrides,
        ],
    )


@contextmanager
def schedules_on_cpu():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.cuda = types.SimpleNamespace(current_device=lambda: "cpu", synchronize=lambda: None)
    proxy.zeros = lambda *size, device=None, **kwargs: torch.zeros(*size, **kwargs)
    saved = schedules.torch, p2p_communication.torch
    schedules.torch = p2p_communication.torch = proxy
    try:
        yield
    finally:
        schedules.torch, p2p_communication.torch = saved


def micro_batches(cfg, n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (n, MICRO_BATCH, SEQ + 1), generator=gen)
    return [{"tokens": t, "doc_ids": torch.zeros_like(t)} for t in tokens]


def reference_step(cfg, batches: list[dict], device: torch.device):
    """The unpipelined model on all micro-batches of the global batch: losses and the model."""
    whole = replace(cfg.parallel, pipeline=1, virtual_pipeline=1, pipeline_layers=[])
    ref = build_model(replace(cfg, parallel=whole), device, ModelGroups())
    BalanceLossGrad.scale = 1.0 / len(batches)
    losses = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        tokens = batch["tokens"].to(device)
        out = ref(tokens[:, :-1], labels=tokens[:, 1:])
        loss = out.lm_loss + MTP_WEIGHT * out.mtp_loss
        (loss / len(batches)).backward()
        losses += torch.stack([loss, out.lm_loss, out.mtp_loss]).detach().double() / len(batches)
    balance = sum(g.balance_loss_sum for g in moe_gates(ref).values()) / len(batches)
    return torch.cat([losses, balance.double().view(1)]), ref


def reference_slice(param, full: torch.Tensor) -> torch.Tensor:
    dim, start, _ = getattr(param, SHARD_ATTR, (0, 0, full.size(0)))
    return full.narrow(dim, start, param.size(dim))


def check_layout(*overrides: str, device: str = "cpu", tolerance=TOLERANCE) -> None:
    """The pipelined step against reference_step, on every rank (see the module doc)."""
    device = torch.device(device)
    world = dist.get_world_size()
    batch = MICRO_BATCH * N_MICRO * world // 2
    cfg = small(*overrides, f"train.global_batch_size={batch}", f"train.batch_rampup_start={batch}")
    layout = initialize_groups(cfg)
    n_micro = cfg.train.global_batch_size // (MICRO_BATCH * layout.data)
    everything = micro_batches(cfg, n_micro * layout.data, seed=5)
    dp_rank = ps.get_data_parallel_rank()
    mine = everything[dp_rank * n_micro : (dp_rank + 1) * n_micro]

    expected, ref = reference_step(cfg, everything, device)
    BalanceLossGrad.scale = 1.0 / n_micro  # as the training loop sets it
    model, chunks = build_pipeline_model(cfg, device)
    schedule = PipelineSchedule(model, chunks, cfg, device)
    with schedules_on_cpu() if device.type == "cpu" else nullcontext():
        losses = schedule(iter(mine), n_micro, MTP_WEIGHT)
    groups = gradient_groups_from_parallel_state()
    reduce_gradients(model, groups)
    losses = losses.clone()
    if layout.data > 1:
        dist.all_reduce(losses, group=groups.data)
        losses /= layout.data
    torch.testing.assert_close(losses, expected, **tolerance)

    reference = dict(ref.named_parameters())
    names = dict(model.named_parameters())
    assert names, "this stage holds no parameters"
    for name, param in names.items():
        torch.testing.assert_close(
            param.grad,
            reference_slice(param, reference[name].grad),
            **tolerance,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    norm = global_grad_norm(model, world, cfg.parallel.pipeline)
    torch.testing.assert_close(norm, global_grad_norm(ref, 1, 1), rtol=tolerance["rtol"], atol=0)

    loads = update_expert_bias(model, 0.01, groups.data)
    ref_loads = update_expert_bias(ref, 0.01)
    assert loads and set(loads) <= set(ref_loads)
    for name, gate in moe_gates(model).items():
        torch.testing.assert_close(loads[name], ref_loads[name], atol=0, rtol=0)
        torch.testing.assert_close(gate.bias, moe_gates(ref)[name].bias, atol=0, rtol=0)


def check_1f1b() -> None:
    check_layout("parallel.pipeline=2")


def check_1f1b_uneven_stages() -> None:
    check_layout("parallel.pipeline=2", "parallel.pipeline_layers=[3,1]")


def check_interleaved() -> None:  # with every recomputation region, replayed across the chunks' backwards
    check_layout(
        "parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.recompute=[norm,mla_up_proj,swiglu]"
    )


def check_interleaved_without_mtp() -> None:
    check_layout("parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.mtp_depth=0")


def check_pipeline_expert_data() -> None:
    check_layout("parallel.pipeline=2", "parallel.expert=2", "train.recompute=[norm,swiglu]")


def check_pipeline_tensor() -> None:
    check_layout("parallel.pipeline=2", "parallel.tensor=2")


TWO = [check_1f1b, check_1f1b_uneven_stages, check_interleaved, check_interleaved_without_mtp]
FOUR = [check_pipeline_expert_data, check_pipeline_tensor]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    two = run_checks(TWO, 2, tmp_path_factory.mktemp("pp2"))
    return {**two, **run_checks(FOUR, 4, tmp_path_factory.mktemp("pp2x2"))}


@pytest.mark.parametrize("check", [c.__name__ for c in TWO + FOUR])
def test_pipeline_schedule_matches_one_process(outcomes, check):
    assert not outcomes[check], outcomes[check]


# --- pieces that need no process group ---


def test_sequence_major_round_trip():
    h = torch.randn(3, 5, 7)
    s = to_sequence_major(h)
    assert s.shape == (5, 3, 7) and s.is_contiguous()
    assert torch.equal(s[4, 2], h[2, 4])
    assert torch.equal(to_batch_major(s), h)


def _stages(cfg):
    return [build_model(cfg, "cpu", ModelGroups(pipeline_rank=s)) for s in range(cfg.parallel.pipeline)]


def test_chunks_pass_activations_through_set_input_tensor():
    """Stage by stage through PipelineChunk, as the schedule drives it, equals the uncut model,
    and the gradient reaches the received [seq, batch, hidden] tensor."""
    cfg = small("parallel.pipeline=2")
    full = build_model(small(), "cpu", ModelGroups())
    first, last = _stages(cfg)
    config = schedule_config(cfg)
    chunk0, chunk1 = PipelineChunk(first, config, True, False), PipelineChunk(last, config, False, True)
    tokens = micro_batches(cfg, 1, seed=3)[0]["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    chunk0.set_input_tensor([None])
    sent = chunk0(inputs, labels)
    assert sent.shape == (SEQ, MICRO_BATCH, cfg.model.dim)
    received = sent.detach().clone().requires_grad_()
    chunk1.set_input_tensor([received])
    out = chunk1(inputs, labels)
    expected = full(inputs, labels)
    torch.testing.assert_close(out.lm_loss, expected.lm_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.mtp_loss, expected.mtp_loss, rtol=1e-5, atol=0)
    out.lm_loss.backward()
    assert received.grad is not None and received.grad.shape == received.shape

    chunk1.set_input_tensor([None])
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        chunk1(inputs, labels)


def test_embedding_gradient_sum_over_first_and_last_stage():
    """The all-reduce over the embedding group sums the first stage's gradient (token inputs) and the
    last stage's (MTP inputs) into the uncut model's; the norm counts that tensor once."""
    cfg = small("parallel.pipeline=2")
    full = build_model(small(), "cpu", ModelGroups())
    first, last = _stages(cfg)
    tokens = micro_batches(cfg, 1, seed=4)[0]["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    expected = full(inputs, labels)
    (expected.lm_loss + MTP_WEIGHT * expected.mtp_loss).backward()
    h = first(inputs)
    received = h.detach().requires_grad_()
    out = last(received, labels)
    (out.lm_loss + MTP_WEIGHT * out.mtp_loss).backward()
    h.backward(received.grad)
    assert first.embed.weight.grad.abs().sum() > 0 and last.embed.weight.grad.abs().sum() > 0
    summed = first.embed.weight.grad + last.embed.weight.grad
    torch.testing.assert_close(summed, full.embed.weight.grad, rtol=1e-5, atol=1e-8)

    setattr(first.embed.weight, STAGE_COPIES_ATTR, 2)
    assert copies_of(first.embed.weight, world_size=4, pipeline=2) == 4  # 2 data-parallel x 2 stages
    assert copies_of(first.layers["0"].attn_norm.weight, world_size=4, pipeline=2) == 2


def test_merged_chunks_keep_parameter_names():
    cfg = small("parallel.pipeline=2", "parallel.virtual_pipeline=2")
    stages = [
        build_model(small("parallel.pipeline=4"), "cpu", ModelGroups(pipeline_rank=s)) for s in range(4)
    ]
    last_rank = merge_chunks([stages[1], stages[3]])  # virtual stages 1 and 3 live on pipeline rank 1
    names = set(dict(last_rank.named_parameters()))
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"1", "3"}
    assert (
        "embed.weight" in names and "head.linear.weight" in names and any(n.startswith("mtp.") for n in names)
    )
    first_rank = merge_chunks([stages[0], stages[2]])
    assert "head.linear.weight" not in dict(first_rank.named_parameters())
    assert cfg.parallel.pipeline_layers == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.virtual_pipeline=2"], "parallel.pipeline=1"),
        (["parallel.virtual_pipeline=0"], "parallel.virtual_pipeline must be >= 1"),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=3"],
            "stages x parallel.virtual_pipeline=3 for 4",
        ),
        (
            ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.pipeline_layers=[2,2]"],
            "= 4 stages",
        ),
    ],
)
def test_virtual_pipeline_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small(*overrides)


def test_interleaving_needs_whole_rounds_of_micro_batches():
    cfg = small("parallel.pipeline=2", "parallel.virtual_pipeline=2")
    schedule = PipelineSchedule.__new__(PipelineSchedule)
    schedule.cfg = cfg
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline=2"):
        schedule(iter([]), 3, MTP_WEIGHT)
