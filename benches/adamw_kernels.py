"""AdamW step kernels on one GPU at a preset's parameter sizes: what bounds the optimizer's share.

The GPU optimizer backend (parallel/megatron_optimizer.py) clips with a separate pass over the fp32
gradients and then steps with Transformer Engine's FusedAdam (Megatron-Core's precision-aware
optimizer). On dsv3-bench that Adam kernel ran at 2.5 TB/s whether the moments were fp32 or BF16
(docs/benchmarks/h200.md, third run), so the bytes are not its limit. This script times the step
alone on the preset's real parameter sizes, one tensor per parameter as the distributed optimizer
holds them at DP=1:

- te:       TE's multi_tensor_scale over the gradients (the clip), then TE's FusedAdam with fp32
            master weights and the preset's moments: what the backend runs today;
- compiled: one Inductor-generated kernel per parameter (torch.compile, dynamic shapes) that reads
            the clip coefficient from a device scalar, so the clip costs no pass of its own.

Both read the fp32 gradient, master weight and moments and write the master, the moments and the
bf16 parameter. `compiled` is checked against `te` (or, without TE, against the same update in eager
torch) before it is timed.

    python3 benches/adamw_kernels.py --preset dsv3-bench                 # on the GPU machine
    python3 benches/adamw_kernels.py --preset tiny --device cpu          # a smoke run
"""

import argparse
import sys
from pathlib import Path

import torch

BETA1, BETA2, EPS, WEIGHT_DECAY, LR = 0.9, 0.95, 1e-8, 0.1, 1e-4


def adamw_(param, master, grad, exp_avg, exp_avg_sq, scalars) -> None:
    """One AdamW step in place; scalars = [lr, bias correction 1, bias correction 2, clip coefficient]."""
    lr, correction1, correction2, clip = scalars.unbind()
    g = grad * clip
    m = exp_avg.float() * BETA1 + (1 - BETA1) * g
    v = exp_avg_sq.float() * BETA2 + (1 - BETA2) * g * g
    new = master - lr * ((m / correction1) / ((v / correction2).sqrt() + EPS) + WEIGHT_DECAY * master)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(new)
    param.copy_(new)


def parameter_sizes(preset: str) -> tuple[list[int], bool]:
    """The model's parameter sizes (meta device, nothing allocated) and whether its moments are BF16."""
    from megatron_ds.config import load_config
    from megatron_ds.model.transformer import Transformer

    cfg = load_config(preset)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return [p.numel() for p in model.parameters()], cfg.precision.bf16_optimizer_moments


def make_state(sizes: list[int], moments: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {"param": [], "master": [], "grad": [], "exp_avg": [], "exp_avg_sq": []}
    for n in sizes:
        master = torch.randn(n, generator=gen, device=device) * 0.02
        state["master"].append(master)
        state["param"].append(master.to(torch.bfloat16))
        state["grad"].append(torch.randn(n, generator=gen, device=device) * 1e-3)
        state["exp_avg"].append(torch.zeros(n, dtype=moments, device=device))
        state["exp_avg_sq"].append(torch.zeros(n, dtype=moments, device=device))
    return state


def compiled_step(state: dict, step: int, clip: torch.Tensor, kernel) -> None:
    scalars = torch.stack([clip.new_tensor(LR), clip.new_tensor(1 - BETA1**step),
                           clip.new_tensor(1 - BETA2**step), clip])  # fmt: skip
    for tensors in zip(*(state[k] for k in ("param", "master", "grad", "exp_avg", "exp_avg_sq"))):
        kernel(*tensors, scalars)


def te_optimizer(state: dict, moments: torch.dtype):
    from transformer_engine.pytorch.optimizers import FusedAdam

    params = [torch.nn.Parameter(p) for p in state["param"]]
    optimizer = FusedAdam(
        params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY, adam_w_mode=True,
        master_weights=True, master_weight_dtype=torch.float32, exp_avg_dtype=moments,
        exp_avg_sq_dtype=moments, use_decoupled_grad=True,
    )  # fmt: skip
    for param, master, grad in zip(params, state["master"], state["grad"]):
        optimizer.initialize_state(param, store_param_remainders=False)
        optimizer.state[param]["master_param"] = master
        param.decoupled_grad = grad
    state["exp_avg"] = [optimizer.state[p]["exp_avg"] for p in params]
    state["exp_avg_sq"] = [optimizer.state[p]["exp_avg_sq"] for p in params]
    return optimizer


def te_step(optimizer, state: dict, clip: float) -> None:
    from transformer_engine.pytorch.optimizers import multi_tensor_applier, multi_tensor_scale

    overflow = torch.zeros(1, dtype=torch.int, device=state["grad"][0].device)
    multi_tensor_applier(multi_tensor_scale, overflow, [state["grad"], state["grad"]], clip)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--moments", choices=["preset", "fp32", "bf16"], default="preset")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    from benches.timing import median_ms
    from megatron_ds.precision import transformer_engine_available

    sizes, bf16_moments = parameter_sizes(args.preset)
    bf16_moments = {"preset": bf16_moments, "fp32": False, "bf16": True}[args.moments]
    moments = torch.bfloat16 if bf16_moments else torch.float32
    device = torch.device(args.device)
    kernel = torch.compile(adamw_, dynamic=True, fullgraph=True)
    clip = torch.tensor(0.5, device=device)  # a clipping step: the clip pass runs

    # Correctness: one step of each from the same state, on the first parameters (two full states
    # of a 5B model do not fit one GPU).
    sample = [n for i, n in enumerate(sizes) if sum(sizes[:i]) < 200_000_000]
    ours, reference = (make_state(sample, moments, args.device) for _ in range(2))
    compiled_step(ours, 1, clip, kernel)
    use_te = device.type == "cuda" and transformer_engine_available()
    if use_te:
        te_step(te_optimizer(reference, moments), reference, float(clip))
    else:
        compiled_step(reference, 1, clip, adamw_)
    worst = max((a - b).abs().max().item() for a, b in zip(ours["master"], reference["master"]))
    del ours, reference

    n = sum(sizes)
    moment_bytes = 2 if bf16_moments else 4
    traffic = n * (4 + 4 + 4 + 2 * 2 * moment_bytes + 2)  # grad, master r/w, moments r/w, bf16 param
    rows = []
    state, step = make_state(sizes, moments, args.device), iter(range(1, 10**6))
    rows.append(("compiled", median_ms(lambda: compiled_step(state, next(step), clip, kernel), device,
                                       warmup=2, iters=args.iters)))  # fmt: skip
    del state
    if use_te:
        state = make_state(sizes, moments, args.device)
        optimizer = te_optimizer(state, moments)
        rows.append(("te (clip pass + FusedAdam)", median_ms(lambda: te_step(optimizer, state, 0.5), device,
                                                             warmup=2, iters=args.iters)))  # fmt: skip
    print(
        f"{args.preset}: {len(sizes)} parameters, {n / 1e9:.2f}B elements, moments {moments}, "
        f"{args.device}; compiled vs {'te' if use_te else 'eager'}: max |master diff| {worst:.2e}"
    )
    print(f"{'kernel':30} {'ms':>9} {'GB/s (Adam bytes only)':>24}")
    for name, ms in rows:
        print(f"{name:30} {ms:9.2f} {traffic / ms / 1e6:24.0f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
