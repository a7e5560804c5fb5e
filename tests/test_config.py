"""Configuration: presets, validation messages, override parsing, types and unknown keys."""

import dataclasses

import pytest

from megatron_ds.config import (
    ConfigError,
    ModelConfig,
    load_config,
    parse_overrides,
    preset_names,
    validate_world,
)


def test_every_preset_loads_and_validates():
    names = preset_names()
    assert {"tiny", "deepseek-v3-16b", "deepseek-v3-671b", "dsv3-slice", "dsv3-bench"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.model.n_layers > cfg.model.n_dense_layers


def test_671b_preset_is_the_schema_default():
    """The schema's defaults are DeepSeek-V3; the preset repeats them so it reads on its own."""
    assert load_config("deepseek-v3-671b").model == ModelConfig()


# Each invalid configuration (overrides on the tiny preset) and a fragment of its own message;
# every message names the field to change.
INVALID = {
    "heads vs tensor": (["parallel.tensor=3"], "model.n_heads=4 is not divisible by parallel.tensor=3"),
    "odd rope dim": (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim must be a positive even number"),
    "negative q rank": (["model.q_lora_rank=-1"], "model.q_lora_rank must be >= 0"),
    "dense layers": (["model.n_dense_layers=9"], "model.n_dense_layers=9 must lie in [0, model.n_layers=4]"),
    "negative mtp": (["model.mtp_depth=-1"], "model.mtp_depth must be >= 0"),
    "experts vs groups": (["model.n_routed_experts=18"], "not divisible by model.n_expert_groups=4"),
    "groups kept": (["model.n_limited_groups=5"], "model.n_limited_groups=5 must lie in [1"),
    "nodes kept": (["model.max_nodes_per_token=3"], "model.max_nodes_per_token=3 must lie in [1"),
    "unreachable top-k": (
        ["model.n_activated_experts=12"],
        "model.n_activated_experts=12 is larger than the 8",
    ),
    "context": (["model.max_seq_len=4096"], "model.max_seq_len=4096 exceeds what the position encoding"),
    "yarn scale": (["model.rope_factor=0.5", "model.max_seq_len=512"], "model.rope_factor must be >= 1"),
    "zero dim": (["model.dim=0"], "model.dim must be positive"),
    "experts vs expert parallel": (["parallel.expert=3"], "not divisible by parallel.expert=3"),
    "stage layers count": (["parallel.pipeline=2", "parallel.pipeline_layers=[4]"], "has 1 entries"),
    "stage layers sum": (["parallel.pipeline=2", "parallel.pipeline_layers=[2,1]"], "sums to 3"),
    "too many stages": (["parallel.pipeline=5"], "parallel.pipeline=5 stages for 4 layers"),
    "zero tensor": (["parallel.tensor=0"], "parallel.tensor must be >= 1"),
    "zero groups": (
        ["model.n_expert_groups=0"],
        "model.n_expert_groups (0) and model.n_expert_nodes (2) must be",
    ),
    "zero context": (["model.original_seq_len=0"], "model.original_seq_len must be positive"),
    "dtype": (["precision.params_dtype=fp16"], "precision.params_dtype='fp16': choose fp32 or bf16"),
    "fp8 without te": (["precision.fp8=blockwise"], "needs Transformer Engine: set precision.linear_impl=te"),
    "fp8 dispatch": (["precision.fp8_dispatch=true"], "precision.fp8_dispatch needs an FP8 recipe"),
    "deterministic": (
        ["train.deterministic=true", "precision.params_dtype=bf16"],
        "train.deterministic needs",
    ),
    "sequence": (["train.seq_len=2048"], "train.seq_len=2048 exceeds model.max_seq_len=1024"),
    "ramp start": (["train.batch_rampup_start=32"], "train.batch_rampup_start=32 exceeds"),
    "micro batch": (["train.global_batch_size=18"], "must be multiples of train.micro_batch_size=4"),
    "schedule": (["train.lr_schedule=linear"], "train.lr_schedule='linear': choose deepseek"),
    "min lr": (["train.min_lr=1.0"], "train.min_lr=1.0 must lie in [0, train.lr="),
    "beta2": (["train.beta2=1.0"], "train.beta2 must lie in [0, 1)"),
    "tails": (["train.final_lrs=[1e-5]"], "train.final_lrs and train.final_tokens must have the same length"),
    "keep last": (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1"),
    "gc interval": (["train.gc_interval=-1"], "train.gc_interval must be >= 0"),
    "cuda graphs of fp32": (
        ["train.cuda_graphs=true"],
        "train.cuda_graphs=true needs precision.params_dtype=bf16",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_configuration_fails_with_its_message(case):
    overrides, fragment = INVALID[case]
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides=overrides)
    message = str(excinfo.value)
    assert fragment in message, message
    field = overrides[0].split("=")[0]
    assert field in message or field.split(".")[-1] in message, f"message does not name {field}: {message}"


def test_invalid_messages_are_distinct():
    fragments = [fragment for _, fragment in INVALID.values()]
    assert len(set(fragments)) == len(fragments)
    # A fragment must not be found in the message of another case: each failure says its own thing.
    for case, (overrides, _) in INVALID.items():
        with pytest.raises(ConfigError) as excinfo:
            load_config("tiny", overrides=overrides)
        others = [f for c, (_, f) in INVALID.items() if c != case and f in str(excinfo.value)]
        assert not others or case == "yarn scale", (case, others)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides=["model.dim=0", "train.beta1=2", "checkpoint.keep_last=0"])
    message = str(excinfo.value)
    assert message.count("\n  - ") == 3
    assert "model.dim" in message and "train.beta1" in message and "checkpoint.keep_last" in message


def test_override_parsing():
    tree = parse_overrides(
        ["model.dim=256", "train.lr=1e-3", "parallel.pipeline_layers=[2, 2]", "data.x.y=a"]
    )
    assert tree == {
        "model": {"dim": 256},
        "train": {"lr": "1e-3"},  # YAML 1.1 reads 1e-3 as a string; the field's type converts it
        "parallel": {"pipeline_layers": [2, 2]},
        "data": {"x": {"y": "a"}},
    }
    cfg = load_config(
        "tiny",
        overrides=[
            "train.lr=1e-3",
            "train.final_lrs=1e-5,2e-6",
            "train.final_tokens=[1e9, 2e9]",
            "train.deterministic=on",
            "logging.tensorboard=no",
            "model.dim=2.56e2",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.final_lrs == [1e-5, 2e-6] and cfg.train.final_tokens == [1e9, 2e9]
    assert cfg.train.deterministic is True and cfg.logging.tensorboard is False
    assert cfg.model.dim == 256 and isinstance(cfg.model.dim, int)
    for bad in ("model.dim", "=3", "model.dim256"):
        with pytest.raises(ConfigError, match="must look like section.field=value"):
            parse_overrides([bad])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dim=abc", "model.dim: expected a number, got 'abc'"),
        ("model.dim=1.5", "model.dim: expected an integer, got 1.5"),
        ("model.dim=true", "model.dim: expected a number, got True"),
        ("train.deterministic=maybe", "train.deterministic: expected true or false, got 'maybe'"),
        ("train.final_lrs={a: 1}", "train.final_lrs is a field, not a section"),
        ("train.final_lrs=[1e-5, x]", "train.final_lrs[1]: expected a number"),
        ("model=3", "model: expected a mapping of ModelConfig fields"),
        ("train.lr=[1, 2]", "train.lr: expected a number, got [1, 2]"),
    ],
)
def test_type_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides=[override])
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dimm=4", "unknown key 'model.dimm'; valid keys here: vocab_size, dim,"),
        ("modle.dim=4", "unknown key 'modle'; valid keys here: model, parallel,"),
        ("train.lr.peak=1", "train.lr is a field, not a section"),
    ],
)
def test_unknown_keys_are_errors(override, message):
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides=[override])
    assert message in str(excinfo.value)


