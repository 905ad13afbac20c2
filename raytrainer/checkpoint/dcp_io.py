"""torch.distributed.checkpoint (DCP) save and load, with loading that never unpickles arbitrary objects.

DCP's own reader unpickles the checkpoint's `.metadata` file with plain `pickle.load` and its non-tensor
items (optimizer hyperparameters) with `torch.load(weights_only=False)`: a tampered checkpoint could run
code. Here the metadata goes through an unpickler that knows only DCP's metadata classes, and the
non-tensor items through `torch.load(weights_only=True)`.

Both work with or without an initialised process group (one process saves and loads on its own), and a
checkpoint written by N ranks loads on M: DCP reshards by the saved chunk offsets.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex", "StorageMeta")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.memory_format):
            return getattr(torch, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a DCP metadata file never holds; "
            "refusing to load it (the checkpoint may have been tampered with)"
        )


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path}: not a DCP metadata file (holds a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save(state: dict, directory: str | Path, process_group: dist.ProcessGroup | None = None) -> None:
    """Write `state` (nested dicts of tensors / DTensors and plain values) as a DCP checkpoint; every rank
    of the process group (if any; the default group unless one is given) calls this and writes its own
    shard files."""
    with warnings.catch_warnings():
        # single process: DCP warns that it assumes a single process, which is what we want
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), process_group=process_group)


def host_copy(state: dict) -> dict:
    """A copy of `state` whose tensors (DTensor shards included) are new host-memory tensors holding
    today's values: training may change the originals while the copy is written."""
    copy = _create_cpu_state_dict(state)
    _copy_state_dict(state, copy, type_check=False)
    return copy


def load(state: dict, directory: str | Path) -> None:
    """Fill `state` in place from a DCP checkpoint (resharding to this state's layout)."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise FileNotFoundError(f"{directory}: no DCP checkpoint here (no .metadata file)")
    reader = SafeFileSystemReader(str(directory))
    reader.read_metadata()  # refuse a tampered metadata file here, with our message (DCP would wrap it)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
