"""What a run reports: metrics.jsonl, TensorBoard events, a progress bar and a final summary.

Only rank 0 writes; every other rank gets a logger that does nothing.
"""

import json
import time
from pathlib import Path

import torch


def peak_tflops(device: torch.device) -> float:
    """The denominator of MFU: measured matmul peak of this device (bf16 on GPU, fp32 on CPU).

    On CUDA this is the 790 TFLOP/s bf16 matmul measured on the H200 (docs/benchmarks); on a CPU
    it is measured now, with a 1024^3 fp32 matmul, so MFU stays meaningful on any machine.
    """
    if device.type == "cuda":
        return 790.0
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e12


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool, progress: bool):
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            self.bar.update(1)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class NullLogger:
    def log(self, record: dict) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...
