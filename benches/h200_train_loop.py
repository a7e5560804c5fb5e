"""Training-loop figures on one H200 for dsv3-bench: blocking time of an asynchronous checkpoint save.

    python benches/h200_train_loop.py --out $OUT

The optimizer step's share of the step time is measured by benches/h200_train_step.py (column
`optimizer share`). Here: megatron_ds.checkpoint.Checkpointer with checkpoint.async_save=true saves the
model and ZeroAdamW state (fp32 master + moments) of dsv3-bench; the time save() holds up the
training loop (the GPU -> CPU snapshot) is reported for a first save (buffers allocated) and a
second one (buffers reused), with the background write's total time.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="dsv3-bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/h200"))
    args = parser.parse_args()
    import torch

    from benches.h200_models import bench_config, build_ours, init_single_process
    from megatron_ds.checkpoint import Checkpointer, model_tensors
    from megatron_ds.config import CheckpointConfig
    from megatron_ds.optim import ZeroAdamW

    init_single_process()
    cfg = bench_config(args.preset, 1, "none", linear_impl="local")
    model = build_ours(cfg)
    optimizer = ZeroAdamW(model, cfg, lambda p: None)
    tensors = {**model_tensors(model), **optimizer.state_tensors()}
    size_gib = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**30
    result = {"preset": args.preset, "checkpoint_gib": size_gib}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as root:
        checkpointer = Checkpointer(Path(root), CheckpointConfig(async_save=True, keep_last=1))
        for step in (1, 2):
            torch.cuda.synchronize()
            checkpointer.save(step, tensors, {"train_state": {"step": step}})
            result[f"blocking_s_save{step}"] = checkpointer.last_blocking_seconds
            start = time.perf_counter()
            checkpointer.wait()
            result[f"background_s_save{step}"] = (
                time.perf_counter() - start + checkpointer.last_blocking_seconds
            )
    print(json.dumps(result))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "h200_train_loop.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
