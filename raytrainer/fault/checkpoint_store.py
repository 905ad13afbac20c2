"""Checkpoints in storage, each one complete or invisible.

Layout (local directory or s3://bucket/prefix):

    <storage>/<run_name>/checkpoints/step_00000100/
        <files each rank wrote>          model/optimizer shards (DCP, safetensors, DeepSpeed), JSON state
        _commit/rank-00000.json          one commit record per rank, written after that rank's files
        _pinned.json                     optional: never pruned (the guardian's last healthy checkpoint)

A rank uploads its files, hashing them as they stream out, then writes its commit record
(world_size, save_id, every file with size and sha256, JSON metadata). A checkpoint is complete when
the records of ranks 0..world_size-1 all exist, agree on world_size and save_id, and every file they
list exists with the listed size. Anything else (a rank that died mid-upload, a truncated file, a
re-save of the same step still under way) is not loadable, and `latest_complete()` looks past it.
Downloads check every sha256 on the way in, so a corrupted file is caught at load time too.

Before writing anything for a step, a rank deletes its own old record for that step, so re-saving a
step (after a rollback) makes it incomplete until every rank has committed again. Pass the same
`save_id` on every rank (rank 0 broadcasts one) to also rule out records from two different attempts
being mixed.

With a mirror, each rank copies its files and then its record to the mirror after committing to the
primary; reads use the mirror when the primary is unreachable, incomplete or corrupt.
Nothing is ever pickled: metadata is JSON and tensors go in files written by DCP or safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from raytrainer.config import S3Config
from raytrainer.storage import Storage, StorageError, open_storage

log = logging.getLogger("raytrainer.checkpoint")

FORMAT = "raytrainer-checkpoint/1"
CHECKPOINTS_DIR = "checkpoints"
COMMIT_DIR = "_commit"
PIN_FILE = "_pinned.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
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


def step_from_path(path: str) -> int:
    """The step of a checkpoint directory path (e.g. a Ray Checkpoint.path ending in step_00000100)."""
    match = _STEP_DIR.match(os.path.basename(str(path).rstrip("/")))
    if not match:
        raise ValueError(f"{path!r} is not a checkpoint directory (expected a name like step_00000100)")
    return int(match.group(1))


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
class _StepState:
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


# --------------------------------------------------------------------------- the store


class CheckpointStore:
    """The run's checkpoints under <url>/<run_name>/checkpoints, with an optional mirror."""

    def __init__(
        self,
        url: str,
        run_name: str,
        s3cfg: S3Config | None = None,
        mirror: str | None = None,
        mirror_s3: S3Config | None = None,
        io_threads: int = 4,
        max_pending: int = 2,
    ):
        if not run_name or "/" in run_name:
            raise ValueError(f"run_name={run_name!r} must be a non-empty name without '/'")
        self.run_name = run_name
        self.primary = open_storage(url, s3cfg).child(run_name, CHECKPOINTS_DIR)
        self.mirror = None
        if mirror:
            self.mirror = open_storage(mirror, mirror_s3 if mirror_s3 is not None else s3cfg).child(
                run_name, CHECKPOINTS_DIR
            )
        self.io_threads = io_threads
        self.max_pending = max_pending
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._done: list[CommitRecord] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        mirror = f", mirror={self.mirror.url}" if self.mirror else ""
        return f"CheckpointStore({self.primary.url}{mirror})"

    # ---- paths

    @property
    def fs(self):
        return self.primary.fs

    def step_path(self, step: int) -> str:
        """The step's directory as a path on `self.fs` (what a Ray Checkpoint points at)."""
        return self.primary.path(step_dir_name(step))

    def step_url(self, step: int) -> str:
        return self.primary.uri(step_dir_name(step))

    @staticmethod
    def ray_checkpoint_dir_name(step: int) -> str:
        """`checkpoint_dir_name` for ray.train.report: relative to Ray's experiment dir, <storage>/<run>."""
        return f"{CHECKPOINTS_DIR}/{step_dir_name(step)}"

    def _locations(self) -> list[tuple[str, Storage]]:
        return [("primary", self.primary)] + ([("mirror", self.mirror)] if self.mirror else [])

    # ---- saving

    def save_rank(
        self,
        step: int,
        local_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        metadata: dict[str, Any] | None = None,
        save_id: str | None = None,
        delete_local: bool = False,
    ) -> CommitRecord:
        """Upload this rank's files from local_dir, then its commit record (then the same to the mirror).
        Raises any error left over from an earlier async save first."""
        self._raise_async_errors()
        job = self._job(step, local_dir, rank, world_size, metadata, save_id)
        record = self._save(*job)
        if delete_local:
            shutil.rmtree(local_dir, ignore_errors=True)
        return record

    def save_rank_async(
        self,
        step: int,
        local_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        metadata: dict[str, Any] | None = None,
        save_id: str | None = None,
        delete_local: bool = False,
        write_first: Callable[[], None] | None = None,
    ) -> None:
        """Queue the upload and return; local_dir must stay untouched until it is done (use one staging
        directory per step, or delete_local=True to remove it after a successful upload). `write_first`,
        if given, runs on the upload thread before local_dir is listed (it writes the rest of its files).
        Blocks only when `max_pending` uploads are already queued. A failure is raised by the next call on
        this store (save_rank*, wait, close)."""
        self._raise_async_errors()
        job = self._job(step, local_dir, rank, world_size, metadata, save_id)
        if self._worker is None or not self._worker.is_alive():
            self._queue = queue.Queue(maxsize=self.max_pending)
            self._worker = threading.Thread(
                target=self._upload_loop,
                args=(self._queue,),
                name=f"checkpoint-upload-rank{rank}",
                daemon=True,
            )
            self._worker.start()
        assert self._queue is not None
        self._queue.put((job, delete_local, write_first))

    def wait(self) -> list[CommitRecord]:
        """Block until every queued upload is finished; raise the first failure. Returns the records
        committed in the background since the last wait()."""
        if self._queue is not None:
            self._queue.join()
        self._raise_async_errors()
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._queue is not None and self._worker is not None and self._worker.is_alive():
                self._queue.put(None)
                self._worker.join(timeout=60)
            self._queue, self._worker = None, None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _upload_loop(self, jobs: queue.Queue) -> None:
        while True:
            item = jobs.get()
            try:
                if item is None:
                    return
                job, delete_local, write_first = item
                if write_first is not None:
                    write_first()
                record = self._save(*job)
                with self._lock:
                    self._done.append(record)
                if delete_local:
                    shutil.rmtree(job[1], ignore_errors=True)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by _raise_async_errors
                log.error("background checkpoint upload failed: %s", e)
                with self._lock:
                    self._errors.append(e)
            finally:
                jobs.task_done()

    def _raise_async_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        first = errors[0]
        more = f" (and {len(errors) - 1} more failed uploads)" if len(errors) > 1 else ""
        if isinstance(first, CheckpointError):
            raise type(first)(f"{first}{more}") from first
        raise CheckpointError(f"background checkpoint upload failed: {first}{more}") from first

    def _job(self, step, local_dir, rank, world_size, metadata, save_id) -> tuple:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise CheckpointError(f"checkpoint staging directory {local_dir} does not exist")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint metadata for step {step} must be JSON-serialisable: {e}"
            ) from e
        return step, local_dir, rank, world_size, metadata, save_id

    def _save(self, step, local_dir, rank, world_size, metadata, save_id) -> CommitRecord:
        local_files = _local_files(local_dir)
        started = time.monotonic()
        job = (step, local_dir, local_files, rank, world_size, metadata, save_id)
        record = self._commit_to(self.primary, *job)
        elapsed = time.monotonic() - started
        log.info(
            "rank %d: checkpoint step %d committed to %s (%d files, %.1f MB, %.1f MB/s)",
            rank,
            step,
            self.primary.uri(step_dir_name(step)),
            len(record.files),
            record.total_bytes / 1e6,
            record.total_bytes / 1e6 / max(elapsed, 1e-6),
        )
        if self.mirror is not None:
            try:
                self._commit_to(self.mirror, *job, expected=record)
            except Exception as e:
                raise MirrorError(
                    f"checkpoint step {step} rank {rank} is committed to {self.primary.url} but copying it "
                    f"to the mirror {self.mirror.url} failed: {e}"
                ) from e
        return record

    def _commit_to(
        self,
        storage: Storage,
        step: int,
        local_dir: Path,
        local_files: dict[str, int],
        rank: int,
        world_size: int,
        metadata: dict,
        save_id: str | None,
        expected: CommitRecord | None = None,
    ) -> CommitRecord:
        step_dir = storage.child(step_dir_name(step))
        try:
            # Withdraw this rank's old commit first: a step being re-saved is incomplete until every
            # rank has committed again.
            step_dir.delete_file(record_name(rank))
            files = self._upload_files(step_dir, local_dir, local_files)
            if expected is not None and files != expected.files:
                changed = sorted(r for r in files if files[r] != expected.files.get(r))
                raise CheckpointError(
                    f"{local_dir} changed between the primary and mirror uploads: {changed[:5]}"
                )
            record = CommitRecord(
                step=step,
                rank=rank,
                world_size=world_size,
                files=files,
                metadata=metadata,
                save_id=save_id,
                created=time.time(),
            )
            step_dir.write_bytes(record_name(rank), record.to_json())
        except OSError as e:
            raise CheckpointError(
                f"saving checkpoint step {step} rank {rank} to {step_dir.url} failed: {e}"
            ) from e
        return record

    def _upload_files(
        self, step_dir: Storage, local_dir: Path, local_files: dict[str, int]
    ) -> dict[str, dict]:
        """Upload in parallel, biggest first; {relative path: {size, sha256}} hashed while streaming."""

        def upload(rel: str) -> tuple[str, int, str]:
            size, sha = step_dir.upload_file(local_dir / rel, rel)
            return rel, size, sha

        files: dict[str, dict[str, Any]] = {}
        with ThreadPoolExecutor(max_workers=self.io_threads) as pool:
            for rel, size, sha in pool.map(upload, sorted(local_files, key=lambda r: -local_files[r])):
                if size != local_files[rel]:
                    raise CheckpointError(
                        f"{local_dir / rel} changed size while uploading ({local_files[rel]} "
                        f"-> {size} bytes); was it still being written?"
                    )
                files[rel] = {"size": size, "sha256": sha}
        return dict(sorted(files.items()))

    # ---- inspecting

    def _steps_at(self, storage: Storage) -> dict[int, dict[str, int]]:
        """{step: {relative path: size}} from one recursive listing."""
        by_step: dict[int, dict[str, int]] = {}
        for rel, size in storage.list_files().items():
            head, _, rest = rel.partition("/")
            match = _STEP_DIR.match(head)
            if match and rest:
                by_step.setdefault(int(match.group(1)), {})[rest] = size
        return by_step

    def _state(self, storage: Storage, step: int, listing: dict[str, int] | None = None) -> _StepState:
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
        if not listing:
            return _StepState(step, listing, records, [f"{step_dir.url} does not exist"], pinned)
        if 0 not in records:
            problems.append(f"rank 0 has not committed step {step} at {step_dir.url}")
            return _StepState(step, listing, records, problems, pinned)
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
        return _StepState(
            step, listing, {r: records[r] for r in records if r < head.world_size}, problems, pinned
        )

    def _scan(self) -> dict[str, dict[int, dict[str, int]] | StorageError]:
        """Listings of every location; an unreachable location maps to its error."""
        out: dict[str, Any] = {}
        for where, storage in self._locations():
            try:
                out[where] = self._steps_at(storage)
            except OSError as e:
                out[where] = StorageError(f"cannot list checkpoints at {storage.url}: {e}", url=storage.url)
                log.warning("%s", out[where])
        if all(isinstance(v, StorageError) for v in out.values()):
            raise next(iter(out.values()))
        return out

    def _complete_state(self, step: int, scan: dict | None = None) -> tuple[str, Storage, _StepState] | None:
        scan = scan if scan is not None else self._scan()
        for where, storage in self._locations():
            listings = scan.get(where)
            if isinstance(listings, StorageError) or listings is None or step not in listings:
                continue
            try:
                state = self._state(storage, step, listings[step])
            except OSError as e:
                log.warning("checkpoint step %d at %s unreadable: %s", step, storage.url, e)
                continue
            if state.complete:
                return where, storage, state
        return None

    def list(self) -> list[CheckpointInfo]:
        """Every step seen at any location, oldest first, with whether (and where) it is complete."""
        scan = self._scan()
        steps = sorted({s for v in scan.values() if isinstance(v, dict) for s in v})
        infos = []
        for step in steps:
            info = None
            first_seen: CheckpointInfo | None = None
            pinned = False
            for where, storage in self._locations():
                listings = scan.get(where)
                if not isinstance(listings, dict) or step not in listings:
                    continue
                state = self._state(storage, step, listings[step])
                pinned = pinned or state.pinned
                candidate = CheckpointInfo(
                    step,
                    state.complete,
                    where,
                    state.world_size,
                    sorted(state.records),
                    state.pinned,
                    state.problems,
                )
                if state.complete:
                    info = candidate
                    break
                first_seen = first_seen or candidate
            info = info or first_seen
            assert info is not None
            info.pinned = pinned
            infos.append(info)
        return infos

    def steps(self) -> list[int]:
        """Complete steps, oldest first."""
        return [i.step for i in self.list() if i.complete]

    def is_complete(self, step: int) -> bool:
        return self._complete_state(step) is not None

    def latest_complete(self, before_step: int | None = None) -> int | None:
        """The newest step complete at the primary or the mirror (strictly before `before_step` if given);
        None when there is none. Raises StorageError when no location can be listed at all: an outage must
        not look like a fresh start."""
        scan = self._scan()
        steps = sorted({s for v in scan.values() if isinstance(v, dict) for s in v}, reverse=True)
        for step in steps:
            if before_step is not None and step >= before_step:
                continue
            if self._complete_state(step, scan) is not None:
                return step
        return None

    def records(self, step: int) -> dict[int, CommitRecord]:
        found = self._complete_state(step)
        if found is None:
            raise CheckpointNotFound(self._not_found(step))
        return found[2].records

    def verify(self, step: int, full: bool = False, location: str = "primary") -> Verification:
        """Check one copy: every rank committed, every file present with its size and, with full=True, its
        sha256 (by reading it back)."""
        storage = dict(self._locations()).get(location)
        if storage is None:
            raise ValueError(f"location={location!r}: this store has {[w for w, _ in self._locations()]}")
        try:
            state = self._state(storage, step)
        except OSError as e:
            return Verification(
                step, location, full, [f"cannot read {storage.uri(step_dir_name(step))}: {e}"]
            )
        problems = list(state.problems)
        files = state.files()
        if full and not problems:
            step_dir = storage.child(step_dir_name(step))

            def check(item: tuple[str, dict]) -> str | None:
                rel, entry = item
                try:
                    size, sha = step_dir.hash_file(rel)
                except OSError as e:
                    return f"{step_dir.uri(rel)}: unreadable ({e})"
                if sha != entry["sha256"] or size != entry["size"]:
                    return (
                        f"{step_dir.uri(rel)}: sha256 {sha[:16]}... ({size} bytes) differs from the "
                        f"committed {entry['sha256'][:16]}... ({entry['size']} bytes)"
                    )
                return None

            with ThreadPoolExecutor(max_workers=self.io_threads) as pool:
                problems += [p for p in pool.map(check, files.items()) if p]
        return Verification(step, location, full, problems, len(files))

    def _not_found(self, step: int) -> str:
        where = " or ".join(s.uri(step_dir_name(step)) for _, s in self._locations())
        return f"no complete checkpoint for step {step} at {where}"

    # ---- loading

    def download(
        self,
        step: int,
        local_dir: str | os.PathLike,
        rank: int | None = None,
        include: Iterable[str] = (),
    ) -> LoadedCheckpoint:
        """Fetch a complete checkpoint into local_dir, checking every sha256 on the way.

        rank=None fetches every file; rank=r fetches the files rank r committed plus those matching any
        `include` glob (e.g. ".metadata" or "*.json"). The primary is tried first; the mirror is used when
        the primary copy is incomplete, unreadable or corrupt."""
        local_dir = Path(local_dir)
        include = list(include)
        scan = self._scan()
        errors = []
        corrupt = False
        for where, storage in self._locations():
            listings = scan.get(where)
            if not isinstance(listings, dict) or step not in listings:
                continue
            try:
                state = self._state(storage, step, listings[step])
                if not state.complete:
                    errors.append(f"{where}: " + "; ".join(state.problems[:3]))
                    continue
                return self._fetch(where, storage, state, local_dir, rank, include)
            except (OSError, CheckpointError) as e:
                corrupt = corrupt or isinstance(e, CheckpointCorrupt)
                errors.append(f"{where}: {e}")
                log.warning(
                    "checkpoint step %d: %s copy not usable (%s)%s",
                    step,
                    where,
                    e,
                    "; trying the mirror" if where == "primary" and self.mirror else "",
                )
        detail = ("; ".join(errors)) if errors else "it does not exist"
        exc = CheckpointCorrupt if corrupt else CheckpointNotFound
        raise exc(
            f"cannot load checkpoint step {step} from {self.primary.url}"
            f"{' or ' + self.mirror.url if self.mirror else ''}: {detail}"
        )

    def _fetch(
        self,
        where: str,
        storage: Storage,
        state: _StepState,
        local_dir: Path,
        rank: int | None,
        include: list[str],
    ) -> LoadedCheckpoint:
        files = state.files()
        if rank is not None:
            if rank not in state.records:
                raise CheckpointError(
                    f"rank={rank} is outside the checkpoint's world_size {state.world_size}"
                )
            wanted = set(state.records[rank].files) | {
                r for r in files if any(fnmatch(r, p) for p in include)
            }
            files = {r: e for r, e in files.items() if r in wanted}
        step_dir = storage.child(step_dir_name(state.step))

        def fetch(item: tuple[str, dict]) -> None:
            rel, entry = item
            target = local_dir / rel
            size, sha = step_dir.download_file(rel, target)
            if sha != entry["sha256"] or size != entry["size"]:
                target.unlink(missing_ok=True)
                raise CheckpointCorrupt(
                    f"{step_dir.uri(rel)}: sha256 {sha[:16]}... ({size} bytes) differs from the committed "
                    f"{entry['sha256'][:16]}... ({entry['size']} bytes)"
                )

        local_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.io_threads) as pool:
            list(pool.map(fetch, sorted(files.items(), key=lambda kv: -kv[1]["size"])))
        return LoadedCheckpoint(
            state.step, where, local_dir, state.world_size or 0, state.records, sorted(files)
        )

    def read_json(self, step: int, name: str) -> Any:
        """A JSON file of a complete checkpoint, checked against its commit record when listed there."""
        errors = []
        scan = self._scan()
        for where, storage in self._locations():
            listings = scan.get(where)
            if not isinstance(listings, dict) or step not in listings:
                continue
            try:
                state = self._state(storage, step, listings[step])
                if not state.complete:
                    errors.append(f"{where}: incomplete")
                    continue
                entry = state.files().get(name)
                if entry is None:
                    raise CheckpointNotFound(
                        f"{name} is not part of checkpoint step {step} (files: {sorted(state.files())[:10]})"
                    )
                data = storage.child(step_dir_name(step)).read_bytes(name)
                if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise CheckpointCorrupt(
                        f"{storage.uri(step_dir_name(step), name)} does not match its commit record"
                    )
                return json.loads(data)
            except CheckpointNotFound:
                raise
            except (OSError, CheckpointError, ValueError) as e:
                errors.append(f"{where}: {e}")
        raise CheckpointNotFound(f"{self._not_found(step)} ({'; '.join(errors) or 'nothing there'})")

    # ---- retention

    def pin(self, step: int, reason: str = "") -> None:
        """Mark a step as never to be pruned (at every location that has it)."""
        payload = json.dumps({"step": step, "reason": reason, "time": time.time()}).encode()
        done = False
        for where, storage in self._locations():
            step_dir = storage.child(step_dir_name(step))
            try:
                if step_dir.list_files():
                    step_dir.write_bytes(PIN_FILE, payload)
                    done = True
            except OSError as e:
                if where == "primary":
                    raise CheckpointError(f"cannot pin step {step} at {step_dir.url}: {e}") from e
                log.warning("cannot pin step %d on the mirror %s: %s", step, step_dir.url, e)
        if not done:
            raise CheckpointNotFound(f"cannot pin step {step}: {self._not_found(step)}")

    def unpin(self, step: int) -> None:
        for _, storage in self._locations():
            storage.child(step_dir_name(step)).delete_file(PIN_FILE)

    def pinned(self) -> set[int]:
        scan = self._scan()
        return {
            s for v in scan.values() if isinstance(v, dict) for s, listing in v.items() if PIN_FILE in listing
        }

    def delete(self, step: int) -> None:
        """Remove a step everywhere: commit records first, so a half-deleted checkpoint is never complete."""
        for _, storage in self._locations():
            step_dir = storage.child(step_dir_name(step))
            step_dir.delete_tree(COMMIT_DIR)
            step_dir.delete_tree()

    def prune(self, keep_last: int, keep_every: int | None = None) -> list[int]:
        """Delete old checkpoints; returns the deleted steps.

        Kept: the newest `keep_last` complete ones, complete ones at multiples of `keep_every`, pinned
        ones, and always the latest complete one. Incomplete leftovers older than the latest complete one
        are deleted; newer incomplete ones may still be uploading and are left alone."""
        if keep_last < 1:
            raise ValueError(
                f"keep_last={keep_last} must be >= 1 (the latest complete checkpoint is always kept)"
            )
        scan = self._scan()
        unreachable = [v for v in scan.values() if isinstance(v, StorageError)]
        if unreachable:
            # Deciding from one side's view could delete the only good copy; housekeeping can wait.
            log.warning("prune skipped: %s", unreachable[0])
            return []
        listed = sorted({s for v in scan.values() for s in v})
        complete = [s for s in listed if self._complete_state(s, scan) is not None]
        if not complete:
            return []
        pinned = {s for v in scan.values() for s, listing in v.items() if PIN_FILE in listing}
        keep = set(complete[-keep_last:]) | {complete[-1]} | pinned
        if keep_every:
            keep |= {s for s in complete if s % keep_every == 0}
        doomed = [s for s in listed if s not in keep and s < complete[-1]]
        for step in doomed:
            self.delete(step)
        if doomed:
            log.info("pruned checkpoints %s (kept %s)", doomed, sorted(keep))
        return doomed


