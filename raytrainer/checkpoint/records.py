"""What a checkpoint is on storage: names, commit records, and whether one step is complete.

Layout (local directory or s3://bucket/prefix):

    <storage>/<run_name>/checkpoints/step_00000100/
        <files each rank wrote>          model/optimizer shards (DCP, safetensors, DeepSpeed), JSON state
        _commit/rank-00000.json          one commit record per rank, written after that rank's files
        _pinned.json                     optional: never pruned (the guardian's last healthy checkpoint)
        _damaged.json                    optional: a load found a file that differs from its record

A checkpoint is complete when the records of ranks 0..world_size-1 all exist, agree on world_size and
save_id, and every file they list exists with the listed size. Anything else (a rank that died mid-upload,
a truncated file, a re-save of the same step still under way) is not loadable.
Nothing is ever pickled: metadata is JSON and tensors go in files written by DCP or safetensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raytrainer.storage import Storage

FORMAT = "raytrainer-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
COMMIT_DIR = "_commit"
PIN_FILE = "_pinned.json"
DAMAGED_FILE = "_damaged.json"  # written when a load found a file that does not match its commit record
STEP_DIR = re.compile(r"^step_(\d+)$")
_RECORD = re.compile(r"^rank-(\d+)\.json$")

class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded; the message names the step, location and file."""


class CheckpointNotFound(CheckpointError):
    pass


class CheckpointCorrupt(CheckpointError):
    pass


class MirrorError(CheckpointError):
    """The primary copy is committed, but copying it to the mirror failed."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def record_name(rank: int) -> str:
    return f"{COMMIT_DIR}/rank-{rank:05d}.json"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CommitRecord:
    """What one rank wrote for one step. `files`: {relative path: {"size": int, "sha256": str}}."""

    step: int
    rank: int
    world_size: int
    files: dict[str, dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)
    save_id: str | None = None
    created: float = 0.0
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> CommitRecord:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
            return cls(**raw)
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(f"commit record {where} is unreadable: {e}") from e

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


@dataclass
class CheckpointInfo:
    step: int
    complete: bool
    location: str  # "primary" or "mirror": where it is complete (or, if nowhere, where it was seen)
    world_size: int | None = None
    committed_ranks: list[int] = field(default_factory=list)
    pinned: bool = False
    problems: list[str] = field(default_factory=list)  # why it is not complete


@dataclass
class Verification:
    step: int
    location: str
    full: bool  # sha256 of every file checked, not only presence and size
    problems: list[str]
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LoadedCheckpoint:
    step: int
    location: str
    local_dir: Path
    world_size: int
    records: dict[int, CommitRecord]
    files: list[str]  # relative paths fetched into local_dir

    @property
    def metadata(self) -> dict[str, Any]:
        """Rank 0's metadata (the trainer state)."""
        return self.records[0].metadata


@dataclass
class StepState:
    """One step at one location, from a listing plus its commit records."""

    step: int
    listing: dict[str, int]  # relative path -> size
    records: dict[int, CommitRecord]
    problems: list[str]
    pinned: bool

    @property
    def complete(self) -> bool:
        return not self.problems

    @property
    def world_size(self) -> int | None:
        return self.records[0].world_size if 0 in self.records else None

    def files(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rank in sorted(self.records):
            out.update(self.records[rank].files)
        return out


# --------------------------------------------------------------------------- one step


def read_step_state(storage: Storage, step: int, listing: dict[str, int] | None = None) -> StepState:
    """One step at one location (`storage` is the checkpoints directory), from its listing and records."""
    step_dir = storage.child(step_dir_name(step))
    if listing is None:
        listing = step_dir.list_files()
    records: dict[int, CommitRecord] = {}
    problems: list[str] = []
    for rel in listing:
        head, _, name = rel.partition("/")
        match = _RECORD.match(name) if head == COMMIT_DIR else None
        if match:
            try:
                records[int(match.group(1))] = CommitRecord.from_json(
                    step_dir.read_bytes(rel), step_dir.uri(rel)
                )
            except CheckpointCorrupt as e:
                problems.append(str(e))
            except FileNotFoundError:
                problems.append(f"commit record {step_dir.uri(rel)} vanished while reading")
    pinned = PIN_FILE in listing
    if DAMAGED_FILE in listing:
        try:
            damage = json.loads(step_dir.read_bytes(DAMAGED_FILE)).get("reason", "?")
        except (OSError, ValueError) as e:
            damage = f"(unreadable marker: {e})"
        problems.append(f"marked damaged by a load: {damage}")
    if not listing:
        return StepState(step, listing, records, [f"{step_dir.url} does not exist"], pinned)
    if 0 not in records:
        problems.append(f"rank 0 has not committed step {step} at {step_dir.url}")
        return StepState(step, listing, records, problems, pinned)
    head = records[0]
    missing = [r for r in range(head.world_size) if r not in records]
    if missing:
        problems.append(
            f"ranks {_ranges(missing)} of world_size {head.world_size} have not committed "
            f"step {step} at {step_dir.url}"
        )
    seen: dict[str, dict[str, Any]] = {}
    for rank in range(head.world_size):
        rec = records.get(rank)
        if rec is None:
            continue
        if rec.world_size != head.world_size or rec.save_id != head.save_id or rec.step != step:
            problems.append(
                f"rank {rank}'s record (step {rec.step}, world_size {rec.world_size}, "
                f"save_id {rec.save_id}) does not match rank 0's (step {step}, "
                f"world_size {head.world_size}, save_id {head.save_id})"
            )
            continue
        for rel, entry in rec.files.items():
            if rel in seen and seen[rel] != entry:
                problems.append(f"{rel} is listed by two ranks with different contents")
            seen[rel] = entry
            size = listing.get(rel)
            if size is None:
                problems.append(f"{step_dir.uri(rel)} is missing (rank {rank} committed it)")
            elif size != entry["size"]:
                problems.append(
                    f"{step_dir.uri(rel)} has {size} bytes, rank {rank} committed {entry['size']}"
                )
    return StepState(
        step, listing, {r: records[r] for r in records if r < head.world_size}, problems, pinned
    )


def local_files(local_dir: Path) -> dict[str, int]:
    files = {}
    for path in sorted(local_dir.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(local_dir).as_posix()
        if rel.startswith(COMMIT_DIR + "/") or rel in (PIN_FILE, DAMAGED_FILE):
            raise CheckpointError(
                f"{path}: the names {COMMIT_DIR}/, {PIN_FILE} and {DAMAGED_FILE} are reserved for the store"
            )
        files[rel] = path.stat().st_size
    return files


def _ranges(values: list[int]) -> str:
    if len(values) <= 6:
        return ", ".join(map(str, values))
    return f"{values[0]}..{values[-1]} ({len(values)} ranks)"