def test_sources_and_their_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  dim: 96\n  n_heads: 2\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config("tiny", path, ["model.dim=64"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.train.lr) == (64, 2, 1e-3)
    assert cfg.model.vocab_size == 8192  # from the preset
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'; choose one of: .*tiny"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  colour: blue\n")
    with pytest.raises(ConfigError, match="unknown key 'model.colour'"):
        load_config("tiny", tmp_path / "bad.yaml")
    # check=False loads without validating (for tools that inspect a broken file).
    assert load_config("tiny", overrides=["model.dim=0"], check=False).model.dim == 0


def test_validate_world():
    cfg = load_config("tiny", overrides=["parallel.tensor=2", "parallel.expert=4"])
    assert validate_world(cfg, 4) == 2  # data-parallel size
    with pytest.raises(
        ConfigError, match="world size 3 is not divisible by parallel.tensor x parallel.pipeline"
    ):
        validate_world(cfg, 3)
    with pytest.raises(ConfigError, match="parallel.expert=4 must divide tensor x data-parallel = 2"):
        validate_world(cfg, 2)
    big = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert=1))
    with pytest.raises(
        ConfigError, match="train.global_batch_size=8 is not a multiple of micro_batch_size x"
    ):
        validate_world(big, 2 * 8)


@pytest.mark.parametrize(
    "override, needed",
    [
        ("parallel.pipeline=2", "parallel.pipeline=1"),
        ("parallel.expert=2", "parallel.expert=1"),
        ("parallel.tensor=2", "parallel.tensor=1"),
        ("precision.fp8=delayed", "precision.fp8=none or blockwise"),
        ("train.optimizer_impl=zero1", "train.optimizer_impl=megatron or auto"),
    ],
)
def test_cuda_graphs_name_what_they_cannot_capture(override, needed):
    """Each layout or precision the captured step cannot replay is named, with the way out."""
    bf16 = ["train.cuda_graphs=true", "precision.params_dtype=bf16", "precision.linear_impl=te"]
    with pytest.raises(ConfigError) as excinfo:
        load_config("tiny", overrides=[*bf16, override])
    assert f"train.cuda_graphs=true needs {needed}; set those or train.cuda_graphs=false" in str(
        excinfo.value
    )
    load_config("tiny", overrides=[*bf16, "precision.fp8=blockwise"])  # what it can replay
