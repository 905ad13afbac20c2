"""Writing checkpoints: each rank uploads its files, hashing them as they stream out, then its commit record.

Before writing anything for a step, a rank deletes its own old record for that step, so re-saving a step
(after a rollback) makes it incomplete until every rank has committed again. Pass the same `save_id` on
every rank (rank 0 broadcasts one) to also rule out records from two different attempts being mixed.
With a mirror, each rank copies its files and then its record to the mirror after committing to the
primary. Asynchronous saves run on one background thread per process, at most `max_pending` queued.

Object storage has outages of seconds to minutes. With `retry_s` > 0 a failed upload is started again (from
the withdrawal of the old record) with a growing pause, until it has been failing for `retry_s` seconds:
an outage that short costs a checkpoint's delay, not a restart from the one before.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raytrainer.checkpoint.records import (
    CheckpointError,
    CommitRecord,
    MirrorError,
    local_files,
    record_name,
    step_dir_name,
)
from raytrainer.storage import Storage

log = logging.getLogger("raytrainer.checkpoint")

RETRY_FIRST_PAUSE_S = 1.0
RETRY_MAX_PAUSE_S = 15.0


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


class CheckpointWriter:
    """Uploads and commits one process's checkpoint files to the primary (and the mirror)."""

    def __init__(self, primary: Storage, mirror: Storage | None = None, io_threads: int = 4, max_pending: int = 2,
                 retry_s: float = 0.0):
        self.primary = primary
        self.retry_s = retry_s
        self.mirror = mirror
        self.io_threads = io_threads
        self.max_pending = max_pending
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._done: list[CommitRecord] = []
        self._lock = threading.Lock()

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

    def __enter__(self) -> CheckpointWriter:
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
        files = local_files(local_dir)
        started = time.monotonic()
        job = (step, local_dir, files, rank, world_size, metadata, save_id)
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
        first_failure: float | None = None
        pause = RETRY_FIRST_PAUSE_S
        attempts = 0
        while True:
            attempts += 1
            try:
                record = self._commit_once(step_dir, step, local_dir, local_files, rank, world_size, metadata,
                                           save_id, expected)
                break
            except OSError as e:
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure + pause > self.retry_s:
                    waited = f" (failing for {now - first_failure:.0f} s, {attempts} attempts)" if attempts > 1 else ""
                    raise CheckpointError(
                        f"saving checkpoint step {step} rank {rank} to {step_dir.url} failed{waited}: {e}"
                    ) from e
                if attempts == 1:
                    log.warning("rank %d: checkpoint step %d upload to %s failed (%s); retrying for up to %.0f s "
                                "(checkpoint.upload_retry_s)", rank, step, step_dir.url, _first_line(e), self.retry_s)
                time.sleep(pause)
                pause = min(2 * pause, RETRY_MAX_PAUSE_S)
        if first_failure is not None:
            log.warning("rank %d: checkpoint step %d uploaded to %s after %d attempts over %.0f s of storage errors",
                        rank, step, step_dir.url, attempts, time.monotonic() - first_failure)
        return record

    def _commit_once(self, step_dir: Storage, step: int, local_dir: Path, local_files: dict[str, int], rank: int,
                     world_size: int, metadata: dict, save_id: str | None,
                     expected: CommitRecord | None) -> CommitRecord:
        # Withdraw this rank's old commit first: a step being re-saved is incomplete until every rank has
        # committed again (and a retried upload is, until this rank's record is written again).
        step_dir.delete_file(record_name(rank))
        files = self._upload_files(step_dir, local_dir, local_files)
        if expected is not None and files != expected.files:
            changed = sorted(r for r in files if files[r] != expected.files.get(r))
            raise CheckpointError(f"{local_dir} changed between the primary and mirror uploads: {changed[:5]}")
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
