"""BF16 vs FP8 (Float8BlockScaling, DeepSeek-V3's recipe) training of the same model on the same real text.

    python benches/h200_fp8_accuracy.py --tokens .mdsdata/stdlib_tokens.npy --out $OUT

The model is dsv3-bench's architecture scaled to train in about half a minute per run (MLA with
q-LoRA, one dense layer then MoE with 32 routed experts top-8 in 8 groups, a shared expert, MTP 1).
Data: Python's standard library sources tokenised with the shipped tokenizer
(data_pipeline/assets/tokenizer.json), read in order, the same batches for both runs; same seed,
same initial weights, same steps. Both runs use the TE backend (BF16 runs through it too), so the
only difference is te.autocast. Reports the relative gap of the mean LM loss over the last
`--window` steps (the report's figure: under 0.25%) and writes the two loss curves as a PNG.
"""

import argparse
import json
import os
import sys
from pathlib import Path

SHAPE = [
    "model.vocab_size=8192", "model.dim=1024", "model.inter_dim=4096", "model.moe_inter_dim=512",
    "model.n_layers=6", "model.n_dense_layers=1", "model.n_heads=8", "model.q_lora_rank=384",
    "model.kv_lora_rank=256", "model.n_routed_experts=32", "model.max_seq_len=1024",
    "model.original_seq_len=1024", "model.init_std=0.02",
]  # fmt: skip


def train(fp8: str, tokens, steps: int, micro_batch: int, seq: int, lr: float) -> list[float]:
    import math

    import torch

    from benches.h200_models import build_ours
    from megatron_ds.config import load_config
    from megatron_ds.model.moe import update_expert_bias
    from megatron_ds.optim import ZeroAdamW, clip_gradients, global_grad_norm
    from megatron_ds.precision import forward_context

    cfg = load_config(
        "dsv3-bench",
        overrides=SHAPE + ["precision.linear_impl=te", f"precision.fp8={fp8}", f"train.seq_len={seq}"],
    )
    torch.manual_seed(cfg.train.seed)
    torch.cuda.manual_seed(cfg.train.seed)
    model = build_ours(cfg)
    optimizer = ZeroAdamW(model, cfg, lambda p: None)
    span = micro_batch * (seq + 1)
    losses = []
    for step in range(steps):
        batch = torch.from_numpy(tokens[step * span : (step + 1) * span].astype("int64"))
        batch = batch.view(micro_batch, seq + 1).cuda()
        with forward_context(cfg):
            out = model(batch[:, :-1], labels=batch[:, 1:])
        (out.lm_loss + 0.3 * out.mtp_loss).backward()
        clip_gradients(model, global_grad_norm(model, 1, 1), 1.0)
        warm = min(1.0, (step + 1) / (steps // 10))
        optimizer.step(lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))))
        optimizer.zero_grad()
        update_expert_bias(model, 1e-3)
        losses.append(out.lm_loss.item())
        if step % 50 == 0:
            print(f"{fp8} step {step} lm_loss {losses[-1]:.4f}", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default=".mdsdata/stdlib_tokens.npy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--fp8", default="blockwise")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/h200"))
    args = parser.parse_args()
    import numpy as np

    from benches.h200_models import init_single_process

    init_single_process()
    tokens = np.load(args.tokens)
    needed = args.steps * args.micro_batch * (args.seq + 1)
    if needed > tokens.size:
        raise SystemExit(f"{args.tokens} has {tokens.size} tokens, the run needs {needed}: lower --steps")
    curves = {
        p: train(p, tokens, args.steps, args.micro_batch, args.seq, args.lr) for p in ("none", args.fp8)
    }
    bf16, fp8 = np.array(curves["none"]), np.array(curves[args.fp8])
    tail_bf16, tail_fp8 = bf16[-args.window :].mean(), fp8[-args.window :].mean()
    result = {
        "recipe": args.fp8, "steps": args.steps, "tokens_per_step": args.micro_batch * args.seq,
        "window": args.window, "bf16_tail_loss": float(tail_bf16), "fp8_tail_loss": float(tail_fp8),
        "relative_gap": float((tail_fp8 - tail_bf16) / tail_bf16),
        "bf16": curves["none"], "fp8": curves[args.fp8],
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "h200_fp8_accuracy.json").write_text(json.dumps(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(bf16, label="BF16", lw=1)
    ax.plot(fp8, label=f"FP8 ({args.fp8})", lw=1)
    ax.set(xlabel="step", ylabel="LM loss", title=f"BF16 vs FP8: gap {100 * result['relative_gap']:+.3f}% "
           f"(mean of last {args.window} steps)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "h200_fp8_loss.png", dpi=120)
    print(json.dumps({k: v for k, v in result.items() if k not in ("bf16", "fp8")}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
