"""One routed-expert projection's weight gradient into DDP's fp32 main_grad, three ways, on one GPU.

- grouped + hook add:     torch._grouped_mm forms the bf16 gradient [E, in, out]; DDP's hook adds it
                          with an eager mixed-dtype add (the seventh H200 run's code);
- grouped + compiled add: the same GEMM, then moe.GroupedMatmulIntoMainGrad's compiled add (now);
- per-expert addmm:       one cuBLAS GEMM per expert with bf16 operands that accumulates into its slice
                          of main_grad in fp32 (no bf16 gradient at all), the way the output head's
                          weight gradient is formed (vocab.weight_gradient). It needs the split sizes on
                          the host: here they are known, in training they would come from the forward.

GPU time per call (CUDA events over back-to-back calls) and host time per call, and each result's
relative difference from an fp32 reference. At dsv3-slice's expert shapes by default:

    python3 benches/expert_wgrad.py [--experts 16 --dim 7168 --inter 2048 --rows 32768]
"""

import argparse
import sys
from pathlib import Path

import torch
from timing import gpu_and_host_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dim", type=int, default=7168)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=32768, help="routed token copies (mb x seq x top-K)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("expert_wgrad.py needs a CUDA GPU")

    from megatron_ds.model.compiled import run_fused
    from megatron_ds.model.moe import _accumulate_

    torch.manual_seed(0)
    counts = torch.bincount(
        torch.multinomial(torch.ones(args.experts), args.rows, replacement=True), minlength=args.experts
    )
    splits = counts.tolist()
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(args.rows, args.dim, device="cuda").bfloat16()
    grad = torch.randn(args.rows, args.inter, device="cuda").bfloat16()
    main_grad = torch.zeros(args.experts, args.dim, args.inter, device="cuda")

    def grouped_hook_add():
        main_grad.add_(torch._grouped_mm(x.t(), grad, offs=offsets))

    def grouped_compiled_add():
        run_fused(_accumulate_, main_grad, torch._grouped_mm(x.t(), grad, offs=offsets))

    def per_expert_addmm():
        for e, (x_e, grad_e) in enumerate(zip(x.split(splits), grad.split(splits))):
            torch.addmm(main_grad[e], x_e.t(), grad_e, out_dtype=torch.float32, out=main_grad[e])

    reference = torch.stack([a.t().float() @ b.float() for a, b in zip(x.split(splits), grad.split(splits))])
    shape = f"{args.experts} experts, [{args.dim} x {args.inter}] weights"
    rows = f"{args.rows} rows (per expert {min(splits)}-{max(splits)})"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {shape}, {rows}")
    print("| path | GPU ms per call | host ms per call | rel. difference from fp32 |")
    print("|---|---|---|---|")
    for name, fn in (
        ("grouped + hook add", grouped_hook_add),
        ("grouped + compiled add", grouped_compiled_add),
        ("per-expert addmm into fp32", per_expert_addmm),
    ):
        main_grad.zero_()
        fn()
        rel = ((main_grad - reference).norm() / reference.norm()).item()
        ms, host_ms = gpu_and_host_ms(fn, warmup=3, iters=args.iters)
        print(f"| {name} | {ms:.3f} | {host_ms:.3f} | {rel:.2e} |", flush=True)


if __name__ == "__main__":
    main()
