"""A checkpoint trained with expert parallelism, exported to HF, gives the same logits in transformers."""

import json
import subprocess
import sys

import torch
from conftest import mds_train

from megatron_ds.checkpoint import Checkpointer, model_tensors
from megatron_ds.commands.hf import export_config
from parallel.parallelize import ModelGroups, build_model


def test_exported_checkpoint_loads_in_transformers_with_the_same_logits(train_dataset, tmp_path):
    run = tmp_path / "run"
    trained = mds_train(run, train_dataset, "train.steps=2", "parallel.expert=2")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    checkpoint = run / "checkpoints" / "step_00000002"
    out = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "megatron_ds.cli", "export-hf", str(checkpoint), str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr

    saved = json.loads((checkpoint / "state.json").read_text())["extra"]["config"]
    cfg = export_config(saved)
    ours = build_model(cfg, "cpu", ModelGroups())
    Checkpointer(checkpoint.parent, cfg.checkpoint).load(checkpoint, model_tensors(ours), None)
    assert ours.layers["1"].ffn.gate.bias.abs().sum() > 0  # trained biases travel too

    from transformers import DeepseekV3ForCausalLM

    theirs = DeepseekV3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ours.eval()
    with torch.no_grad():
        expected = ours(tokens)
        got = theirs(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
