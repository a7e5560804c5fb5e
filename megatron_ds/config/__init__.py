"""Typed configuration: schema, presets, command-line overrides and validation."""

from megatron_ds.config.load import config_to_dict, config_to_yaml, load_config, parse_overrides, preset_names
from megatron_ds.config.schema import (
    CheckpointConfig,
    Config,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)
from megatron_ds.config.validate import ConfigError, validate, validate_world

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "TrainConfig",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "parse_overrides",
    "preset_names",
    "validate",
    "validate_world",
]
