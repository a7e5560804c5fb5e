"""Single-process checkpoint behaviour: exact round trip, atomicity under SIGKILL, retention, clear
errors for damaged or mismatched checkpoints, refusal of malicious pickles, asynchronous saves."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from megatron_ds.checkpoint import Checkpointer, CheckpointError, model_tensors
from megatron_ds.config import CheckpointConfig


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(6, 4, generator=g),
        "model.b": torch.randn(4, generator=g).bfloat16(),
        "model.layers.1.ffn.gate.bias": torch.randn(8, generator=g),
        "optim.w.exp_avg": torch.randn(6, 4, generator=g),
        "optim.step": torch.tensor(float(seed)),
    }


def config(model_dim: int = 8) -> dict:
    return {"model": {"dim": model_dim, "n_layers": 2}, "train": {"lr": 1e-3}}


def assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]


def save(directory: Path, step: int, seed: int = 0, **cfg) -> Checkpointer:
    ckpt = Checkpointer(directory, CheckpointConfig(**cfg))
    ckpt.save(step, tensors(seed), {"config": config(), "counters": {"tokens": step * 10}})
    ckpt.wait()
    return ckpt


def test_round_trip_is_exact_and_returns_extra(tmp_path):
    ckpt = save(tmp_path, 3, seed=5)
    assert ckpt.latest() == tmp_path / "step_00000003"
    target = tensors(seed=9)
    extra = ckpt.load(ckpt.latest(), target, config())
    assert_equal(target, tensors(seed=5))
    assert extra == {"config": config(), "counters": {"tokens": 30}}
    # A run directory or the checkpoints folder resolve through `latest` as well.
    Checkpointer(tmp_path, CheckpointConfig()).load(tmp_path, tensors(1), None)


def test_model_tensors_are_the_parameters_and_persistent_buffers():
    model = nn.Linear(3, 2)
    model.register_buffer("bias_b", torch.zeros(2))
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    got = model_tensors(model)
    assert set(got) == {"model.weight", "model.bias", "model.bias_b"}
    assert got["model.weight"] is model.weight


def test_extra_state_is_not_saved():
    """Transformer Engine's modules return their FP8 scaling history as extra state, a fresh tensor
    that a load in place could not restore; it stays out of checkpoints."""

    class WithExtraState(nn.Linear):
        def get_extra_state(self):
            return torch.zeros(3, dtype=torch.uint8)

        def set_extra_state(self, state):
            pass

    assert list(model_tensors(WithExtraState(2, 2, bias=False))) == ["model.weight"]


def test_loads_in_place_into_parameters(tmp_path):
    model = nn.Linear(3, 2)
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.save(1, model_tensors(model), {})
    want = {k: v.detach().clone() for k, v in model_tensors(model).items()}
    with torch.no_grad():
        model.weight.zero_()
    ckpt.load(ckpt.latest(), model_tensors(model), None)
    assert torch.equal(model.weight.detach(), want["model.weight"])


def test_keep_last_deletes_older_checkpoints_after_a_save(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_last=2))
    for step in (10, 20, 30, 40):
        ckpt.save(step, tensors(step), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000030", "step_00000040"]
    assert ckpt.latest().name == "step_00000040"


def test_due_by_steps_and_by_minutes(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=5, save_interval_minutes=0))
    assert [s for s in range(1, 12) if ckpt.due(s)] == [5, 10]
    ckpt = Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=0, save_interval_minutes=0.002))
    assert not ckpt.due(1)
    time.sleep(0.15)
    assert ckpt.due(2)
    ckpt.save(2, tensors(), {})
    assert not ckpt.due(2) and not ckpt.due(3)


def test_config_mismatch_names_the_fields(tmp_path):
    ckpt = save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"model\.dim: checkpoint 8, this run 16"):
        ckpt.load(ckpt.latest(), tensors(), config(model_dim=16))
    other = config()
    other["train"]["lr"] = 1.0  # only the model has to match
    ckpt.load(ckpt.latest(), tensors(), other)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    ckpt = save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. model.extra"):
        ckpt.load(ckpt.latest(), {**tensors(), "model.extra": torch.zeros(2)}, None)
    with pytest.raises(CheckpointError, match=r"model.w: checkpoint \(6, 4\), model \(3, 4\)"):
        ckpt.load(ckpt.latest(), {**tensors(), "model.w": torch.zeros(3, 4)}, None)


def te_style_experts(n_experts: int, d_in: int, d_out: int) -> nn.Module:
    """Routed experts laid out as TE's GroupedLinear keeps them: w1.weight<e> of [out, in], marked as
    slices of the local backend's stacked w1 ([experts, in, out])."""
    from megatron_ds.model.init import mark_expert_slice

    experts = nn.Module()
    experts.w1 = nn.Module()
    for e in range(n_experts):
        weight = nn.Parameter(torch.randn(d_out, d_in))
        mark_expert_slice(weight, f"w1.weight{e}", "w1", e, n_experts, n_experts)
        experts.w1.register_parameter(f"weight{e}", weight)
    return experts


