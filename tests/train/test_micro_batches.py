"""train.cuda_graphs on a machine without CUDA: refused before anything starts, naming the setting.
The captured step itself is tested on the GPU (tests/gpu/test_cuda_graphs.py)."""

import pytest
import torch

from megatron_ds.config import ConfigError, load_config
from megatron_ds.train import train


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_without_a_gpu_fail_at_start(tmp_path):
    cfg = load_config("tiny", overrides=["train.cuda_graphs=true", "precision.params_dtype=bf16"])
    with pytest.raises(ConfigError, match="on CUDA GPUs only: on CPUs set train.cuda_graphs=false"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
