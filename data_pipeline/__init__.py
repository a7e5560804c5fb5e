"""Sharded webdataset data pipeline: tokenizer, preprocessing, and a loader with exact, elastic resume."""

from data_pipeline.config import DataConfig
from data_pipeline.default_dataset import ensure_default_dataset
from data_pipeline.loader import StatefulLoader, build_loader
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "StatefulLoader",
    "Tokenizer",
    "build_loader",
    "ensure_default_dataset",
    "load_tokenizer",
]
