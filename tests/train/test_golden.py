"""The `tiny` preset's loss curve under a fixed seed, against the checked-in golden values.

A change that should not move numerics must reproduce these losses. After a change that
should (and says so), regenerate with: MDS_UPDATE_GOLDEN=1 pytest tests/train/test_golden.py
"""

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from conftest import loss_curve, mds_train

GOLDEN = Path(__file__).parent / "golden" / "tiny_seed1234.json"
STEPS = 8


def test_tiny_loss_curve_matches_golden(train_dataset, tmp_path):
    result = mds_train(tmp_path, train_dataset, f"train.steps={STEPS}", "train.seed=1234")
    assert result.returncode == 0, result.stdout + result.stderr
    curve = {str(step): loss for step, loss in sorted(loss_curve(tmp_path).items())}
    if os.environ.get("MDS_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({
            "python": platform.python_version(), "torch": torch.__version__, "steps": STEPS, "loss": curve,
        }, indent=2) + "\n")  # fmt: skip
    golden = json.loads(GOLDEN.read_text())
    if golden["python"] != platform.python_version():
        pytest.skip(f"golden curve made on the stdlib of Python {golden['python']}; data differs here")
    assert curve.keys() == golden["loss"].keys()
    for step, loss in golden["loss"].items():
        assert curve[step] == pytest.approx(loss, rel=1e-5), f"step {step}"
    assert curve[str(STEPS)] < curve["1"]  # and it learns