def test_expert_slices_save_as_the_stacked_tensor_and_load_from_it(tmp_path):
    te = te_style_experts(3, 4, 5)
    assert list(model_tensors(te)) == ["model.w1#0", "model.w1#1", "model.w1#2"]
    local = nn.Module()
    local.w1 = nn.Parameter(torch.zeros(3, 4, 5))
    ckpt = Checkpointer(tmp_path / "te", CheckpointConfig())
    ckpt.save(1, model_tensors(te), {})
    ckpt.wait()
    ckpt.load(ckpt.latest(), model_tensors(local), None)
    assert torch.equal(local.w1, torch.stack([te.w1.get_parameter(f"weight{e}").t() for e in range(3)]))
    other = te_style_experts(3, 4, 5)
    ckpt.load(ckpt.latest(), model_tensors(other), None)  # and back into slices
    assert all(
        torch.equal(other.w1.get_parameter(f"weight{e}"), te.w1.get_parameter(f"weight{e}")) for e in range(3)
    )


def test_optimizer_state_of_expert_slices_loads_as_the_stacked_parameters(tmp_path):
    """Our ZeRO-1 AdamW keeps a slice's moments shaped and marked like the slice."""
    from megatron_ds.config import load_config
    from megatron_ds.optim import ZeroAdamW

    cfg = load_config("tiny")
    te = te_style_experts(3, 4, 5)
    for p in te.parameters():
        p.grad = torch.randn_like(p)
    adamw = ZeroAdamW(te, cfg, lambda p: None)
    adamw.step(1e-3)
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.save(1, {**model_tensors(te), **adamw.state_tensors()}, {})
    ckpt.wait()
    local = nn.Module()
    local.w1 = nn.Parameter(torch.zeros(3, 4, 5))
    stacked = ZeroAdamW(local, cfg, lambda p: None)
    ckpt.load(ckpt.latest(), {**model_tensors(local), **stacked.state_tensors()}, None)
    for slot in ("exp_avg", "exp_avg_sq"):
        want = torch.stack([adamw.state[f"w1.weight{e}"][slot].t() for e in range(3)])
        assert torch.equal(stacked.state["w1"][slot], want), slot


def test_a_renamed_parameter_is_saved_under_the_local_backends_name(tmp_path):
    """TE's fused norm + linear holds q_norm's weight as wq_b.layer_norm_weight; checkpoints say q_norm."""
    from megatron_ds.model.init import mark_renamed

    te, local = nn.Module(), nn.Module()
    te.wq_b, local.q_norm = nn.Module(), nn.Module()
    te.wq_b.layer_norm_weight = nn.Parameter(torch.randn(4))
    local.q_norm.weight = nn.Parameter(torch.zeros(4))
    mark_renamed(te.wq_b.layer_norm_weight, "wq_b.layer_norm_weight", "q_norm.weight")
    assert list(model_tensors(te)) == ["model.q_norm.weight"]
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.save(1, model_tensors(te), {})
    ckpt.wait()
    ckpt.load(ckpt.latest(), model_tensors(local), None)
    assert torch.equal(local.q_norm.weight, te.wq_b.layer_norm_weight)


