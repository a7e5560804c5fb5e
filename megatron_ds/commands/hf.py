"""`mds export-hf` and `mds import-hf`: move weights between our checkpoints and Hugging Face's layout.

Export loads a (possibly sharded) checkpoint into one full model in this process and writes
safetensors shards and config.json in the DeepSeek-V3 layout (MTP as the extra layer). Import
turns such a directory into RUN_DIR/checkpoints/step_00000000 holding the model weights only, so
`mds train` starts from them with a fresh optimizer and step 0.
"""

import dataclasses
import re
import sys
from pathlib import Path

import torch

from megatron_ds.checkpoint import Checkpointer, CheckpointError, model_tensors, resolve_checkpoint
from megatron_ds.checkpoint.checkpointer import LATEST, read_state
from megatron_ds.config import (
    Config,
    ConfigError,
    ModelConfig,
    PrecisionConfig,
    config_to_dict,
    config_to_yaml,
    load_config,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (Hugging Face's convention)."""
    match = _SIZE.match(text)
    if match is None or (match.group(2) or "").upper() not in _UNITS:
        raise ValueError(
            f"size {text!r} is not a number of bytes with an optional unit such as 5GB or 500MiB"
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def register(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="write a checkpoint as Hugging Face DeepSeek-V3 safetensors")
    p.add_argument("checkpoint", help="a step_* directory, a checkpoints folder or a run directory")
    p.add_argument("out", help="output directory for config.json and the safetensors shards")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.set_defaults(func=run_export)
    p = subparsers.add_parser("import-hf", help="start a run directory from Hugging Face DeepSeek-V3 weights")
    p.add_argument("hf_dir", help="directory with config.json and safetensors")
    p.add_argument("run_dir", help="run directory to create RUN_DIR/checkpoints/step_00000000 in")
    p.add_argument("--preset", help="preset for everything but the model (default: the built-in defaults)")
    p.add_argument("--config", help="YAML file applied over the preset")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 parallel.tensor=2")
    p.set_defaults(func=run_import)


def export_config(saved: dict) -> Config:
    """The single-process, unsharded build of the model a checkpoint's resolved config describes."""
    try:
        model = ModelConfig(**saved["model"])
        precision = PrecisionConfig(**saved.get("precision", {}))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's config has no usable model section ({e})") from None
    precision.linear_impl, precision.fp8 = "local", "none"  # checkpoints hold the local backend's names
    return Config(model=model, precision=precision)


def export_hf(checkpoint: str | Path, out: str | Path, max_shard_bytes: int) -> Path:
    from megatron_ds.checkpoint.hf import save_hf
    from parallel.parallelize import ModelGroups, build_model

    path = resolve_checkpoint(checkpoint)
    extra = read_state(path)["extra"]
    if "config" not in extra:
        raise CheckpointError(f"checkpoint {path} does not record its config; cannot rebuild the model")
    cfg = export_config(extra["config"])
    model = build_model(cfg, "cpu", ModelGroups())
    tensors = model_tensors(model)
    Checkpointer(path.parent, cfg.checkpoint).load(path, tensors, None)
    state = {name.removeprefix("model."): t.detach() for name, t in tensors.items()}
    return save_hf(state, cfg.model, out, max_shard_bytes)


def import_hf(hf_dir: str | Path, run_dir: str | Path, preset=None, config_file=None, overrides=()) -> Path:
    from megatron_ds.checkpoint.hf import load_hf
    from megatron_ds.model.transformer import Transformer

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; pass a Hugging Face model directory")
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / LATEST).exists():
        raise CheckpointError(f"{checkpoints} already has checkpoints; import into a new run directory")
    model_cfg, weights = load_hf(hf_dir)
    model_overrides = [f"model.{k}={v}" for k, v in dataclasses.asdict(model_cfg).items()]
    cfg = load_config(preset, config_file, model_overrides + list(overrides))
    with torch.device("meta"):
        expected = {n.removeprefix("model."): t for n, t in model_tensors(Transformer(cfg.model)).items()}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [f"{n}: {tuple(weights[n].shape)} vs {tuple(t.shape)}" for n, t in expected.items()
             if n in weights and weights[n].shape != t.shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{hf_dir} does not fit the configured model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}"
        )
    ckpt = Checkpointer(checkpoints, cfg.checkpoint)
    extra = {"train_state": {}, "data": None, "config": config_to_dict(cfg), "imported_from": str(hf_dir)}
    ckpt.save(0, {f"model.{n}": weights[n] for n in expected}, extra)
    ckpt.wait()
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return ckpt.latest()


def run_export(args) -> int:
    try:
        out = export_hf(args.checkpoint, args.out, parse_size(args.max_shard_size))
    except (CheckpointError, ValueError) as e:
        print(f"mds export-hf: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def run_import(args) -> int:
    try:
        path = import_hf(args.hf_dir, args.run_dir, args.preset, args.config, args.overrides)
    except (CheckpointError, ConfigError, KeyError, ValueError) as e:
        print(f"mds import-hf: {e}", file=sys.stderr)
        return 1
    run_dir = Path(args.run_dir)
    print(
        f"wrote {path}\nstart training with: mds train --run-dir {run_dir} --config {run_dir / 'config.yaml'}"
    )
    return 0
