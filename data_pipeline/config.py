"""`DataConfig`: the `data` section of the configuration tree."""

from dataclasses import dataclass, field

CORRUPTION_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    """What the training loop reads, and how. Everything here except `num_workers`, `corruption` and
    `verify_checksums` determines the stream of batches; changing it makes old loader states unusable."""

    paths: list[str] = field(
        default_factory=list
    )  # dataset directories from `mds preprocess`; empty = stdlib
    weights: list[float] = field(default_factory=list)  # blend weight per path; empty = by token count
    cache_dir: str = "~/.cache/megatron-ds/data"  # where the default stdlib dataset is built on first use
    tokenizer: str | None = None  # tokenizer.json the shards must be encoded with; None = shipped default
    num_workers: int = 1  # DataLoader worker processes per rank; 0 reads in the training process
    num_streams: int = 16  # virtual streams; a multiple of dp_size * max(num_workers, 1), see docs/data.md
    shuffle_buffer: int = 256  # documents shuffled together within each stream (after shard-order shuffle)
    fim_rate: float = 0.1  # fraction of documents turned into fill-in-the-middle samples (DeepSeek-V3: 0.1)
    fim_spm_rate: float = 0.0  # fraction of FIM samples in suffix-prefix-middle order (DeepSeek-V3: PSM only)
    corruption: str = "error"  # corrupt or missing shard: "error" stops naming it; "skip" warns and counts
    verify_checksums: bool = True  # check each shard's sha256 against the manifest before reading it
    document_masking: bool = False  # emit real doc_ids for per-document attention; off = all zeros (causal)

    def validate(self) -> None:
        """Raise ValueError naming the field and a valid value for anything out of range."""
        if self.weights and len(self.weights) != len(self.paths):
            raise ValueError(
                f"data.weights has {len(self.weights)} entries for {len(self.paths)} data.paths; "
                "give one weight per path, or none to weight by token count"
            )
        if any(w <= 0 for w in self.weights):
            raise ValueError(
                f"data.weights={self.weights} must all be positive; drop a path instead of weight 0"
            )
        for name in ("fim_rate", "fim_spm_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name}={getattr(self, name)} must lie in [0, 1]")
        if self.corruption not in CORRUPTION_POLICIES:
            raise ValueError(f"data.corruption={self.corruption!r}; choose one of {CORRUPTION_POLICIES}")
        if self.num_workers < 0 or self.num_streams < 1 or self.shuffle_buffer < 1:
            raise ValueError(
                f"data.num_workers={self.num_workers} must be >= 0, data.num_streams={self.num_streams} and "
                f"data.shuffle_buffer={self.shuffle_buffer} >= 1"
            )
