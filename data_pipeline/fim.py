"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle").

DeepSeek-V3 (report section 4.1) applies FIM to 10% of documents in Prefix-Suffix-Middle order:
    <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
The Suffix-Prefix-Middle variant (the paper's SPM, as in Megatron-LM) is:
    <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle
The document is cut at two uniformly random *character* positions, so the model learns to fill
holes that start mid-token, as a cursor in an editor does. Re-tokenizing whole pieces would cost
as much as preprocessing; instead each piece keeps the document's own tokens and only the few bytes
around a cut are re-encoded. Every piece still decodes to exactly its text.
"""

import random

import numpy as np

from data_pipeline.tokenizer import Tokenizer


def apply_fim(
    ids: np.ndarray, tokenizer: Tokenizer, rng: random.Random, rate: float, spm_rate: float
) -> np.ndarray:
    """Return `ids` unchanged with probability 1 - rate, else as a PSM or SPM sample."""
    if rate == 0.0 or rng.random() >= rate:
        return ids
    pieces = _TokenSpans(ids, tokenizer)
    lo, hi = sorted((rng.randint(0, len(pieces.text)), rng.randint(0, len(pieces.text))))
    lo, hi = pieces.byte_offset(lo), pieces.byte_offset(hi)
    prefix, middle, suffix = pieces.span(0, lo), pieces.span(lo, hi), pieces.span(hi, len(pieces.data))
    prefix_id, suffix_id, middle_id = tokenizer.fim_ids
    if rng.random() < spm_rate:
        parts = [[prefix_id, suffix_id], suffix, [middle_id], prefix, middle]
    else:
        parts = [[prefix_id], prefix, [suffix_id], suffix, [middle_id], middle]
    return np.concatenate([np.asarray(p, dtype=ids.dtype) for p in parts])


class _TokenSpans:
    """A document's bytes with each token's byte range, to cut it at any character."""

    def __init__(self, ids: np.ndarray, tokenizer: Tokenizer):
        table = tokenizer.token_bytes
        pieces = [table[i] for i in ids.tolist()]
        self.ids, self.tokenizer = ids, tokenizer
        self.data = b"".join(pieces)
        self.text = self.data.decode("utf-8")
        self.ends = np.cumsum([len(p) for p in pieces])
        self.starts = self.ends - np.asarray([len(p) for p in pieces])

    def byte_offset(self, char: int) -> int:
        if len(self.text) == len(self.data):  # ASCII: characters are bytes
            return char
        return len(self.text[:char].encode("utf-8"))

    def _is_char_start(self, offset: int) -> bool:
        return offset >= len(self.data) or self.data[offset] & 0xC0 != 0x80

    def span(self, first: int, last: int) -> list[int]:
        """Tokens for bytes [first, last): the whole tokens inside, plus re-encoded partial ends."""
        inner_first = int(np.searchsorted(self.starts, first, side="left"))  # first token starting inside
        inner_last = int(np.searchsorted(self.ends, last, side="right"))  # one past the last ending inside
        # A token may start or end inside a multi-byte character: re-encode up to whole characters.
        while inner_first < inner_last and not self._is_char_start(int(self.starts[inner_first])):
            inner_first += 1
        while inner_last > inner_first and not self._is_char_start(int(self.ends[inner_last - 1])):
            inner_last -= 1
        if inner_first >= inner_last:
            return self._encode(first, last)
        head = self._encode(first, int(self.starts[inner_first]))
        tail = self._encode(int(self.ends[inner_last - 1]), last)
        return head + self.ids[inner_first:inner_last].tolist() + tail

    def _encode(self, first: int, last: int) -> list[int]:
        return self.tokenizer.encode(self.data[first:last].decode("utf-8")) if last > first else []
