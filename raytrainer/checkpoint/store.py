"""The run's checkpoints in storage, each one complete or invisible (see `records` for the layout).

Finding checkpoints never lists the run recursively: the step directories are listed by name (one
non-recursive listing, one request on S3 for up to 1,000 steps), and only the steps being asked about are
opened. Downloads check every sha256 on the way in, so a corrupted file is caught at load time too. With a
mirror, reads use it when the primary is unreachable, incomplete or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from raytrainer.checkpoint.records import (
    CHECKPOINTS_DIR,
    COMMIT_DIR,
    DAMAGED_FILE,
    PIN_FILE,
    STEP_DIR,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointInfo,
    CheckpointNotFound,
    CommitRecord,
    LoadedCheckpoint,
    StepState,
    Verification,
    read_step_state,
    step_dir_name,
)
from raytrainer.checkpoint.writer import CheckpointWriter
from raytrainer.config import S3Config
from raytrainer.storage import Storage, StorageError, open_storage

log = logging.getLogger("raytrainer.checkpoint")


@dataclass
class PassedOver:
    """A checkpoint newer than the one chosen that could not be used, and why."""

    step: int
    problems: list[str]

    def describe(self) -> str:
        return f"step {self.step}: {'; '.join(self.problems[:3])}"


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
        upload_retry_s: float = 0.0,
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
        self.writer = CheckpointWriter(self.primary, self.mirror, io_threads, max_pending, upload_retry_s)

    def __repr__(self) -> str:
        mirror = f", mirror={self.mirror.url}" if self.mirror else ""
        return f"CheckpointStore({self.primary.url}{mirror})"

    # ---- paths

    @property
    def fs(self):
        return self.primary.fs

    def step_path(self, step: int) -> str:
        """The step's directory as a path on `self.fs`."""
        return self.primary.path(step_dir_name(step))

    def step_url(self, step: int) -> str:
        return self.primary.uri(step_dir_name(step))

    def _locations(self) -> list[tuple[str, Storage]]:
        return [("primary", self.primary)] + ([("mirror", self.mirror)] if self.mirror else [])

    # ---- saving (this process's part of a checkpoint; see CheckpointWriter)

    def save_rank(self, step: int, local_dir: str | os.PathLike, rank: int, world_size: int,
                  metadata: dict[str, Any] | None = None, save_id: str | None = None,
                  delete_local: bool = False) -> CommitRecord:
        return self.writer.save_rank(step, local_dir, rank, world_size, metadata, save_id, delete_local)

    def save_rank_async(self, step: int, local_dir: str | os.PathLike, rank: int, world_size: int,
                        metadata: dict[str, Any] | None = None, save_id: str | None = None,
                        delete_local: bool = False, write_first: Callable[[], None] | None = None) -> None:
        self.writer.save_rank_async(step, local_dir, rank, world_size, metadata, save_id, delete_local, write_first)

    def wait(self) -> list[CommitRecord]:
        """Block until this process's queued uploads are done; raise the first failure."""
        return self.writer.wait()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- finding steps

    def _step_numbers(self) -> dict[str, list[int] | StorageError]:
        """Step numbers at each location, from one non-recursive listing each; an unreachable location maps
        to its error. Raises when no location can be listed: an outage must not look like a fresh start."""
        out: dict[str, list[int] | StorageError] = {}
        for where, storage in self._locations():
            try:
                names = storage.listdir()
                out[where] = sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)
            except OSError as e:
                out[where] = StorageError(f"cannot list checkpoints at {storage.url}: {e}", url=storage.url)
                log.warning("%s", out[where])
        if all(isinstance(v, StorageError) for v in out.values()):
            raise next(iter(out.values()))
        return out

    @staticmethod
    def _union(numbers: dict[str, list[int] | StorageError]) -> list[int]:
        return sorted({s for v in numbers.values() if isinstance(v, list) for s in v})

    def _states(self, step: int, numbers: dict | None = None) -> list[tuple[str, Storage, StepState]]:
        """The step's state at each location that lists it (primary first)."""
        numbers = numbers if numbers is not None else self._step_numbers()
        found, errors = [], []
        for where, storage in self._locations():
            listed = numbers.get(where)
            if not isinstance(listed, list) or step not in listed:
                continue
            try:
                state = read_step_state(storage, step)
                if state.listing:  # S3 servers such as SeaweedFS keep listing a deleted step's emptied prefix
                    found.append((where, storage, state))
            except OSError as e:
                errors.append(StorageError(f"cannot read checkpoint step {step} at {storage.url}: {e}",
                                           url=storage.url))
                log.warning("%s", errors[-1])
        if errors and not found:
            raise errors[0]  # unreadable is not absent: an outage must not look like a fresh start
        return found

    def _complete_state(self, step: int, numbers: dict | None = None) -> tuple[str, Storage, StepState] | None:
        return next(((w, s, st) for w, s, st in self._states(step, numbers) if st.complete), None)

    def list(self) -> list[CheckpointInfo]:
        """Every step seen at any location, oldest first, with whether (and where) it is complete."""
        numbers = self._step_numbers()
        infos = []
        for step in self._union(numbers):
            states = self._states(step, numbers)
            if not states:
                continue
            where, _, state = next(((w, s, st) for w, s, st in states if st.complete), states[0])
            pinned = any(st.pinned for _, _, st in states)
            infos.append(CheckpointInfo(step, state.complete, where, state.world_size, sorted(state.records),
                                        pinned, state.problems))
        return infos

    def steps(self) -> list[int]:
        """Complete steps, oldest first."""
        numbers = self._step_numbers()
        return [s for s in self._union(numbers) if self._complete_state(s, numbers) is not None]

    def step_numbers(self) -> list[int]:
        """Every step directory at any location, complete or not, oldest first."""
        return self._union(self._step_numbers())

    def is_complete(self, step: int) -> bool:
        return self._complete_state(step) is not None

    def find_latest(self, before_step: int | None = None) -> tuple[int | None, list[PassedOver]]:
        """The newest complete step (strictly before `before_step` if given), and the newer steps it passed
        over with what is wrong with each. Opens steps newest first and stops at the first complete one."""
        numbers = self._step_numbers()
        passed: list[PassedOver] = []
        for step in reversed(self._union(numbers)):
            if before_step is not None and step >= before_step:
                continue
            states = self._states(step, numbers)
            if any(st.complete for _, _, st in states):
                return step, passed
            passed.append(PassedOver(step, [p for _, _, st in states for p in st.problems] or ["unreadable"]))
        return None, passed

    def latest_complete(self, before_step: int | None = None) -> int | None:
        return self.find_latest(before_step)[0]

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
            state = read_step_state(storage, step)
        except OSError as e:
            return Verification(step, location, full, [f"cannot read {storage.uri(step_dir_name(step))}: {e}"])
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
                    return (f"{step_dir.uri(rel)}: sha256 {sha[:16]}... ({size} bytes) differs from the "
                            f"committed {entry['sha256'][:16]}... ({entry['size']} bytes)")
                return None

            with ThreadPoolExecutor(max_workers=self.io_threads) as pool:
                problems += [p for p in pool.map(check, files.items()) if p]
        return Verification(step, location, full, problems, len(files))

    def _not_found(self, step: int) -> str:
        where = " or ".join(s.uri(step_dir_name(step)) for _, s in self._locations())
        return f"no complete checkpoint for step {step} at {where}"

    # ---- loading

    def download(self, step: int, local_dir: str | os.PathLike, rank: int | None = None,
                 include: Iterable[str] = (), select: Callable[[str], bool] | None = None) -> LoadedCheckpoint:
        """Fetch a complete checkpoint into local_dir, checking every sha256 on the way.

        With neither rank, include nor select, every file; otherwise the files rank r committed (with
        rank=r) plus those matching any `include` glob (e.g. ".metadata" or "*.json") or accepted by
        `select`. The primary is tried first; the mirror is used when the primary copy is incomplete,
        unreadable or corrupt."""
        local_dir = Path(local_dir)
        include = list(include)
        errors = []
        corrupt = False
        for where, storage, state in self._states(step):
            try:
                if not state.complete:
                    errors.append(f"{where}: " + "; ".join(state.problems[:3]))
                    continue
                return self._fetch(where, storage, state, local_dir, rank, include, select)
            except (OSError, CheckpointError) as e:
                corrupt = corrupt or isinstance(e, CheckpointCorrupt)
                errors.append(f"{where}: {e}")
                log.warning("checkpoint step %d: %s copy not usable (%s)%s", step, where, e,
                            "; trying the mirror" if where == "primary" and self.mirror else "")
        detail = ("; ".join(errors)) if errors else "it does not exist"
        exc = CheckpointCorrupt if corrupt else CheckpointNotFound
        raise exc(f"cannot load checkpoint step {step} from {self.primary.url}"
                  f"{' or ' + self.mirror.url if self.mirror else ''}: {detail}")

    def _fetch(self, where: str, storage: Storage, state: StepState, local_dir: Path, rank: int | None,
               include: list[str], select: Callable[[str], bool] | None) -> LoadedCheckpoint:
        files = state.files()
        if rank is not None or include or select is not None:
            if rank is not None and rank not in state.records:
                raise CheckpointError(f"rank={rank} is outside the checkpoint's world_size {state.world_size}")
            wanted = set(state.records[rank].files if rank is not None else ()) | {
                r for r in files if any(fnmatch(r, p) for p in include) or (select is not None and select(r))
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
        return LoadedCheckpoint(state.step, where, local_dir, state.world_size or 0, state.records, sorted(files))

    def read_json(self, step: int, name: str) -> Any:
        """A JSON file of a complete checkpoint, checked against its commit record when listed there."""
        errors = []
        for where, storage, state in self._states(step):
            try:
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
                        f"{storage.uri(step_dir_name(step), name)} does not match its commit record")
                return json.loads(data)
            except CheckpointNotFound:
                raise
            except (OSError, CheckpointError, ValueError) as e:
                errors.append(f"{where}: {e}")
        raise CheckpointNotFound(f"{self._not_found(step)} ({'; '.join(errors) or 'nothing there'})")

    # ---- pins and deletion

    def pin(self, step: int, reason: str = "") -> None:
        """Mark a step as never to be pruned (at every location that has it)."""
        payload = json.dumps({"step": step, "reason": reason, "time": time.time()}).encode()
        done = False
        for where, storage in self._locations():
            step_dir = storage.child(step_dir_name(step))
            try:
                if step_dir.listdir(COMMIT_DIR):
                    step_dir.write_bytes(PIN_FILE, payload)
                    done = True
            except OSError as e:
                if where == "primary":
                    raise CheckpointError(f"cannot pin step {step} at {step_dir.url}: {e}") from e
                log.warning("cannot pin step %d on the mirror %s: %s", step, step_dir.url, e)
        if not done:
            raise CheckpointNotFound(f"cannot pin step {step}: {self._not_found(step)}")

    def mark_damaged(self, step: int, reason: str) -> None:
        """Record that a load found step `step` damaged: it is never offered again, and `inspect` shows why."""
        payload = json.dumps({"step": step, "reason": reason, "time": time.time()}).encode()
        for _, storage in self._locations():
            step_dir = storage.child(step_dir_name(step))
            try:
                if step_dir.listdir():
                    step_dir.write_bytes(DAMAGED_FILE, payload)
            except OSError as e:
                log.warning("cannot mark checkpoint step %d damaged at %s: %s", step, step_dir.url, e)

    def unpin(self, step: int) -> None:
        for _, storage in self._locations():
            storage.child(step_dir_name(step)).delete_file(PIN_FILE)

    def pinned(self) -> set[int]:
        out = set()
        for step in self.step_numbers():
            for _, storage in self._locations():
                if storage.child(step_dir_name(step)).size(PIN_FILE) is not None:
                    out.add(step)
        return out

    def delete(self, step: int) -> None:
        """Remove a step everywhere: commit records first, so a half-deleted checkpoint is never complete."""
        for _, storage in self._locations():
            step_dir = storage.child(step_dir_name(step))
            step_dir.delete_tree(COMMIT_DIR)
            step_dir.delete_tree()

    def prune(self, keep_last: int, keep_every: int | None = None, protect: Iterable[int] = ()) -> list[int]:
        """Delete what retention does not keep (see `retention.doomed`); returns the deleted steps. Steps in
        `protect` are kept too. Skipped while any location is unreachable: deciding from one side's view
        could delete the only good copy, and housekeeping can wait."""
        from raytrainer.checkpoint.retention import doomed

        numbers = self._step_numbers()
        unreachable = [v for v in numbers.values() if isinstance(v, StorageError)]
        if unreachable:
            log.warning("prune skipped: %s", unreachable[0])
            return []
        listed = self._union(numbers)
        complete, pinned = [], set(protect)
        for step in listed:
            states = self._states(step, numbers)
            if any(st.complete for _, _, st in states):
                complete.append(step)
            if any(st.pinned for _, _, st in states):
                pinned.add(step)
        gone = doomed(listed, complete, keep_last, keep_every, pinned)
        for step in gone:
            self.delete(step)
        if gone:
            log.info("pruned checkpoints %s", gone)
        return gone


__all__ = ["CheckpointStore", "PassedOver"]