# --------------------------------------------------------------------------- Ray Train V2


def ray_upload_fn(
    store: CheckpointStore,
    step: int,
    rank: int,
    world_size: int,
    metadata: dict[str, Any] | None = None,
    save_id: str | None = None,
) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for ray.train.report that uploads through the store (commit record
    included) and returns a Ray Checkpoint pointing at the stored step directory:

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging_dir),
                         checkpoint_dir_name=CheckpointStore.ray_checkpoint_dir_name(step),
                         checkpoint_upload_fn=ray_upload_fn(store, step, rank, world_size, state))

    Needs RunConfig(name=run_name, storage_path=storage.root, storage_filesystem=storage.fs) with the
    storage from open_storage(checkpoint.storage, checkpoint.s3), so that Ray's experiment directory is
    the store's <storage>/<run_name>: Ray only accepts checkpoints inside it, on an equal filesystem."""

    def upload(checkpoint, checkpoint_dir_name: str):
        from ray.train import Checkpoint

        expected = CheckpointStore.ray_checkpoint_dir_name(step)
        if checkpoint_dir_name != expected:
            raise CheckpointError(
                f"ray.train.report(checkpoint_dir_name={checkpoint_dir_name!r}) for step {step}: pass "
                f"checkpoint_dir_name={expected!r} so Ray's directory and the store's are the same"
            )
        fs, experiment_path = _ray_experiment(store)
        step_path = store.step_path(step)
        if experiment_path is not None and not step_path.startswith(experiment_path.rstrip("/") + "/"):
            raise CheckpointError(
                f"the checkpoint store writes to {step_path}, outside Ray's experiment directory "
                f"{experiment_path}; set RunConfig(name={store.run_name!r}, storage_path=<storage>.root, "
                "storage_filesystem=<storage>.fs) from the same checkpoint.storage URL"
            )
        with checkpoint.as_directory() as local_dir:
            store.save_rank(step, local_dir, rank, world_size, metadata, save_id)
        return Checkpoint(path=step_path, filesystem=fs)

    return upload


