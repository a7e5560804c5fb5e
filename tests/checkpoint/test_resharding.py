"""A checkpoint saved under one parallel layout loads exactly under another.

One forked gloo world of 2 ranks saves and loads under TP=2, TP=1/DP=2 (with ZeRO-1-style
optimizer keys that only their owning rank holds, and with distributed-optimizer-style flat
ranges cut anywhere in a parameter) and EP=2 (stacked expert weights split along the expert dim);
the test process itself saves and loads single-process checkpoints. Because
weight initialisation does not depend on the layout, "loaded exactly" means: equal to a model of
the saving seed built directly in the loading layout.
"""

import datetime
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ds.checkpoint import Checkpointer, model_tensors
from megatron_ds.checkpoint.sharding import flat_range_boxes, mark_flat_range, part_of
from megatron_ds.config import CheckpointConfig, config_to_dict, load_config
from megatron_ds.model.init import mark_expert_slice, mark_shard
from parallel.parallelize import build_model

SAVED_SEED, OTHER_SEED = 1, 2
EXPERTS = torch.arange(4 * 3 * 5, dtype=torch.float32).view(4, 3, 5)  # [experts, in, out]


def tiny(seed: int):
    return load_config("tiny", overrides=[f"train.seed={seed}", "model.n_layers=2", "model.vocab_size=1024"])


def model_state(seed: int, groups=None) -> dict[str, torch.Tensor]:
    return model_tensors(build_model(tiny(seed), "cpu", groups))


