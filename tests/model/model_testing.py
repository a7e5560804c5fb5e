"""Shared pieces of the model tests: a small configuration and a runner for gloo process worlds."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ds.config import Config, load_config

# The tiny preset shrunk further: MLA with q-LoRA, a dense first layer, MoE layers with group- and
# node-limited routing (4 groups, 2 nodes), one MTP module. Small enough for many forward passes.
SMALL = [
    "model.vocab_size=256",
    "model.dim=64",
    "model.inter_dim=128",
    "model.moe_inter_dim=32",
    "model.n_layers=3",
    "model.n_heads=4",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.n_routed_experts=16",
    "model.n_activated_experts=4",
    "model.n_expert_groups=4",
    "model.n_limited_groups=2",
    "model.n_expert_nodes=2",
    "model.max_nodes_per_token=2",
    "model.max_seq_len=64",
    "model.original_seq_len=64",
    "model.init_std=0.1",
    "model.balance_loss_alpha=0.01",
    "train.seq_len=32",
    "train.seed=7",
]


def small_config(*overrides: str) -> Config:
    return load_config("tiny", overrides=[*SMALL, *overrides])


def batch(cfg: Config, batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and their next-token labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, cfg.train.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tp, pp, ep, fn, args):
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
        fn(*args)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_in_processes(fn, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1, args: tuple = ()) -> None:
    """Run fn(*args) in world_size spawned gloo processes with Megatron-Core's groups set up.

    fn must be a module-level function; an assertion failing in any process fails the caller.
    Spawning costs seconds (imports), so put several checks into one fn.
    """
    mp.spawn(_worker, args=(world_size, _free_port(), tp, pp, ep, fn, args), nprocs=world_size, join=True)
