""""""

from megatron_ds.checkpoint.checkpointer import Checkpointer, model_tensors, resolve_checkpoint
from megatron_ds.checkpoint.storage import CheckpointError

__all__ = ["CheckpointError", "Checkpointer", "model_tensors", "resolve_checkpoint"]
