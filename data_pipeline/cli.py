"""`mds tokenizer train` and `mds preprocess`: the data pipeline's commands."""

import argparse
import sys
from pathlib import Path

from data_pipeline.inputs import InputPolicy, ReadReport, expand_inputs, read_documents
from data_pipeline.preprocess import PreprocessConfig, format_summary, preprocess
from data_pipeline.tokenizer import train_tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data pipeline's subcommands to the `mds` parser."""
    tokenizer = subparsers.add_parser("tokenizer", help="byte-level BPE tokenizers")
    train = tokenizer.add_subparsers(dest="tokenizer_command", required=True).add_parser(
        "train", help="train a byte-level BPE tokenizer on a corpus"
    )
    _add_input_arguments(train)
    train.add_argument("--output", required=True, type=Path, help="tokenizer.json to write")
    train.add_argument("--vocab-size", type=int, default=8192, help="total ids, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2, help="least frequent pair that may merge")
    train.set_defaults(func=_train)

    prep = subparsers.add_parser("preprocess", help="tokenize a corpus into webdataset shards and a manifest")
    _add_input_arguments(prep)
    prep.add_argument("--output", required=True, help="dataset directory (created, or completed if resumed)")
    prep.add_argument("--tokenizer", help="tokenizer.json (default: the shipped 8192-id tokenizer)")
    prep.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size in MiB")
    prep.add_argument("--processes", type=int, default=1, help="tokenizing processes on this machine")
    prep.add_argument("--mpi", action="store_true", help="split the work over the MPI ranks (needs mpi4py)")
    prep.set_defaults(func=_preprocess)


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files or directories; JSONL, text, .gz and .zst")
    parser.add_argument("--pattern", default="**/*", help="glob for files inside input directories")
    parser.add_argument(
        "--exclude", action="append", default=[], help="glob of paths inside input directories to leave out"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument(
        "--invalid-utf8", choices=["replace", "skip"], default="replace", help="documents with invalid UTF-8"
    )
    parser.add_argument(
        "--on-unreadable", choices=["skip", "error"], default="skip", help="input files that cannot be read"
    )


def _policy(args: argparse.Namespace) -> InputPolicy:
    return InputPolicy(
        text_field=args.text_field, invalid_utf8=args.invalid_utf8, unreadable=args.on_unreadable
    )


def _train(args: argparse.Namespace) -> int:
    policy, report = _policy(args), ReadReport()
    texts = (
        doc.text
        for path in expand_inputs(args.inputs, args.pattern, tuple(args.exclude))
        for doc in read_documents(path, policy, report)
    )
    tok = train_tokenizer(texts, args.vocab_size, args.output, args.min_frequency)
    print(f"wrote {args.output}: {tok.vocab_size} ids, sha256 {tok.sha256}")
    for reason, count in sorted(report.counts.items()):
        print(f"skipped {count:,} {reason.replace('_', ' ')}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    config = PreprocessConfig(
        inputs=args.inputs,
        output=args.output,
        tokenizer=args.tokenizer,
        pattern=args.pattern,
        exclude=tuple(args.exclude),
        policy=_policy(args),
        shard_bytes=int(args.shard_size_mb * (1 << 20)),
        processes=args.processes,
        command=sys.argv,
    )
    if not args.mpi:
        print(format_summary(preprocess(config)))
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    result = preprocess(config, rank=comm.Get_rank(), world_size=comm.Get_size(), barrier=comm.Barrier)
    if comm.Get_rank() == 0:
        print(f"MPI ranks {comm.Get_size()}\n{format_summary(result)}")
    return 0
