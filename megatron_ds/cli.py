"""The `mds` command line: one program, one subcommand per job.

Each subcommand lives in the module that owns its concern and exposes
`register(subparsers)`, which adds its parser and sets `func`.
"""

import argparse
import importlib
import sys
import warnings

# Megatron-Core warns at import, once per module, that Transformer Engine and Apex are missing.
# That is the normal CPU set-up; what a run really needs is checked by megatron_ds.precision.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

# Modules that provide subcommands, in the order `mds --help` lists them.
COMMAND_MODULES = [
    "megatron_ds.commands.params",
    "megatron_ds.commands.train",
    "megatron_ds.commands.hf",
    "data_pipeline.cli",
    "megatron_ds.jobs.submit",
    "megatron_ds.jobs.sweep",
    "megatron_ds.jobs.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mds", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input (configuration, data, checkpoint, environment): their message
    already says what is wrong and what to do, so it is printed instead of a traceback."""
    from data_pipeline.inputs import UnreadableInput
    from data_pipeline.shards import CorruptShard
    from megatron_ds.checkpoint import CheckpointError
    from megatron_ds.jobs.submit import SubmitError
    from parallel.launcher import LaunchError

    return (
        ValueError,
        FileNotFoundError,
        CheckpointError,
        LaunchError,
        SubmitError,
        CorruptShard,
        UnreadableInput,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except _user_errors() as e:
        print(f"mds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
