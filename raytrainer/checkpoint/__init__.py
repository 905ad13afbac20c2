"""Everything about checkpoints: what one is on storage (records), writing and committing it (writer),
finding and reading it (store), which ones to keep (retention), rank 0's background books (housekeeping),
the training state in and out (manager), DCP and DeepSpeed file I/O, and Ray Train's pointers."""

from raytrainer.checkpoint.manager import CheckpointManager, TrainerState, run_store
from raytrainer.checkpoint.records import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointInfo,
    CheckpointNotFound,
    CommitRecord,
    LoadedCheckpoint,
    MirrorError,
    Verification,
    record_name,
    step_dir_name,
)
from raytrainer.checkpoint.store import CheckpointStore

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "CheckpointStore",
    "CommitRecord",
    "LoadedCheckpoint",
    "MirrorError",
    "TrainerState",
    "Verification",
    "record_name",
    "run_store",
    "step_dir_name",
]
