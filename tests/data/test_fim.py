"""Fill-in-the-middle: samples decode back to the document, and the observed rates match the config."""

import random

import numpy as np
import pytest
from data_helpers import STDLIB, take
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from data_pipeline import DataConfig, load_tokenizer
from data_pipeline.fim import apply_fim
from data_pipeline.tokenizer import EOS


def reassemble(sample: list[int], tok) -> str:
    """The document text a PSM or SPM sample encodes."""
    pre, suf, mid = tok.fim_ids
    assert sample[0] == pre and sample.count(suf) == 1 and sample.count(mid) == 1
    if sample[1] == suf:  # SPM: PRE SUF suffix MID prefix middle
        suffix, rest = sample[2 : sample.index(mid)], sample[sample.index(mid) + 1 :]
        return tok.decode(rest) + tok.decode(suffix)  # prefix + middle were tokenized apart, decode joined
    prefix = sample[1 : sample.index(suf)]
    suffix = sample[sample.index(suf) + 1 : sample.index(mid)]
    middle = sample[sample.index(mid) + 1 :]
    return tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix)


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_fim_sample_decodes_to_the_document(spm_rate):
    tok = load_tokenizer(None)
    small = [p for p in sorted(STDLIB.glob("*.py")) if p.stat().st_size < 20000][:30]
    for i, path in enumerate(small):
        text = path.read_text(errors="replace")
        ids = np.asarray(tok.encode(text), dtype=np.uint16)
        sample = apply_fim(ids, tok, random.Random(i), rate=1.0, spm_rate=spm_rate).tolist()
        assert (sample[1] == tok.fim_ids[1]) == (spm_rate == 1.0)
        assert reassemble(sample, tok) == text


def test_observed_fim_and_spm_rates_match_the_config(tiny_dataset):
    tok = load_tokenizer(None)
    cfg = DataConfig(paths=[str(tiny_dataset)], num_streams=4, fim_rate=0.1, fim_spm_rate=0.5)
    batches, _ = take(cfg, 500, seq_len=512, mbs=4)  # ~1M tokens: some 2700 documents over many epochs
    tokens = np.concatenate([b["tokens"][:, :-1].reshape(-1).numpy() for b in batches])
    documents = int((tokens == tok.eos_id).sum())
    fim = int((tokens == tok.fim_ids[0]).sum())
    spm = int(((tokens[:-1] == tok.fim_ids[0]) & (tokens[1:] == tok.fim_ids[1])).sum())
    assert documents > 2500
    assert abs(fim / documents - 0.1) < 0.025
    assert abs(spm / fim - 0.5) < 0.15


def test_tokenizer_without_fim_tokens_loads_without_fim(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens([EOS])
    hf.save(str(tmp_path / "t.json"))
    assert load_tokenizer(tmp_path / "t.json").fim_ids is None
