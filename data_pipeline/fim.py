"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle").

DeepSeek-V3 (report section 4.1) applies FIM to 10% of documents in Prefix-Suffix-Middle order:
    <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
The Suffix-Prefix-Middle variant (the paper's SPM, as in Megatron-LM) is:
    <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle
The document is cut at two uniformly random *character* positions and each piece re-tokenized, so
the model learns to fill holes that start mid-token, as a cursor in an editor does.
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
    prefix_id, suffix_id, middle_id = tokenizer.fim_ids
    text = tokenizer.decode(ids)
    lo, hi = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    prefix, middle, suffix = (tokenizer.encode(piece) for piece in (text[:lo], text[lo:hi], text[hi:]))
    if rng.random() < spm_rate:
        pieces = [[prefix_id, suffix_id], suffix, [middle_id], prefix, middle]
    else:
        pieces = [[prefix_id], prefix, [suffix_id], suffix, [middle_id], middle]
    return np.fromiter((t for piece in pieces for t in piece), dtype=ids.dtype)
