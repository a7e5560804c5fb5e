"""`mds export-hf` / `mds import-hf` through the CLI: a checkpoint goes to Hugging Face safetensors and
back unchanged, and an imported run directory loads into a model with a fresh optimizer."""

import json

import pytest
import torch

from megatron_ds.checkpoint import Checkpointer, CheckpointError, model_tensors
from megatron_ds.cli import main
from megatron_ds.commands.hf import parse_size
from megatron_ds.config import config_to_dict, load_config
from parallel.parallelize import ModelGroups, build_model


def tiny(*overrides: str):
    return load_config("tiny", overrides=["model.n_layers=2", "model.vocab_size=1024", *overrides])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cfg = tiny()
    model = build_model(cfg, "cpu", ModelGroups())
    ckpt = Checkpointer(root / "run" / "checkpoints", cfg.checkpoint)
    ckpt.save(3, model_tensors(model), {"config": config_to_dict(cfg), "train_state": {"step": 3}})
    assert main(["export-hf", str(root / "run"), str(root / "hf"), "--max-shard-size", "200KB"]) == 0
    return root, {k: v.detach().clone() for k, v in model_tensors(model).items()}


def test_export_writes_sharded_safetensors_and_config(exported):
    root, _ = exported
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((root / "hf" / s).is_file() for s in shards)
    assert "model.layers.2.eh_proj.weight" in index["weight_map"], "MTP is exported as the extra layer"
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2


def test_import_round_trips_and_starts_a_fresh_optimizer(exported):
    root, want = exported
    assert main(["import-hf", str(root / "hf"), str(root / "run2"), "--preset", "tiny"]) == 0
    assert (root / "run2" / "checkpoints" / "latest").read_text().strip() == "step_00000000"
    cfg = load_config(config_file=root / "run2" / "config.yaml")  # what `mds train --config` would use
    model = build_model(tiny("train.seed=99", "precision.params_dtype=bf16"), "cpu", ModelGroups())
    tensors = model_tensors(model)
    name = "layers.1.attn.wo.weight"
    fresh = {"optim.step": torch.zeros(()), f"optim.{name}.exp_avg": torch.zeros(128, 128),
             f"optim.{name}.master": torch.full((128, 128), 5.0)}  # fmt: skip
    extra = Checkpointer(root / "run2" / "checkpoints", cfg.checkpoint).load(
        root / "run2", {**tensors, **fresh}, config_to_dict(cfg)
    )
    assert extra["train_state"] == {} and extra["config"]["model"] == config_to_dict(cfg)["model"]
    assert all(torch.equal(tensors[k], want[k].to(tensors[k].dtype)) for k in want)  # router stays fp32
    assert torch.equal(fresh[f"optim.{name}.master"], tensors[f"model.{name}"].float())
    assert not fresh[f"optim.{name}.exp_avg"].any() and fresh["optim.step"] == 0


def test_import_refuses_a_run_that_has_checkpoints_and_a_mismatched_model(exported, capsys):
    root, _ = exported
    assert main(["import-hf", str(root / "hf"), str(root / "run"), "--preset", "tiny"]) == 1
    assert "already has checkpoints" in capsys.readouterr().err
    assert main(["import-hf", str(root / "hf"), str(root / "run3"), "model.dim=64", "--preset", "tiny"]) == 1
    assert "does not fit the configured model" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        from megatron_ds.commands.hf import export_hf

        export_hf(root / "missing", root / "out", 1)


def test_sizes_follow_hugging_face_units():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
    with pytest.raises(ValueError, match="5GB or 500MiB"):
        parse_size("lots")
