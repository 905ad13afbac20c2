"""torch.distributed.checkpoint (DCP) save and load, with loading that never unpickles arbitrary objects.

DCP's own reader unpickles the checkpoint's `.metadata` file with plain `pickle.load` and its non-tensor
items (optimizer hyperparameters) with `torch.load(weights_only=False)`: a tampered checkpoint could run
code. Here the metadata goes through an unpickler that knows only DCP's metadata classes, and the
non-tensor items through `torch.load(weights_only=True)`.

Both work with or without an initialised process group (one process saves and loads on its own), and a
checkpoint written by N ranks loads on M: DCP reshards by the saved chunk offsets.

Layout, chosen so that a rank reading a checkpoint back needs whole files of its own and little else:

    .metadata          which chunk of which item lies where (file, offset, length)
    __<r>_0.distcp     rank r's own shards (DTensor chunks)
    __<r>_1.distcp     what every rank holds a copy of (optimizer steps and hyperparameters, plain tensors);
                       DCP keeps one copy: small items on the lowest rank holding them, large ones (DDP's
                       replicated weights) spread over the ranks so that the save stays parallel

`files_for_state` names the files one rank's load plan touches, so a rank can download those alone. DCP's
default would file replicated scalars beside other ranks' shards, and every rank would need every file.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import queue
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

METADATA_FILE = ".metadata"
# Replicated items up to this size all go to the lowest rank holding them: one small file then holds every
# rank's copy of the optimizer's step counters and hyperparameters.
SMALL_ITEM_BYTES = 1 << 20

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


class LayoutSavePlanner(DefaultSavePlanner):
    """DCP's planner, except that small replicated items are kept by the lowest rank holding them."""

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        lowest: dict[MetadataIndex, int] = {}
        for i, plan in enumerate(all_plans):
            for item in plan.items:
                if _small(item):
                    lowest.setdefault(item.index, i)
        plans = [dataclasses.replace(plan, items=[item for item in plan.items
                                                  if not _small(item) or lowest[item.index] == i])
                 for i, plan in enumerate(all_plans)]
        return dedup_save_plans(plans, self.dedup_save_to_lowest_rank)


def _small(item: WriteItem) -> bool:
    if item.type == WriteItemType.SHARD:
        return False
    size = item.tensor_storage_size()
    return size is None or size <= SMALL_ITEM_BYTES  # None: a non-tensor value (bytes)


class LayoutWriter(dcp.FileSystemWriter):
    """DCP's file writer with a rank's shards and its replicated items in separate files (see above)."""

    def write_data(self, plan: SavePlan, planner: Any):
        if not hasattr(self, "_write_data"):  # another torch: its own layout (loads all the same)
            return super().write_data(plan, planner)
        prefix = plan.storage_data.prefix
        shards = [item for item in plan.items if item.type == WriteItemType.SHARD]
        copies = [item for item in plan.items if item.type != WriteItemType.SHARD]
        files: queue.Queue = queue.Queue()
        for number, items in enumerate((shards, copies)):
            if items:
                name = f"{prefix}{number}.distcp"
                files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)


def save(state: dict, directory: str | Path, process_group: dist.ProcessGroup | None = None) -> None:
    """Write `state` (nested dicts of tensors / DTensors and plain values) as a DCP checkpoint; every rank
    of the process group (if any; the default group unless one is given) calls this and writes its own
    shard files."""
    with warnings.catch_warnings():
        # single process: DCP warns that it assumes a single process, which is what we want
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, storage_writer=LayoutWriter(str(directory)), planner=LayoutSavePlanner(),
                 process_group=process_group)


def host_copy(state: dict) -> dict:
    """A copy of `state` whose tensors (DTensor shards included) are new host-memory tensors holding
    today's values: training may change the originals while the copy is written."""
    copy = _create_cpu_state_dict(state)
    _copy_state_dict(state, copy, type_check=False)
    return copy


def read_metadata(directory: str | Path) -> Metadata:
    """The checkpoint's metadata, read without unpickling anything but DCP's metadata classes."""
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no DCP checkpoint here (no {METADATA_FILE} file)")
    return SafeFileSystemReader(str(directory)).read_metadata()


def files_for_state(metadata: Metadata, state: dict) -> set[str]:
    """The files (relative to the checkpoint directory) that loading `state` on this rank reads: those
    holding a chunk that overlaps a chunk of this rank's state, by DCP's own load planner."""
    planner = DefaultLoadPlanner()
    planner.set_up_planner(state, metadata, is_coordinator=False)
    storage: Mapping[MetadataIndex, Any] = metadata.storage_data
    files = set()
    for item in planner.create_local_plan().items:
        info = storage.get(item.storage_index)
        if info is None:
            raise FileNotFoundError(f"the checkpoint's {METADATA_FILE} lists {item.storage_index.fqn} but not "
                                    "the file holding it")
        files.add(str(info.relative_path))
    return files


def load(state: dict, directory: str | Path) -> None:
    """Fill `state` in place from a DCP checkpoint (resharding to this state's layout). The directory needs
    only the files `files_for_state` names, besides the metadata."""
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no DCP checkpoint here (no {METADATA_FILE} file)")
    reader = SafeFileSystemReader(str(directory))
    reader.read_metadata()  # refuse a tampered metadata file here, with our message (DCP would wrap it)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