def optimizer_state(params: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    """ZeroAdamW-style keys for the parameters this data-parallel rank owns (every dp_size-th)."""
    state = {}
    for i, (name, p) in enumerate(sorted(params.items())):
        if i % dp_size != dp_rank:
            continue
        for slot, scale in (("exp_avg", 2.0), ("exp_avg_sq", 3.0), ("master", 1.0)):
            t = (p.detach().float() * scale + i).clone()
            if hasattr(p, "mds_shard"):
                mark_shard(t, *p.mds_shard, p.mds_shard_group)
            state[f"optim.{name.removeprefix('model.')}.{slot}"] = t
    state["optim.step"] = torch.tensor(7.0)
    return state


def flat_optimizer_state(params: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict:
    """optimizer_state's values as a distributed optimizer shards them: all tensors laid end to end
    in one flat buffer, cut into dp_size equal pieces (through rows and parameters alike)."""
    whole = optimizer_state(params, 0, 1)
    del whole["optim.step"]
    total = sum(t.numel() for t in whole.values())
    piece = -(-total // dp_size)
    mine = (dp_rank * piece, min(total, (dp_rank + 1) * piece))
    state, offset = {}, 0
    for key, t in whole.items():
        start, stop = max(mine[0] - offset, 0), min(mine[1] - offset, t.numel())
        offset += t.numel()
        if start < stop:
            flat = t.reshape(-1)[start:stop].clone()
            mark_flat_range(flat, start, stop, of=t)
            state[key] = flat
    return state


def expert_state(group=None) -> dict[str, torch.Tensor]:
    if group is None:
        return {"experts.w1": EXPERTS.clone()}
    local = EXPERTS.chunk(group.size())[group.rank()].clone()
    mark_shard(local, 0, group.rank() * local.size(0), EXPERTS.size(0), group)
    return {"experts.w1": local}


def expert_slices(rank: int | None = None) -> dict[str, torch.Tensor]:
    """EXPERTS as TE's GroupedLinear holds them, one [out, in] weight per expert (all of them, or this
    EP=2 rank's two), and their "exp_avg" (2 x EXPERTS) as a distributed optimizer cuts it: each rank
    of two a flat half of every expert's."""
    experts = range(4) if rank is None else range(2 * rank, 2 * rank + 2)
    state = {}
    for e in range(4):
        weight = EXPERTS[e].t().contiguous()
        mark_expert_slice(weight, f"w1.weight{e}", "w1", e, 4, len(experts))
        if e in experts:
            state[f"experts.w1#{e}"] = weight
        half = weight.numel() // 2
        lo, hi = (0, weight.numel()) if rank is None else (rank * half, (rank + 1) * half + rank)
        moment = (2 * weight).reshape(-1)[lo:hi].clone()
        mark_flat_range(moment, lo, hi, of=weight)
        state[f"optim.experts.w1#{e}.exp_avg"] = moment
    return state


def stacked_experts() -> dict[str, torch.Tensor]:
    return {"experts.w1": EXPERTS.clone(), "optim.experts.w1.exp_avg": 2 * EXPERTS}


def scrambled(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for t in tensors.values():
            t.fill_(-1)
    return tensors


def assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"differ: {bad[:5]}"


def extra_for(seed: int) -> dict:
    return {"config": config_to_dict(tiny(seed)), "counters": {"step": 5}}


def _world(rank: int, port: int, workdir: str):
    from megatron.core import parallel_state as ps

    from parallel.parallelize import groups_from_parallel_state

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    root, error = Path(workdir), ""
    try:
        world = dist.group.WORLD
        cfg = CheckpointConfig(keep_last=0)
        # TP=2 (+ EP=2 experts), saved asynchronously while "training" collectives keep running.
        ps.initialize_model_parallel(2)
        saved = {**model_state(SAVED_SEED), **expert_state(world)}
        ckpt = Checkpointer(root / "tp2", CheckpointConfig(keep_last=0, async_save=True))
        ckpt.save(5, saved, extra_for(SAVED_SEED))
        for _ in range(20):
            dist.all_reduce(torch.ones(1000))
        ckpt.wait()
        # TP=2 -> TP=1 on both ranks.
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(1)
        target = {**scrambled(model_state(OTHER_SEED)), **scrambled(expert_state())}
        extra = Checkpointer(root / "tp2", cfg).load(root / "tp2", target, extra_for(OTHER_SEED)["config"])
        assert extra["counters"] == {"step": 5}
        assert_equal(target, {**model_state(SAVED_SEED), **expert_state()})
        # TP=1 / DP=2 with ZeRO-1 ownership: each rank saves only the optimizer keys it owns.
        params = model_state(SAVED_SEED)
        Checkpointer(root / "dp2", cfg).save(5, {**params, **optimizer_state(params, rank, 2)}, {})
        # DP=1 (single process) -> DP=2: every rank loads just its own keys.
        params = model_state(SAVED_SEED)
        target = scrambled(optimizer_state(model_state(OTHER_SEED), rank, 2))
        Checkpointer(root / "dp1", cfg).load(root / "dp1", target, None)
        assert_equal(target, optimizer_state(params, rank, 2))
        # Whole optimizer tensors -> distributed-optimizer flat ranges (DP=2), and flat ranges saved.
        target = scrambled(flat_optimizer_state(model_state(OTHER_SEED), rank, 2))
        Checkpointer(root / "dp1", cfg).load(root / "dp1", target, None)
        assert_equal(target, flat_optimizer_state(params, rank, 2))
        Checkpointer(root / "flat2", cfg).save(5, {**params, **flat_optimizer_state(params, rank, 2)}, {})
        # TP=1 -> TP=2, with the sharded optimizer keys as well, whole and as flat ranges.
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(2)
        groups = groups_from_parallel_state()
        params = model_state(OTHER_SEED, groups)
        target = {**scrambled(params), **scrambled(optimizer_state(params, 0, 1))}
        Checkpointer(root / "dp1", cfg).load(root / "dp1", target, None)
        want = model_state(SAVED_SEED, groups)
        assert_equal(target, {**want, **optimizer_state(want, 0, 1)})
        target = scrambled(flat_optimizer_state(params, 0, 1))
        Checkpointer(root / "flat2", cfg).load(root / "flat2", target, None)
        assert_equal(target, flat_optimizer_state(want, 0, 1))
        ps.destroy_model_parallel()
        # TE-style expert slices: EP=2 weights and DP=2 flat halves of their moments, saved by both
        # ranks (loaded stacked by one process in the tests below), and loaded from a stacked save.
        Checkpointer(root / "slices2", cfg).save(5, expert_slices(rank), {})
        Checkpointer(root / "slices_dp2", cfg).save(5, expert_slices(), {})  # replicas: DP=2, EP=1
        target = scrambled(expert_slices(rank))
        Checkpointer(root / "stacked1", cfg).load(root / "stacked1", target, None)
        assert_equal(target, expert_slices(rank))
    except Exception:
        error = traceback.format_exc()
    (root / f"rank{rank}.txt").write_text(error)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    from parallel.launcher import free_port

    root = tmp_path_factory.mktemp("reshard")
    params = model_state(SAVED_SEED)
    Checkpointer(root / "dp1", CheckpointConfig()).save(5, {**params, **optimizer_state(params, 0, 1)}, {})
    Checkpointer(root / "stacked1", CheckpointConfig()).save(5, stacked_experts(), {})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_world, args=(free_port(), str(root)), nprocs=2, join=True, start_method="fork")
    return root


def test_every_rank_resharded_exactly(world_dir):
    errors = {r: (world_dir / f"rank{r}.txt").read_text() for r in range(2)}
    assert not any(errors.values()), "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items() if e)


def test_tensor_and_expert_parallel_checkpoint_loads_in_one_process(world_dir):
    target = {**scrambled(model_state(OTHER_SEED)), **scrambled(expert_state())}
    Checkpointer(world_dir / "tp2", CheckpointConfig()).load(world_dir / "tp2", target, None)
    assert_equal(target, {**model_state(SAVED_SEED), **expert_state()})


def test_zero1_optimizer_keys_from_two_ranks_load_in_one_process(world_dir):
    params = model_state(SAVED_SEED)
    target = {**scrambled(model_state(OTHER_SEED)), **scrambled(optimizer_state(params, 0, 1))}
    Checkpointer(world_dir / "dp2", CheckpointConfig()).load(world_dir / "dp2", target, None)
    assert_equal(target, {**params, **optimizer_state(params, 0, 1)})


def test_flat_ranges_from_two_ranks_load_as_whole_tensors_in_one_process(world_dir):
    params = model_state(SAVED_SEED)
    target = scrambled(optimizer_state(params, 0, 1))
    del target["optim.step"]
    Checkpointer(world_dir / "flat2", CheckpointConfig()).load(world_dir / "flat2", target, None)
    want = optimizer_state(params, 0, 1)
    del want["optim.step"]
    assert_equal(target, want)


@pytest.mark.parametrize("saved", ["slices2", "slices_dp2"])
def test_expert_slices_from_two_ranks_load_as_the_stacked_tensor_in_one_process(world_dir, saved):
    target = scrambled(stacked_experts())
    Checkpointer(world_dir / saved, CheckpointConfig()).load(world_dir / saved, target, None)
    assert_equal(target, stacked_experts())


def test_flat_range_boxes_tile_the_range_in_order():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        shape = tuple(int(n) for n in torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                    generator=gen))  # fmt: skip
        numel = torch.Size(shape).numel()
        start = int(torch.randint(0, numel, (1,), generator=gen))
        stop = int(torch.randint(start + 1, numel + 1, (1,), generator=gen))
        index = torch.arange(numel).view(shape)
        covered = torch.cat([index[tuple(slice(o, o + n) for o, n in zip(offs, sizes))].reshape(-1)
                             for offs, sizes in flat_range_boxes(start, stop, shape)])  # fmt: skip
        assert covered.tolist() == list(range(start, stop)), (shape, start, stop)
        assert torch.equal(part_of(_flat(start, stop, shape), index), index.reshape(-1)[start:stop])


def _flat(start, stop, shape):
    t = torch.empty(stop - start)
    mark_flat_range(t, start, stop, of=torch.empty(shape))
    return t
