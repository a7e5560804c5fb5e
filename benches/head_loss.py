"""The output head's loss on the CPU: torch's cross-entropy against the fused function's bodies run eagerly.

megatron_ds.model.vocab.linear_cross_entropy runs LinearCrossEntropy where Inductor compiles its bodies
(CUDA GPUs) and torch's own cross-entropy elsewhere. This times forward + backward of both on the CPU,
so the choice rests on a measurement:

    python benches/head_loss.py                 # the tiny preset's head: 2048 rows (MTP 1), 8192 words
    python benches/head_loss.py --rows 4096 --dim 256 --vocab 32768
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()

    from megatron_ds.model.vocab import LinearCrossEntropy

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.dim, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=gen) / args.dim**0.5).requires_grad_()
    labels = torch.randint(args.vocab, (args.rows,), generator=gen)
    losses = {
        "torch cross-entropy": lambda: F.cross_entropy(F.linear(h, weight), labels, reduction="none"),
        "LinearCrossEntropy, eager bodies": lambda: LinearCrossEntropy.apply(h, weight, labels),
    }
    print(f"{args.rows} rows x dim {args.dim} x vocab {args.vocab}, fp32, {torch.get_num_threads()} threads")
    print("| loss | ms per forward + backward (median) |")
    print("|---|---|")
    for name, loss in losses.items():
        ms = median_ms(lambda loss=loss: loss().mean().backward(), torch.device("cpu"), 2, args.iters)
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
