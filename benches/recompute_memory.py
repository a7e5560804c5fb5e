"""Activation memory kept for the backward, per token and layer, with each selective-recomputation region,
and on a GPU what the replays cost.

Builds one dense and one MoE block of `--preset` (bf16, local backend), runs their forward on `--seq`
random tokens and sums the distinct storages that autograd saves (torch.autograd.graph.saved_tensors_hooks).
The attention core's own saved state depends on the kernel (on the CPU PyTorch's flash kernel, which keeps
q, k, v, the output and the log-sum-exp). With `--device cuda` it also times each block's forward +
backward (CUDA events over back-to-back calls, fused bodies compiled) and reads the CUDA memory the
forward leaves allocated for the backward.

    python benches/recompute_memory.py --preset dsv3-bench --seq 256
    python benches/recompute_memory.py --preset dsv3-bench --seq 4096 --device cuda
"""

import argparse
import sys
from pathlib import Path

import torch


def measure(preset: str, seq: int, regions: list[str], device: str) -> dict[str, tuple]:
    """Per block kind: (bytes kept per token, ms per forward + backward, CUDA bytes the forward left
    allocated per token); the last two on a GPU only."""
    from h200_models import build_ours
    from timing import per_call_ms

    from megatron_ds.config import load_config
    from megatron_ds.model.rope import rotary_table
    from parallel.parallelize import ModelGroups, build_model
    from parallel.recompute import bytes_kept_for_backward

    listed = ",".join(regions)
    overrides = ["model.n_layers=2", "model.n_dense_layers=1", "model.mtp_depth=0", "model.vocab_size=1024",
                 f"train.recompute=[{listed}]", "precision.params_dtype=bf16"]  # fmt: skip
    cfg = load_config(preset, overrides=overrides)
    gpu = device == "cuda"
    model = build_ours(cfg) if gpu else build_model(cfg, "cpu", ModelGroups())
    x = torch.randn(1, seq, model.args.dim, dtype=torch.bfloat16, device=device, requires_grad=True)
    rope = rotary_table(model.args, seq, x.device)
    result = {}
    for kind, layer in zip(("dense", "moe"), model.layers.values()):
        kept = bytes_kept_for_backward(lambda: layer(x, rope, None), layer.parameters())  # noqa: B023
        ms = allocated = None
        if gpu:
            ms = per_call_ms(lambda: layer(x, rope, None).sum().backward(), torch.device(device), 3, 10)  # noqa: B023
            before = torch.cuda.memory_allocated()
            out = layer(x, rope, None)
            allocated = (torch.cuda.memory_allocated() - before) / seq
            del out
        result[kind] = (kept / seq, ms, allocated)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    from parallel.recompute import REGIONS

    configs = [[]] + [[name] for name in REGIONS] + [list(REGIONS)]
    base = measure(args.preset, args.seq, [], args.device)
    print(f"{args.preset}, {args.seq} tokens, bf16, {args.device}: KiB kept per token for the backward")
    header = f"{'train.recompute':32} {'dense block':>12} {'saved':>7} {'MoE block':>12} {'saved':>7}"
    if args.device == "cuda":
        # ms per forward + backward; CUDA KiB per token the forward leaves allocated
        header += f" {'dense ms':>9} {'MoE ms':>8} {'dense KiB':>10} {'MoE KiB':>8}"
    print(header)
    for regions in configs:
        got = base if not regions else measure(args.preset, args.seq, regions, args.device)
        cells = [
            f"{got[k][0] / 1024:12.1f} {100 * (1 - got[k][0] / base[k][0]):6.1f}%" for k in ("dense", "moe")
        ]
        line = f"{'[' + ','.join(regions) + ']':32} {cells[0]} {cells[1]}"
        if args.device == "cuda":
            (_, dense_ms, dense_cuda), (_, moe_ms, moe_cuda) = got["dense"], got["moe"]
            line += f" {dense_ms:9.2f} {moe_ms:8.2f} {dense_cuda / 1024:10.1f} {moe_cuda / 1024:8.1f}"
        print(line)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
