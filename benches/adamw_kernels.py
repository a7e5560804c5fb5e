"""AdamW step kernels on one GPU at a preset's parameter sizes: what bounds the optimizer's share.

Times the AdamW step alone on the preset's real parameter sizes, one tensor per parameter laid back to
back in one buffer per kind as the distributed optimizer holds them at DP=1, with a clipping step's
coefficient:

- fused_adamw: parallel.fused_adamw.FusedAdamW, the GPU backend's inner optimizer: one Inductor
               kernel per run of back-to-back parameters that reads the clip coefficient from a
               device scalar;
- te:          TE's multi_tensor_scale over the gradients (the clip), then TE's FusedAdam with fp32
               master weights: what the backend ran up to the third H200 run.

Both read the fp32 gradient, master weight and moments and write the master, the moments and the
bf16 parameter. fused_adamw is checked against te (without TE: against the same step in eager
torch) before it is timed.

    python3 benches/adamw_kernels.py --preset dsv3-bench [--split-experts]   # on the GPU machine
    python3 benches/adamw_kernels.py --preset tiny --device cpu          # a smoke run
"""

import argparse
import sys
from pathlib import Path

import torch

BETAS, EPS, WEIGHT_DECAY, LR, CLIP = (0.9, 0.95), 1e-8, 0.1, 1e-4, 0.5


def parameter_sizes(preset: str, split_experts: bool) -> tuple[list[int], bool]:
    """The model's parameter sizes (meta device, nothing allocated) and whether its moments are BF16;
    with split_experts one weight per routed expert, as TE's grouped experts (FP8) hold them."""
    from megatron_ds.config import load_config
    from megatron_ds.model.transformer import Transformer

    cfg = load_config(preset)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    sizes = []
    for name, p in model.named_parameters():
        stacked = split_experts and name.rsplit(".", 2)[-2:-1] == ["experts"]
        sizes += [p[0].numel()] * p.size(0) if stacked else [p.numel()]
    return sizes, cfg.precision.bf16_optimizer_moments


def make_state(sizes: list[int], device: str, seed: int = 0, scattered: bool = False) -> dict:
    """bf16 parameters, their fp32 masters and gradients, all from one seed; parameters and gradients
    are views of one buffer each, as Megatron-Core's DDP lays them out (scattered: gradients each in
    an allocation of its own, which leaves FusedAdamW one launch per parameter)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    masters = torch.randn(sum(sizes), generator=gen, device=device) * 0.02
    params = masters.to(torch.bfloat16)
    grads = list((torch.randn(sum(sizes), generator=gen, device=device) * 1e-3).split(sizes))
    return {
        "master": list(masters.split(sizes)),
        "param": [torch.nn.Parameter(p) for p in params.split(sizes)],
        "grad": [g.clone() for g in grads] if scattered else grads,
    }


def fused_adamw(state: dict, moments: torch.dtype):
    from parallel.fused_adamw import FusedAdamW

    optimizer = FusedAdamW([{"params": state["param"], "lr": LR, "betas": BETAS, "eps": EPS,
                                  "weight_decay": WEIGHT_DECAY, "grad_scale": CLIP}], moments)  # fmt: skip
    optimizer.create_states()
    for i, (param, grad) in enumerate(zip(state["param"], state["grad"])):
        state["master"][i] = optimizer.state[param]["master_param"].copy_(state["master"][i])
        param.decoupled_grad = grad
    return optimizer


def te_optimizer(state: dict, moments: torch.dtype):
    from transformer_engine.pytorch.optimizers import FusedAdam

    params = state["param"]
    optimizer = FusedAdam(
        params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, adam_w_mode=True,
        master_weights=True, master_weight_dtype=torch.float32, exp_avg_dtype=moments,
        exp_avg_sq_dtype=moments, use_decoupled_grad=True,
    )  # fmt: skip
    for param, master, grad in zip(params, state["master"], state["grad"]):
        optimizer.initialize_state(param, store_param_remainders=False)
        optimizer.state[param]["master_param"] = master
        param.decoupled_grad = grad
    return optimizer


def te_step(optimizer, state: dict) -> None:
    from transformer_engine.pytorch.optimizers import multi_tensor_applier, multi_tensor_scale

    overflow = torch.zeros(1, dtype=torch.int, device=state["grad"][0].device)
    multi_tensor_applier(multi_tensor_scale, overflow, [state["grad"], state["grad"]], CLIP)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--moments", choices=["preset", "fp32", "bf16"], default="preset")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--split-experts", action="store_true", help="one weight per expert (TE's FP8 experts)"
    )
    args = parser.parse_args()
    from benches.timing import median_ms
    from megatron_ds.precision import transformer_engine_available

    sizes, bf16_moments = parameter_sizes(args.preset, args.split_experts)
    bf16_moments = {"preset": bf16_moments, "fp32": False, "bf16": True}[args.moments]
    moments = torch.bfloat16 if bf16_moments else torch.float32
    device = torch.device(args.device)

    # Correctness: one step of each from the same state, on the first parameters (two full states
    # of a 5B model do not fit one GPU).
    sample = [n for i, n in enumerate(sizes) if sum(sizes[:i]) < 200_000_000]
    ours, reference = (make_state(sample, args.device) for _ in range(2))
    fused_adamw(ours, moments).step()
    use_te = device.type == "cuda" and transformer_engine_available()
    if use_te:
        te_step(te_optimizer(reference, moments), reference)
    else:
        with torch.compiler.set_stance("force_eager"):  # the same math in eager torch
            fused_adamw(reference, moments).step()
    worst = max((a - b).abs().max().item() for a, b in zip(ours["master"], reference["master"]))
    del ours, reference

    n = sum(sizes)
    moment_bytes = 2 if bf16_moments else 4
    traffic = n * (4 + 4 + 4 + 2 * 2 * moment_bytes + 2)  # grad, master r/w, moments r/w, bf16 param
    rows = []
    for name, scattered in (("fused_adamw", False), ("fused_adamw, launch per parameter", True)):
        state = make_state(sizes, args.device, scattered=scattered)
        optimizer = fused_adamw(state, moments)
        rows.append((name, median_ms(optimizer.step, device, warmup=2, iters=args.iters)))
        del state, optimizer
    if use_te:
        state = make_state(sizes, args.device)
        optimizer = te_optimizer(state, moments)
        rows.append(("te (clip pass + FusedAdam)", median_ms(lambda: te_step(optimizer, state), device,
                                                             warmup=2, iters=args.iters)))  # fmt: skip
    print(
        f"{args.preset}: {len(sizes)} parameters, {n / 1e9:.2f}B elements, moments {moments}, "
        f"{args.device}; fused_adamw vs {'te' if use_te else 'eager'}: max |master diff| {worst:.2e}"
    )
    print(f"{'kernel':34} {'ms':>9} {'GB/s (Adam bytes only)':>24}")
    for name, ms in rows:
        print(f"{name:34} {ms:9.2f} {traffic / ms / 1e6:24.0f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