def _ray_experiment(store: CheckpointStore) -> tuple[Any, str | None]:
    """Ray's storage filesystem object and experiment path, when running inside a Ray Train worker.
    Returning Ray's own filesystem object keeps Ray's equality check happy even if the store's differs
    in an option that does not matter (timeouts)."""
    try:
        import ray.train

        storage = ray.train.get_context().get_storage()
        return storage.storage_filesystem, storage.experiment_fs_path
    except Exception:
        return store.fs, None


# --------------------------------------------------------------------------- helpers


def _local_files(local_dir: Path) -> dict[str, int]:
    files = {}
    for path in sorted(local_dir.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(local_dir).as_posix()
        if rel.startswith(COMMIT_DIR + "/") or rel == PIN_FILE:
            raise CheckpointError(
                f"{path}: the names {COMMIT_DIR}/ and {PIN_FILE} are reserved for the store"
            )
        files[rel] = path.stat().st_size
    return files


def _ranges(values: list[int]) -> str:
    if len(values) <= 6:
        return ", ".join(map(str, values))
    return f"{values[0]}..{values[-1]} ({len(values)} ranks)"


__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointStore",
    "CommitRecord",
    "LoadedCheckpoint",
    "MirrorError",
    "Verification",
    "ray_upload_fn",
    "step_dir_name",
    "step_from_path",
]
