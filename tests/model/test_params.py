"""`mds params`: DeepSeek-V3's published sizes, counted on the model as built."""

import json

from megatron_ds.cli import main
from megatron_ds.config import load_config
from megatron_ds.model.size import parameter_counts


def test_671b_counts():
    c = parameter_counts(load_config("deepseek-v3-671b").model)
    assert 670.5e9 < c.main_total < 671.5e9  # "671B total"
    assert 36.5e9 < c.main_activated < 38e9  # "37B activated per token"
    # Hugging Face's 685B: the main model plus the MTP module with its copies of embedding and head.
    with_mtp = c.main_total + c.mtp_total + c.embedding + c.head
    assert 684e9 < with_mtp < 685.5e9
    assert c.embedding == c.head == 129280 * 7168
    # One MoE layer of 256 experts: the MTP module is a full MoE block plus its 2d -> d projection and norms.
    assert 11e9 < c.mtp_total < 12e9


def test_params_cli(capsys):
    assert main(["params", "--preset", "deepseek-v3-671b"]) == 0
    table = capsys.readouterr().out
    assert "671.03B" in table and "37.55B" in table and "684.49B" in table
    assert main(["params", "--preset", "tiny", "--json", "model.mtp_depth=0"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (
        counts["mtp_total"] == 0
        and counts["main_total"] == parameter_counts(load_config("tiny").model).main_total
    )
