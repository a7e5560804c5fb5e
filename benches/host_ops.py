"""Host-side work of one training micro-step: aten ops and CPU time of forward + backward.

On a GPU each aten op is at least one launch from Python, and dsv3-bench at micro-batch 1 is
host-bound (docs/benchmarks/h200.md: the GPU runs ~200 ms of kernels in a ~800 ms step). This runs
a preset's layer structure (layers, experts, top-k, groups, MTP) with small widths on the CPU, one
thread, so that the count of ops and the per-op overhead dominate, not the arithmetic:

    python benches/host_ops.py --preset dsv3-bench

Prints aten ops per micro-step (forward + backward, nested calls included), the ops with the most
calls, and the median CPU time of a micro-step.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

SMALL = [  # widths small enough that the op count, not the GEMMs, sets the time
    "model.dim=256", "model.inter_dim=512", "model.moe_inter_dim=64", "model.n_heads=4",
    "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_nope_head_dim=32",
    "model.qk_rope_head_dim=16", "model.v_head_dim=32", "model.vocab_size=1024",
    "precision.params_dtype=fp32",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="further dotted config overrides")
    args = parser.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from megatron_ds.config import load_config
    from megatron_ds.model.init import init_weights
    from parallel.parallelize import build_model

    torch.set_num_threads(1)
    cfg = load_config(args.preset, overrides=[*SMALL, *args.overrides])
    model = build_model(cfg, "cpu")
    init_weights(model, cfg.train.seed, cfg.model.init_std)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (1, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )

    def micro_step() -> None:
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
        (out.lm_loss + cfg.train.mtp_loss_weight * out.mtp_loss).backward()

    for _ in range(2):
        micro_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        micro_step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        micro_step()
        times.append(time.perf_counter() - start)
    m = cfg.model
    experts = f"{m.n_routed_experts} experts top-{m.n_activated_experts}"
    print(f"{args.preset} structure ({m.n_layers} layers, {experts}, MTP {m.mtp_depth}) at small widths, "
          f"seq {args.seq}, CPU, 1 thread")  # fmt: skip
    print(f"aten ops per micro-step: {sum(e.count for e in events)}")
    print(f"CPU ms per micro-step (median of {args.iters}): {1e3 * statistics.median(times):.0f}")
    print(f"{'most called':32} {'calls':>7}")
    for e in sorted(events, key=lambda e: -e.count)[:10]:
        print(f"{e.key:32} {e.count:7}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
