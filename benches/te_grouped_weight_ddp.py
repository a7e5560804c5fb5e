"""TE's single grouped weight under Megatron-Core's DDP: which storage the optimizer steps, which TE reads.

TE 2.20's GroupedLinear(single_grouped_weight=True) holds all experts' weights as one GroupedTensor
parameter, quantized to FP8 in one call per projection instead of one per expert (the host cost
that makes dsv3-bench's FP8 step host-bound; docs/benchmarks/h200.md). Megatron-Core 0.16.1's DDP
moves every parameter into its contiguous buffer (`param.data = buffer view`); for this wrapper
tensor the assignment leaves the storage TE's GEMMs read (`rowwise_data`) where it was. This checks,
on one GPU, for a [8 experts x 512 x 1024] projection:

- after DDP's wrap: whether DDP's buffer holds the weight, and whether TE's output follows the buffer;
- after pointing `rowwise_data` at the parameter's range of DDP's buffer (values copied first): whether
  the BF16 and FP8 (blockwise) outputs follow the buffer, and whether the FP8 weight gradient lands in
  DDP's gradient buffer, against an fp32 reference.

    source /root/te_env.sh && PYTHONPATH=$PWD python3 benches/te_grouped_weight_ddp.py   # on the H200
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["NVTE_GROUPED_LINEAR_SINGLE_PARAM"] = "1"  # TE gates single_grouped_weight on it

EXPERTS, DIM, OUT, ROWS = 8, 1024, 512, 256


def main() -> None:
    import transformer_engine.pytorch as te
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from transformer_engine.common.recipe import Float8BlockScaling

    from benches.h200_models import bench_config, init_single_process
    from parallel.megatron_optimizer import _transformer_config

    init_single_process()
    torch.manual_seed(0)
    layer = te.GroupedLinear(EXPERTS, DIM, OUT, bias=False, params_dtype=torch.bfloat16, device="cuda",
                             use_grouped_tensor=True, single_grouped_weight=True)  # fmt: skip
    with torch.no_grad():
        layer.weight.rowwise_data.normal_(0, 0.02)
    weight = layer.weight.rowwise_data.clone()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    config = _transformer_config(bench_config("dsv3-bench", 1, "none"))
    ddp = DistributedDataParallel(config, ddp_config, layer)
    layer.fuse_wgrad_accumulation = True
    param = layer.weight
    buffer = (ddp.buffers + ddp.expert_parallel_buffers)[0]
    start, end, _ = buffer.param_index_map[param]
    params, grads = buffer.param_data[start:end], buffer.grad_data[start:end]
    x = torch.randn(EXPERTS * ROWS, DIM, device="cuda", dtype=torch.bfloat16)
    counts = torch.full((EXPERTS,), ROWS, device="cuda", dtype=torch.int64)

    def follows_buffer(fp8: bool) -> bool:
        """Does the layer's output double when DDP's copy of the weight doubles?"""
        with torch.no_grad(), te.autocast(enabled=fp8, recipe=Float8BlockScaling()):
            y0 = layer(x, counts)
            params.mul_(2)
            y1 = layer(x, counts)
            params.div_(2)
        return bool(y0.abs().sum() > 0) and torch.allclose(y1.float(), 2 * y0.float(), rtol=2e-2, atol=2e-2)

    rows = [("DDP's buffer holds the weight after the wrap", torch.equal(params, weight.view(-1))),
            ("BF16 output follows DDP's buffer after the wrap", follows_buffer(False))]  # fmt: skip
    params.copy_(weight.view(-1))
    param.rowwise_data = params.view(param.rowwise_data.shape)
    rows += [("BF16 output follows the buffer, rowwise_data rebound", follows_buffer(False)),
             ("FP8 output follows the buffer, rowwise_data rebound", follows_buffer(True))]  # fmt: skip
    xr = x.clone().requires_grad_()
    with te.autocast(enabled=True, recipe=Float8BlockScaling()):
        y = layer(xr, counts)
    y.float().square().sum().backward()
    per_expert = zip(x.float().split(ROWS), (2 * y.detach().float()).split(ROWS))
    want = torch.stack([dy.t() @ xe for xe, dy in per_expert]).view(-1)  # d sum(y^2) / dW_e, [OUT, DIM] each
    error = float((grads - want).norm() / want.norm())
    rows += [("FP8 weight gradient in DDP's grad buffer, no .grad",
              param.main_grad.data_ptr() == grads.data_ptr() and param.grad is None),
             (f"its relative error against fp32: {error:.3f} (< 0.1)", error < 0.1)]  # fmt: skip
    print("| check | result |\n|---|---|")
    for check, ok in rows:
        print(f"| {check} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main()
