"""Cost of the expert-parallel dispatcher against the local (EP=1) path, for one MoE layer.

For each mode it times forward + backward of the whole MoE layer and of its parts measured alone
(router, expert GEMMs on the rows this rank receives, shared expert); the dispatcher's own cost is
what the layer takes beyond its parts: permute, count exchange, all-to-alls, un-permute, combine.
`permute` times the home-side permutation alone: gather_copies then weighted_combine, fwd + bwd.
On a GPU each figure is the time per call of calls queued back to back (CUDA events), so host
launch overhead overlaps the GPU's work as it does in training; on a CPU, the median call.

  local     LocalDispatcher, all experts in one process (the reference)
  a2a       AllToAllDispatcher over --world ranks (1: a single-rank group, so pure index overhead)

  python benches/dispatcher_overhead.py --preset tiny --tokens 4096 --world 1 2
  python benches/dispatcher_overhead.py --device cuda --preset dsv3-slice --tokens 8192   # one H200
"""

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import per_call_ms

from megatron_ds.config.load import load_config
from megatron_ds.model.moe import LocalDispatcher, MoE, tokens_per_expert
from megatron_ds.model.permutation import gather_copies, sort_copies, weighted_combine
from parallel.expert_parallel import apply_expert_parallel
from parallel.launcher import free_port
from parallel.parallelize import DTYPES


def build_moe(args, device, dtype, world: int) -> MoE:
    cfg = load_config(args.preset, overrides=[f"parallel.expert={world}"], check=False)
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoE(cfg.model)
    if world > 1 or args.mode == "a2a":
        apply_expert_parallel(moe, dist.group.WORLD, cfg)
    with torch.no_grad():
        for param in moe.parameters():
            if param.dim() > 1:
                param.normal_(std=0.02)
    moe.to(dtype)
    moe.gate.float()
    return moe, cfg


def measure(args, device: torch.device, world: int) -> dict:
    dtype = DTYPES[args.dtype]
    moe, cfg = build_moe(args, device, dtype, world)
    gen = torch.Generator(device=device).manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
    x = torch.randn(1, args.tokens, cfg.model.dim, device=device, dtype=dtype, generator=gen)
    x.requires_grad_()
    probe = torch.randn_like(x)

    def layer():
        (moe(x) * probe).sum().backward()

    flat = x.detach().view(-1, cfg.model.dim)
    weights, indices, _ = moe.gate(flat, args.tokens)
    order, inverse = sort_copies(indices)
    if isinstance(moe.dispatcher, LocalDispatcher):
        rows = gather_copies(flat, order, inverse)
        counts = tokens_per_expert(indices, moe.experts.n_local_experts)
    else:
        rows, counts, _ = moe.dispatcher.dispatch(flat, indices)
    rows = rows.detach().requires_grad_()

    def experts():
        out = moe.experts(rows, counts)
        (out * out.detach()).sum().backward()

    def shared():
        out = moe.shared_experts(flat.requires_grad_())
        (out * out.detach()).sum().backward()

    def gate():
        w, _, loss = moe.gate(flat.requires_grad_(), args.tokens)
        (w.float().sum() + loss).backward()

    tokens, routing_weights = flat.clone().requires_grad_(), weights.detach().requires_grad_()
    grad_out = torch.randn_like(flat)

    def permute():
        tokens.grad = routing_weights.grad = None  # time the permutation's kernels, not grad accumulation
        rows = gather_copies(tokens, order, inverse)
        weighted_combine(rows, order, inverse, routing_weights).backward(grad_out)

    times = {name: per_call_ms(fn, device, args.warmup, args.iters) for name, fn in
             [("layer", layer), ("gate", gate), ("experts", experts), ("shared", shared),
              ("permute", permute)]}  # fmt: skip
    times["dispatch"] = times["layer"] - times["gate"] - times["experts"] - times["shared"]
    times["rows_received"] = int(counts.sum())
    return times


def run(rank: int, args, world: int, port: int, results):
    device = torch.device(args.device)
    torch.set_num_threads(max(1, args.threads // world))
    if args.mode == "a2a":
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=5),
        )
    times = measure(args, device, world)
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, times)
        dist.destroy_process_group()
        times = {k: max(t[k] for t in gathered) for k in times}  # the slowest rank sets the pace
    if rank == 0:
        results.put(times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one process per GPU)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 (default: fp32 on cpu, bf16 on cuda)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="EP sizes for the a2a mode")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ctx = mp.get_context("spawn")
    rows = []
    for mode, world in [("local", 1)] + [("a2a", w) for w in args.world]:
        args.mode = mode
        results = ctx.SimpleQueue()
        mp.start_processes(run, args=(args, world, free_port(), results), nprocs=world, start_method="spawn")
        rows.append({"mode": mode, "ep": world, **results.get()})
    print(
        f"preset {args.preset}, {args.tokens} tokens/rank, {args.dtype} on {args.device}; ms, fwd+bwd, median"
    )
    header = ("mode", "EP", "layer", "gate", "experts", "shared", "dispatch", "share", "permute")
    print("{:6} {:>3} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8}".format(*header))
    for r in rows:
        share = 100 * r["dispatch"] / r["layer"]
        print(
            f"{r['mode']:6} {r['ep']:>3} {r['layer']:9.2f} {r['gate']:8.2f} {r['experts']:8.2f} "
            f"{r['shared']:8.2f} {r['dispatch']:9.2f} {share:5.1f}% {r['permute']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