def test_damaged_checkpoints_fail_with_the_path_and_what_to_do(tmp_path):
    ckpt = save(tmp_path, 1)
    path = ckpt.latest()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'} does not exist"):
        ckpt.load(tmp_path / "nowhere", tensors(), None)
    data = next(path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=f"{path} is damaged: {data.name} has 100 bytes.*earlier checkpoint"
    ):
        ckpt.load(path, tensors(), None)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=f"{path / '.metadata'} cannot be read safely"):
        ckpt.load(path, tensors(), None)
    (path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=f"{path} is not a complete checkpoint: .metadata is missing"):
        ckpt.load(path, tensors(), None)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is damaged"):
        ckpt.load(path, tensors(), None)
    (tmp_path / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000099', which is not a complete"):
        ckpt.latest()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_metadata_pickle_is_refused(tmp_path):
    ckpt = save(tmp_path / "ckpt", 1)
    marker = tmp_path / "pwned"
    (ckpt.latest() / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        ckpt.load(ckpt.latest(), tensors(), None)
    assert not marker.exists()


_KILLED_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import torch.distributed.checkpoint.filesystem as fs
    import megatron_ds.checkpoint.checkpointer as cp
    from megatron_ds.config import CheckpointConfig

    directory, phase = Path(sys.argv[1]), sys.argv[2]
    ckpt = cp.Checkpointer(directory, CheckpointConfig())
    ckpt.save(1, {"model.w": torch.ones(4)}, {"ok": 1})

    def hang(*args, **kwargs):
        (directory.parent / "hanging").write_text("")
        time.sleep(600)

    if phase == "data":  # killed while the tensor data is being written
        write_item = fs._write_item
        fs._write_item = lambda *a, **k: (write_item(*a, **k), hang())
    else:  # killed after the rename, before `latest` moves
        write_atomic = cp._write_atomic
        cp._write_atomic = lambda path, text: hang() if path.name == "latest" else write_atomic(path, text)
    ckpt.save(2, {"model.w": torch.full((4,), 2.0), "model.big": torch.zeros(4_000_000)}, {"ok": 2})
    """
)


@pytest.mark.parametrize("phase", ["data", "pointer"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_latest(tmp_path, phase):
    directory = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(directory), phase])
    deadline = time.monotonic() + 120
    while not (tmp_path / "hanging").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the saving process did not reach the hook"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = Checkpointer(directory, CheckpointConfig())
    assert ckpt.latest() == directory / "step_00000001"
    target = {"model.w": torch.zeros(4)}
    assert ckpt.load(ckpt.latest(), target, None) == {"ok": 1}
    assert torch.equal(target["model.w"], torch.ones(4))
    assert not list(directory.glob(".tmp-*")), "a new Checkpointer removes the killed save's leftovers"


def test_async_save_snapshots_and_equals_a_blocking_save(tmp_path):
    live = tensors(seed=3)
    blocking = Checkpointer(tmp_path / "blocking", CheckpointConfig())
    background = Checkpointer(tmp_path / "async", CheckpointConfig(async_save=True))
    blocking.save(7, live, {"n": 1})
    background.save(7, live, {"n": 1})
    for t in live.values():  # the next training step changes the tensors while the write runs
        t.add_(1)
    background.wait()
    from_blocking, from_async = tensors(seed=0), tensors(seed=1)
    assert blocking.load(blocking.latest(), from_blocking, None) == {"n": 1}
    assert background.load(background.latest(), from_async, None) == {"n": 1}
    assert_equal(from_async, from_blocking)
    assert_equal(from_async, tensors(seed=3))
    state = json.loads((background.latest() / "state.json").read_text())
    assert state["step"] == 7 and state["extra"] == {"n": 1}
