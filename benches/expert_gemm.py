"""The routed experts' SwiGLU FFN (three grouped GEMMs, forward and backward) on one GPU, per GEMM path.

At a preset's expert shapes, with one layer's routed token copies (micro-batch x sequence x top-K rows)
split over its experts as a router would (a random multinomial), times forward + backward of:

- torch:          megatron_ds.model.moe.GroupedExperts, BF16 `torch._grouped_mm` (device offsets);
- te:             parallel.transformer_engine.TEGroupedExperts on TE's split-quantize path (host split
                  sizes, one host wait per call, groups padded to 16 rows in FP8 by the layout the
                  dispatcher builds, timed with it), in BF16 and under
                  each FP8 recipe given;
- te-grouped:     TEGroupedExperts on TE's grouped-tensor path (CUDA split sizes, one cuBLASLt grouped
                  GEMM per projection, no host wait; in FP8 groups padded to 128 rows on the GPU),
                  one weight per expert;
- te-grouped-one: TE GroupedLinear's grouped-tensor path with one grouped weight parameter per
                  projection (TE's experimental `single_grouped_weight`: one quantization per
                  projection instead of one per expert), padded as te-grouped.

TE 2.20 runs the grouped-tensor path only with cuBLASLt >= 13.4 (13.6 for FP8 block scaling on
Hopper); the table says where it is unsupported. Each row also gives the output's relative error
against the torch path in fp32 and the host's time per call: a path whose host time exceeds its GPU
time is launch-bound.

    python3 benches/expert_gemm.py --preset dsv3-bench --micro-batch 1   # on the GPU machine
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from timing import gpu_and_host_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("NVTE_GROUPED_LINEAR_SINGLE_PARAM", "1")  # TE gates single_grouped_weight on it


def single_weight_experts(experts):
    """TEGroupedExperts on the grouped-tensor path, its projections rebuilt with one grouped weight each."""
    import transformer_engine.pytorch as te

    from parallel.transformer_engine import TEGroupedExperts

    module = TEGroupedExperts(experts, torch.bfloat16, "cuda", fp8=True)
    n_local, dim, inter_dim = experts.w1.shape
    kw = dict(bias=False, params_dtype=torch.bfloat16, device="cuda", use_grouped_tensor=True,
              single_grouped_weight=True)  # fmt: skip
    shapes = {"w1": (dim, inter_dim), "w3": (dim, inter_dim), "w2": (inter_dim, dim)}
    for name, (n_in, n_out) in shapes.items():
        layer = te.GroupedLinear(n_local, n_in, n_out, **kw)
        with torch.no_grad():
            layer.weight.copy_(getattr(experts, name).transpose(1, 2))  # local [E, in, out] -> [E, out, in]
        setattr(module, name, layer)
    return module


def measure(name: str, experts, x, counts, recipe, reference, iters: int) -> dict:
    import transformer_engine.pytorch as te

    from megatron_ds.model.moe import run_on_sorted_rows

    x = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape, device=x.device, dtype=x.dtype)

    def step():
        with te.autocast(enabled=recipe is not None, recipe=recipe):
            out = run_on_sorted_rows(experts, x, counts)
        out.backward(grad)
        return out

    try:
        out = step()
    except Exception as error:  # noqa: BLE001 - an unsupported path is a row of the table
        return {"path": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"}
    rel = ((out.float() - reference).norm() / reference.norm()).item()
    ms, host_ms = gpu_and_host_ms(step, warmup=3, iters=iters)
    experts.zero_grad(set_to_none=True)
    return {"path": name, "ms": ms, "host_ms": host_ms, "rel_err": rel}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--recipes", nargs="+", default=["none", "blockwise"])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    from transformer_engine.pytorch.module.grouped_linear import tex

    from megatron_ds.config import load_config
    from megatron_ds.model.moe import GroupedExperts
    from megatron_ds.precision import fp8_recipe
    from parallel.transformer_engine import TEGroupedExperts, copy_local_weights, grouped_tensor_path

    m = load_config(args.preset).model
    torch.manual_seed(0)
    experts = GroupedExperts(m.n_routed_experts, m.dim, m.moe_inter_dim).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for w in experts.parameters():
            w.normal_(0, m.init_std)
    rows = args.micro_batch * m.max_seq_len * m.n_activated_experts
    counts = torch.bincount(
        torch.multinomial(torch.ones(m.n_routed_experts), rows, replacement=True),
        minlength=m.n_routed_experts,
    ).cuda()
    x = torch.randn(rows, m.dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        reference = experts(x, counts).float()

    paths = [("torch", experts)]
    for name, grouped_tensor in (("te", False), ("te-grouped", True)):
        module = TEGroupedExperts(experts, torch.bfloat16, "cuda", fp8=True, grouped_tensor=grouped_tensor)
        copy_local_weights(module, experts)
        paths.append((name, module))
    try:
        paths.append(("te-grouped-one", single_weight_experts(experts)))
    except Exception as error:  # noqa: BLE001 - an unsupported path is a line of the output
        print(f"te-grouped-one not built: {type(error).__name__}: {str(error).splitlines()[0][:200]}")

    print(f"cuBLASLt {tex.get_cublasLt_version()}, torch {torch.__version__}; "
          f"{args.preset}: {m.n_routed_experts} experts {m.dim}x{m.moe_inter_dim}, {rows} rows, "
          f"micro-batch {args.micro_batch}")  # fmt: skip
    print("| recipe | path | ms (GPU, fwd+bwd) | host ms per call | rel. error vs torch bf16 |")
    print("|---|---|---|---|---|")
    for recipe_name in args.recipes:
        recipe = None if recipe_name == "none" else fp8_recipe(recipe_name)
        if not grouped_tensor_path(recipe, torch.bfloat16):
            print(f"| {recipe_name} | (TE's grouped-tensor path unsupported: te-grouped runs as te) | | | |")
        for name, module in paths:
            if name == "torch" and recipe is not None:
                continue  # BF16 only
            r = measure(name, module, x, counts, recipe, reference, args.iters)
            if "error" in r:
                print(f"| {recipe_name} | {name} | {r['error']} | | |", flush=True)
            else:
                print(f"| {recipe_name} | {name} | {r['ms']:.2f} | {r['host_ms']:.2f} | {r['rel_err']:.2e} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
