"""Build a `Config` from a preset, an optional YAML file and dotted command-line overrides.

Later sources win: preset < config file < overrides. Unknown keys and values of the
wrong type are errors that name the key, so a typo never silently trains the default.
"""

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path

import yaml

from megatron_ds.config.schema import Config
from megatron_ds.config.validate import ConfigError, validate


def preset_names() -> list[str]:
    files = resources.files("megatron_ds") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def _preset_dict(name: str) -> dict:
    path = resources.files("megatron_ds") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(preset_names())}")
    return yaml.safe_load(path.read_text()) or {}


def _coerce(value, annotation, key: str):
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _coerce(value, non_none[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not isinstance(number, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if annotation is int:
            if float(number) != int(number):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return int(number)
        return float(number)
    if annotation is str:
        return "" if value is None else str(value)
    return value


def _merge(target, values: dict, prefix: str = "") -> None:
    """Write a nested dict of values into a dataclass tree, checking every key."""
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'; valid keys here: {', '.join(fields)}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {type(current).__name__} fields")
            _merge(current, value, f"{key}.")
        elif isinstance(value, dict):
            raise ConfigError(f"{key} is a field, not a section: give it a value, not the mapping {value!r}")
        else:
            setattr(target, name, _coerce(value, hints[name], key))


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['model.dim=256', 'train.lr=1e-3'] into a nested dict."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.field=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    check: bool = True,
) -> Config:
    cfg = Config()
    if preset:
        _merge(cfg, _preset_dict(preset))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        _merge(cfg, yaml.safe_load(path.read_text()) or {})
    if overrides:
        _merge(cfg, parse_overrides(overrides))
    if check:
        validate(cfg)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
