"""`mds tokenizer` and `mds preprocess`: the data pipeline's commands."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data pipeline's subcommands to the `mds` parser."""
    tokenizer = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tokenizer.add_subparsers(dest="tokenizer_command", required=True).add_parser("train")
    subparsers.add_parser("preprocess", help="tokenize a corpus into webdataset shards")
