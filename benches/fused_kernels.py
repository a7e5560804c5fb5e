"""The model's small fused GPU kernels against the unfused operators they replace, forward + backward.

- RMSNorm: F.rms_norm on fp32 copies of a bf16 input, cast back (before) against `norm.RMSNorm`.
- MLA's queries: split, rotate the rope part, cat (before) against `rope.rotate_tail`.
- MLA's keys and values: split, rotate the shared rope key, broadcast it to every head, cat, and the
  contiguous values attention wants (before) against `rope.keys_and_values`.
- The routed token copies gathered into 128-row expert groups for TE's FP8 grouped GEMM: the sorted
  gather, a zero fill and index_copy_ (the eighth H200 run's code) against one gather straight into
  the padded layout (`permutation.align_groups`), each with its gradient.
- SwiGLU on the routed experts' rows: F.silu(gate) * up (before) against `norm.swiglu`.
- A routed-expert weight gradient into DDP's fp32 main_grad: the eager mixed-dtype add of DDP's hook
  against the compiled add of `moe.GroupedMatmulIntoMainGrad`.

Needs a CUDA GPU (Inductor compiles the fused bodies there). DeepSeek-V3's widths by default:

    python benches/fused_kernels.py [--seq 4096] [--batch 1]
"""

import argparse
import sys
from pathlib import Path

import torch
from timing import per_call_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16, help="local experts of one [E, dim, inter] weight")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_kernels.py needs a CUDA GPU: the fused bodies are compiled for it")

    from megatron_ds.model.compiled import run_fused
    from megatron_ds.model.moe import _accumulate_, tokens_per_expert
    from megatron_ds.model.norm import RMSNorm, swiglu
    from megatron_ds.model.permutation import align_groups, aligned_layout, gather_copies, sort_copies
    from megatron_ds.model.rope import _rotate_pairs, keys_and_values, rotate_tail

    nope, rope_dim, v_dim, dim, inter = 128, 64, 128, 7168, 2048
    b, s, h = args.batch, args.seq, args.heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    angles = torch.rand(s, rope_dim // 2, device="cuda", generator=gen) * s
    cos, sin = angles.cos(), angles.sin()

    def leaf(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).bfloat16().requires_grad_()

    q, kv, k_rope = leaf(b, s, h, nope + rope_dim), leaf(b, s, h, nope + v_dim), leaf(b, s, rope_dim)
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(q)
    grad_v = torch.randn(b, s, h, v_dim, device="cuda").bfloat16()

    def queries_unfused():
        q_nope, q_rope = q.split([nope, rope_dim], dim=-1)
        torch.autograd.grad(torch.cat([q_nope, _rotate_pairs(q_rope, cos, sin)], dim=-1), q, grad_q)

    def keys_unfused():
        k_nope, v = kv.split([nope, v_dim], dim=-1)
        shared = _rotate_pairs(k_rope.unsqueeze(2), cos, sin).expand(-1, -1, h, -1)
        k = torch.cat([k_nope, shared], dim=-1)
        torch.autograd.grad([k, v.contiguous()], [kv, k_rope], [grad_k, grad_v])

    def keys_fused():
        torch.autograd.grad(keys_and_values(kv, k_rope, (cos, sin), nope), [kv, k_rope], [grad_k, grad_v])

    norm = RMSNorm(dim).cuda().bfloat16()
    x, grad_x = leaf(b, s, dim), torch.randn(b, s, dim, device="cuda").bfloat16()

    def norm_unfused():
        y = torch.nn.functional.rms_norm(x.float(), (dim,), norm.weight.float(), norm.eps).type_as(x)
        torch.autograd.grad(y, [x, norm.weight], grad_x)

    tokens = leaf(b * s, dim)
    indices = torch.rand(b * s, args.experts, device="cuda", generator=gen).topk(8, dim=-1).indices
    order, inverse = sort_copies(indices)
    counts = tokens_per_expert(indices, args.experts)
    padded_order, padded_inverse, _ = align_groups(order, inverse, counts, 128)
    positions = aligned_layout(order, counts, 128)[1]
    grad_padded = torch.randn(padded_order.numel(), dim, device="cuda").bfloat16()

    def gather_padded():
        torch.autograd.grad(gather_copies(tokens, padded_order, padded_inverse), tokens, grad_padded)

    def pad_after_gather():
        rows = gather_copies(tokens, order, inverse)
        placed = rows.new_zeros(grad_padded.shape).index_copy_(0, positions, rows)
        torch.autograd.grad(placed, tokens, grad_padded)

    gate, up = leaf(b * s * 8, inter), leaf(b * s * 8, inter)
    grad_h = torch.randn_like(gate)

    main_grad = torch.zeros(args.experts, dim, inter, device="cuda")
    expert_grad = torch.randn(args.experts, dim, inter, device="cuda").bfloat16()
    rows = [
        ("RMSNorm", f"[{b}, {s}, {dim}]", norm_unfused,
         lambda: torch.autograd.grad(norm(x), [x, norm.weight], grad_x)),
        ("MLA queries", f"[{b}, {s}, {h}, {nope + rope_dim}]", queries_unfused,
         lambda: torch.autograd.grad(rotate_tail(q, (cos, sin)), q, grad_q)),
        ("MLA keys and values", f"[{b}, {s}, {h}, {nope}+{v_dim}]", keys_unfused, keys_fused),
        ("routed copies into 128-row expert groups (FP8)", f"[{b * s} x 8 -> {padded_order.numel()}, {dim}]",
         pad_after_gather, gather_padded),
        ("SwiGLU of the routed experts", f"[{b * s} x 8, {inter}]",
         lambda: torch.autograd.grad(torch.nn.functional.silu(gate) * up, [gate, up], grad_h),
         lambda: torch.autograd.grad(swiglu(gate, up), [gate, up], grad_h)),
        ("expert weight gradient into fp32 main_grad", f"[{args.experts}, {dim}, {inter}]",
         lambda: main_grad.add_(expert_grad), lambda: run_fused(_accumulate_, main_grad, expert_grad)),
    ]  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, forward + backward per call")
    print("| kernel | shape | unfused ms | fused ms | unfused / fused |")
    print("|---|---|---|---|---|")
    for name, shape, unfused, fused in rows:
        before = per_call_ms(unfused, torch.device("cuda"), 3, args.iters)
        after = per_call_ms(fused, torch.device("cuda"), 3, args.iters)
        print(f"| {name} | {shape} | {before:.3f} | {after:.3f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
