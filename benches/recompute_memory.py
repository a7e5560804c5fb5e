"""Activation memory kept for the backward, per token and layer, with each selective-recomputation region.

Builds one dense and one MoE block of `--preset` (bf16, on the CPU: the bytes autograd keeps do not
depend on the device), runs their forward on `--seq` random tokens and sums the distinct storages that
autograd saves (torch.autograd.graph.saved_tensors_hooks). The attention core's own saved state depends
on the kernel (here PyTorch's CPU flash kernel, which keeps q, k, v, the output and the log-sum-exp).

    python benches/recompute_memory.py --preset dsv3-bench --seq 256
"""

import argparse
import sys
from pathlib import Path

import torch


def kept_bytes(preset: str, seq: int, regions: list[str]) -> dict[str, float]:
    from megatron_ds.config import load_config
    from megatron_ds.model.rope import rotary_table
    from parallel.parallelize import ModelGroups, build_model
    from parallel.recompute import bytes_kept_for_backward

    listed = ",".join(regions)
    overrides = ["model.n_layers=2", "model.n_dense_layers=1", "model.mtp_depth=0", "model.vocab_size=1024",
                 f"train.recompute=[{listed}]", "precision.params_dtype=bf16"]  # fmt: skip
    model = build_model(load_config(preset, overrides=overrides), "cpu", ModelGroups())
    x = torch.randn(1, seq, model.args.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = rotary_table(model.args, seq, x.device)
    result = {}
    for kind, layer in zip(("dense", "moe"), model.layers.values()):
        kept = bytes_kept_for_backward(lambda: layer(x, rope, None), layer.parameters())  # noqa: B023
        result[kind] = kept / seq
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    from parallel.recompute import REGIONS

    configs = [[]] + [[name] for name in REGIONS] + [list(REGIONS)]
    base = kept_bytes(args.preset, args.seq, [])
    print(f"{args.preset}, {args.seq} tokens, bf16: KiB kept per token for the backward")
    print(f"{'train.recompute':32} {'dense block':>12} {'saved':>7} {'MoE block':>12} {'saved':>7}")
    for regions in configs:
        kept = base if not regions else kept_bytes(args.preset, args.seq, regions)
        cells = [f"{kept[k] / 1024:12.1f} {100 * (1 - kept[k] / base[k]):6.1f}%" for k in ("dense", "moe")]
        print(f"{'[' + ','.join(regions) + ']':32} {cells[0]} {cells[1]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
