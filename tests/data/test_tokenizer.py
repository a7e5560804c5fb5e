"""The shipped tokenizer, training with `mds tokenizer train`, and loading errors."""

import argparse

import pytest
from data_helpers import STDLIB, small_stdlib_files

from data_pipeline import load_tokenizer
from data_pipeline.cli import register
from data_pipeline.tokenizer import SPECIAL_TOKENS


def test_shipped_tokenizer_has_8192_ids_and_the_special_tokens():
    tok = load_tokenizer(None)
    assert tok.vocab_size == 8192 == tok.hf.get_vocab_size(with_added_tokens=True)
    assert max(tok.hf.get_vocab().values()) == 8191
    assert tok.fim_ids is not None and None not in (tok.bos_id, tok.pad_id)
    assert {tok.hf.id_to_token(i) for i in range(len(SPECIAL_TOKENS))} == set(SPECIAL_TOKENS)
    text = (STDLIB / "textwrap.py").read_text() + "naïve café ✓ \x00 \U0001f600"
    ids = tok.encode(text)
    assert max(ids) < 8192 and tok.decode(ids) == text
    assert len(ids) < len(text) / 3  # it has learned Python, not just bytes


def mds(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mds")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_mds_tokenizer_train(tmp_path):
    out = tmp_path / "tok.json"
    assert mds("tokenizer", "train", *small_stdlib_files(), "--vocab-size", "400", "--output", str(out)) == 0
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400 and tok.fim_ids is not None
    text = (STDLIB / "this.py").read_text()
    assert tok.decode(tok.encode(text)) == text


def test_too_large_vocabulary_for_the_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="lower --vocab-size"):
        mds(
            "tokenizer",
            "train",
            small_stdlib_files(1)[0],
            "--vocab-size",
            "50000",
            "--output",
            str(tmp_path / "t"),
        )


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
