"""Precision settings on the CPU: validation, the start-up checks, the TE backend's CPU-side pieces."""

import contextlib

import pytest
import torch

from megatron_ds import precision
from megatron_ds.config import ConfigError, load_config
from parallel.transformer_engine import local_counterpart


def cfg(*overrides: str):
    return load_config("tiny", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision.fp8=blockwise"], "needs Transformer Engine: set precision.linear_impl=te"),
        (["precision.linear_impl=te", "precision.fp8=e5m2"], "precision.fp8='e5m2': choose none, blockwise"),
        (["precision.expert_gemm=cutlass"], "precision.expert_gemm='cutlass': choose auto, torch or te"),
        (
            ["precision.expert_gemm=te"],
            "expert_gemm=te needs Transformer Engine: set precision.linear_impl=te",
        ),
        (
            ["precision.linear_impl=te", "precision.fp8=blockwise", "precision.expert_gemm=torch"],
            "runs the routed experts in BF16, but precision.fp8=blockwise asks for FP8 experts",
        ),
    ],
)
def test_invalid_precision_is_rejected_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg(*overrides)


def test_te_under_tensor_parallelism_is_accepted_at_load():
    c = cfg("precision.linear_impl=te", "precision.fp8=blockwise", "parallel.tensor=2")
    assert (c.precision.linear_impl, c.parallel.tensor) == ("te", 2)


def test_routed_experts_use_te_only_where_fp8_needs_it():
    assert not precision.te_grouped_experts(cfg())
    assert not precision.te_grouped_experts(cfg("precision.linear_impl=te"))
    assert precision.te_grouped_experts(cfg("precision.linear_impl=te", "precision.fp8=blockwise"))
    assert precision.te_grouped_experts(cfg("precision.linear_impl=te", "precision.expert_gemm=te"))


def test_local_backend_needs_nothing():
    precision.check_precision(cfg(), torch.device("cpu"))
    assert isinstance(precision.forward_context(cfg()), contextlib.nullcontext)


def test_te_without_transformer_engine_fails_at_start(monkeypatch):
    monkeypatch.setattr(precision, "transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="needs NVIDIA Transformer Engine.*set precision.linear_impl=local"):
        precision.check_precision(cfg("precision.linear_impl=te"), torch.device("cuda"))


def test_te_on_cpu_fails_at_start(monkeypatch):
    monkeypatch.setattr(precision, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError, match="runs on CUDA GPUs only"):
        precision.check_precision(cfg("precision.linear_impl=te"), torch.device("cpu"))


def test_fp8_on_a_gpu_without_fp8_fails_at_start(monkeypatch):
    monkeypatch.setattr(precision, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    c = cfg("precision.linear_impl=te", "precision.fp8=blockwise")
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9.*A100 has 8.0: set precision.fp8=none"):
        precision.check_precision(c, torch.device("cuda"))
    # BF16 through TE needs no FP8 tensor cores.
    precision.check_precision(cfg("precision.linear_impl=te"), torch.device("cuda"))


def test_te_parameters_find_their_local_counterparts_by_their_marks():
    """The marks apply_transformer_engine leaves (real marking functions, on stand-in tensors: TE's
    modules need a GPU) lead each TE parameter back to the local backend's tensor it holds."""
    from megatron_ds.model.init import mark_expert_slice, mark_renamed

    local = {
        "layers.1.ffn.experts.w2": torch.randn(4, 3, 5),  # [experts, in, out]
        "layers.1.attn.q_norm.weight": torch.randn(3),
        "layers.1.attn.wq_a.weight": torch.randn(2, 3),
    }
    expert = torch.empty(5, 3)  # [out, in]: the second of this rank's two experts, expert 3 of 4
    mark_expert_slice(expert, "w2.weight1", "w2", 3, 4, 2)
    fused_norm = torch.empty(3)
    mark_renamed(fused_norm, "wq_b.layer_norm_weight", "q_norm.weight")
    plain = torch.empty(2, 3)
    assert torch.equal(
        local_counterpart("layers.1.ffn.experts.w2.weight1", expert, local),
        local["layers.1.ffn.experts.w2"][3].t(),
    )
    assert (
        local_counterpart("layers.1.attn.wq_b.layer_norm_weight", fused_norm, local)
        is (local["layers.1.attn.q_norm.weight"])
    )
    assert local_counterpart("layers.1.attn.wq_a.weight", plain, local) is local["layers.1.attn.wq_a.weight"]


def test_fp8_recipe_names():
    assert precision.fp8_recipe("none") is None
    with pytest.raises(ConfigError, match="choose none, blockwise"):
        precision.fp8_recipe("mxfp8")


def test_fp8_weight_cache_flags_the_first_forward_of_each_step_only(monkeypatch):
    """The hook logic of FP8WeightCache, on stand-ins for TE's projections (TE runs on GPUs only; the
    real layers are checked on the H200 by tests/gpu/test_te_backend.py): True in a layer's first
    forward of a step, False after, nothing outside a step or in a step of one micro-batch."""
    import sys
    import types

    class Projection(torch.nn.Module):
        def forward(self, x, is_first_microbatch=None):
            self.seen.append(is_first_microbatch)
            return x

    te = types.SimpleNamespace(Linear=Projection, LayerNormLinear=Projection, GroupedLinear=Projection)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(pytorch=te))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    from parallel.transformer_engine import FP8WeightCache

    model = torch.nn.Sequential(Projection(), torch.nn.Identity(), Projection())
    for layer in (model[0], model[2]):
        layer.seen = []
    cache = FP8WeightCache(model)
    x = torch.zeros(1)
    with cache.step(n_micro=2):
        model(x)
        model(x)
    model(x)  # outside a step: TE quantizes as usual
    with cache.step(n_micro=1):
        model(x)
    with cache.step(n_micro=3):
        model(x)
    assert model[0].seen == model[2].seen == [True, False, None, None, True]
