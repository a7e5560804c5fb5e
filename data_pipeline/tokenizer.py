"""Byte-level BPE tokenizer: training, loading, and the special tokens the pipeline relies on.

Byte-level BPE (as in GPT-2 and DeepSeek-V3) can encode any byte sequence, so no document is ever
lost to an unknown character. The pipeline needs a few special tokens: EOS separates packed
documents, the three FIM tokens mark fill-in-the-middle samples, BOS and padding exist for
downstream use.
"""

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
EOS = "<|eos|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, PAD]

DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer.json"


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer plus the ids of the special tokens the pipeline uses."""

    hf: HFTokenizer  # the Hugging Face tokenizer doing the work
    path: Path  # the tokenizer.json it was loaded from
    sha256: str  # hash of that file; recorded in manifests so shards and tokenizer cannot drift apart
    vocab_size: int  # total number of ids, special tokens included
    eos_id: int  # separates documents when packing
    bos_id: int | None  # None when the tokenizer has no BOS token
    pad_id: int | None  # None when the tokenizer has no padding token
    fim_ids: tuple[int, int, int] | None  # (prefix, suffix, middle); None when FIM is unsupported

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for, so token spans can be mapped to text without a decode call."""
        byte_of = _byte_level_decoder()
        added = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        table = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i) or ""
            table.append(token.encode() if token in added else bytes(byte_of[c] for c in token))
        return table


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map, which byte-level BPE vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load any `tokenizer.json`; None loads the shipped 8192-id tokenizer of the `tiny` preset."""
    path = Path(path) if path is not None else DEFAULT_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; pass a tokenizer.json (e.g. from `mds tokenizer train`) "
            "or leave the tokenizer unset to use the shipped default"
        )
    hf = HFTokenizer.from_file(str(path))
    ids = {token: hf.token_to_id(token) for token in SPECIAL_TOKENS}
    if ids[EOS] is None:
        raise ValueError(
            f"tokenizer {path} has no {EOS} token, which separates packed documents; "
            f"train one with `mds tokenizer train` (it adds {', '.join(SPECIAL_TOKENS)})"
        )
    fim = (ids[FIM_PREFIX], ids[FIM_SUFFIX], ids[FIM_MIDDLE])
    return Tokenizer(
        hf=hf,
        path=path,
        sha256=file_sha256(path),
        vocab_size=hf.get_vocab_size(with_added_tokens=True),
        eos_id=ids[EOS],
        bos_id=ids[BOS],
        pad_id=ids[PAD],
        fim_ids=None if None in fim else fim,
    )


def train_tokenizer(texts: Iterator[str], vocab_size: int, output: Path, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE whose vocabulary, special tokens included, has exactly `vocab_size` ids.

    The special tokens take ids 0..5, then the 256 byte symbols, then merges. A corpus too small to
    learn enough merges yields fewer ids; that is reported rather than silently accepted.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    got = hf.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"the corpus only supports {got} ids, not the requested {vocab_size}; "
            "give more text or lower --vocab-size (or --min-frequency)"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    hf.save(str(output), pretty=False)
    return load_tokenizer(output)
