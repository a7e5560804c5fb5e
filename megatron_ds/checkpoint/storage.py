"""Reading a checkpoint's files safely: DCP metadata without arbitrary unpickling, and integrity checks.

`torch.distributed.checkpoint.FileSystemReader.read_metadata` (torch 2.13) runs plain
`pickle.load` on the `.metadata` file, so a crafted checkpoint could run code on every rank
that loads it. `SafeFileSystemReader` reads it through an unpickler that only constructs DCP's
own metadata classes, a few torch value types and paths. Tensor payloads are already read with
`torch.load(weights_only=True)` by DCP. Byte entries (pickled Python objects in DCP) are refused:
our checkpoints store only tensors, and everything else goes to a JSON file.
"""

import io
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

METADATA_FILE = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, unsafe or does not fit the model."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a checkpoint metadata type")


def read_metadata(path: Path) -> Metadata:
    """Unpickle a DCP `.metadata` file, allowing only metadata types; raise CheckpointError otherwise."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is not a complete checkpoint: {path.name} is missing (was the save "
            "interrupted?). Load an earlier checkpoint with checkpoint.load=PATH."
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read safely ({type(e).__name__}: {e}); the file is damaged or was not "
            "written by megatron-ds. Load an earlier checkpoint with checkpoint.load=PATH."
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} does not hold checkpoint metadata (found {type(metadata).__name__})")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor; refusing to load pickled objects")
    return metadata


def check_files(directory: Path, metadata: Metadata) -> None:
    """Every data file the metadata names exists inside the checkpoint and is long enough."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{directory}: metadata names a file outside the checkpoint: {name!r}")
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint {directory} is incomplete: data file {name} is missing. "
                "Load an earlier checkpoint with checkpoint.load=PATH."
            )
        if file.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {directory} is damaged: {name} has {file.stat().st_size} bytes, the metadata "
                f"expects at least {size} (truncated copy?). "
                "Load an earlier checkpoint with checkpoint.load=PATH."
            )


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata is not used by megatron-ds checkpoints")
        metadata = read_metadata(Path(self.path) / METADATA_FILE)
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
