"""The guardian's events log: every decision with its reason, as JSON lines in the run's storage.

Object stores cannot append, so the log is one small object, `<run>/guardian/events.jsonl`, rewritten whole
after each event (only interventions, checkpoints and restores are logged, never healthy steps, so it stays
small). A local write goes to a temporary file and is renamed into place; an S3 PUT replaces the object
atomically. Either way a reader sees the old log or the new one, never half of it.

A log opened on an existing object keeps its lines, so a resubmitted job continues the same log.
The guardian's durable state, `<run>/guardian/state.json` (StateFile), is one object replaced the same way.
Write failures (an S3 outage) never stop training: they are logged and retried with the next event or flush.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

import pyarrow.fs as pafs

from raytrainer.config import Config

log = logging.getLogger("raytrainer.guardian")

EVENTS_FILE = "events.jsonl"
STATE_FILE = "state.json"


class TextStore(Protocol):
    def read_text(self, name: str) -> str | None: ...
    def write_text(self, name: str, text: str) -> None: ...
    def exists(self, name: str) -> bool: ...


class RunStore:
    """A directory in the run's storage (local disk or an object store), written one object at a time."""

    def __init__(self, filesystem: pafs.FileSystem, path: str):
        self.fs = filesystem
        self.path = path.rstrip("/")
        self._local = filesystem.type_name == "local"

    @classmethod
    def local(cls, directory: str | os.PathLike) -> RunStore:
        return cls(pafs.LocalFileSystem(), os.path.abspath(directory))

    @classmethod
    def for_run(cls, cfg: Config, subdir: str = "guardian") -> RunStore:
        """`<checkpoint.storage>/<run.name>/<subdir>`, local (made absolute) or s3:// (checkpoint.s3)."""
        from raytrainer.storage import join, open_filesystem

        # Short timeouts: during an outage a write should fail fast and be retried, not block for minutes.
        fs, root = open_filesystem(cfg.checkpoint.storage, cfg.checkpoint.s3, connect_timeout=10,
                                   request_timeout=30)
        return cls(fs, join(root, cfg.run.name, subdir))

    def _full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._full(name)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._full(name)).type != pafs.FileType.NotFound

    def write_text(self, name: str, text: str) -> None:
        target = self._full(name)
        if not self._local:
            with self.fs.open_output_stream(target) as f:  # one PUT: atomic replace
                f.write(text.encode())
            return
        self.fs.create_dir(os.path.dirname(target), recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, target)

    def __repr__(self) -> str:
        return f"RunStore({self.fs.type_name}:{self.path})"


class MemoryStore:
    """A TextStore in memory (tests, or runs that should leave nothing behind)."""

    def __init__(self):
        self.objects: dict[str, str] = {}

    def read_text(self, name: str) -> str | None:
        return self.objects.get(name)

    def write_text(self, name: str, text: str) -> None:
        self.objects[name] = text

    def exists(self, name: str) -> bool:
        return name in self.objects


class EventLog:
    """Appends events to `events.jsonl` in a store, or hands the whole JSON-lines text to a callable.

    background=True writes from a thread, so a slow or unreachable store never delays a decision;
    `flush()` waits for the write.
    """

    def __init__(self, sink: TextStore | Callable[[str], None], name: str = EVENTS_FILE,
                 background: bool = False):
        self.sink = sink
        self.name = name
        self.lines: list[str] = []
        if not callable(sink):
            self.lines = [line for line in (sink.read_text(name) or "").splitlines() if _valid_json(line)]
        self._written = len(self.lines)  # lines already in storage
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._writer, name="guardian-events", daemon=True)
            self._thread.start()

    def append(self, event: dict) -> None:
        line = json.dumps(event, sort_keys=True, default=str)
        with self._lock:
            self.lines.append(line)
            self._lock.notify_all()
        if self._thread is None:
            self._write()

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Write whatever is pending; True when storage holds every event."""
        if self._thread is None:
            return self._write()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._written < len(self.lines):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self) -> None:
        self.flush(timeout_s=10.0)
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def events(self) -> list[dict]:
        with self._lock:
            return [json.loads(line) for line in self.lines]

    def _write(self) -> bool:
        with self._lock:
            count = len(self.lines)
            if self._written >= count:
                return True
            text = "\n".join(self.lines[:count]) + "\n"
        try:
            if callable(self.sink):
                self.sink(text)
            else:
                self.sink.write_text(self.name, text)
        except Exception as e:  # the log must never stop training
            log.warning("guardian: could not write %s to %s (%s: %s); will retry with the next event",
                        self.name, self.sink, type(e).__name__, e)
            return False
        with self._lock:
            self._written = max(self._written, count)
            self._lock.notify_all()
        return True

    def _writer(self) -> None:
        while True:
            with self._lock:
                while self._written >= len(self.lines) and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
            if not self._write():
                time.sleep(1.0)  # the store is down; try again shortly


class StateFile:
    """One JSON document in a store, replaced whole each time it changes (the guardian's durable state).

    put() never waits for storage: a background thread writes the newest document, so a burst of changes
    costs one write and a slow store never delays a decision; flush() waits until storage holds the latest.
    A failed write is logged and retried, like the events log.
    """

    def __init__(self, store: TextStore, name: str = STATE_FILE):
        self.store = store
        self.name = name
        self._pending: str | None = None
        self._version = 0  # of the newest document put
        self._written = 0  # the version storage holds
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first put(): a reader needs none

    def read(self) -> dict | None:
        """The stored document; None when there is none. A store that cannot be read raises: an outage
        must not look like a run without history."""
        text = self.store.read_text(self.name)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.name} in {self.store} is not JSON ({e}); move it away to start the "
                             "guardian without its history") from None

    def put(self, state: dict) -> None:
        text = json.dumps(state, sort_keys=True, default=str)  # now: the caller may change `state` next
        with self._lock:
            self._pending = text
            self._version += 1
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="guardian-state", daemon=True)
                self._thread.start()

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Wait until storage holds the newest document; False if it does not within timeout_s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._written < self._version:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def _writer(self) -> None:
        while True:
            with self._lock:
                while self._written >= self._version:
                    self._lock.wait()
                text, version = self._pending, self._version
            try:
                self.store.write_text(self.name, text)
            except Exception as e:  # like the log: never stop training; retry shortly
                log.warning("guardian: could not write %s to %s (%s: %s); retrying", self.name, self.store,
                            type(e).__name__, e)
                time.sleep(1.0)
                continue
            with self._lock:
                self._written = max(self._written, version)
                self._lock.notify_all()


def read_events(store: TextStore, name: str = EVENTS_FILE) -> list[dict]:
    """The events of a run, oldest first (for reports)."""
    return [json.loads(line) for line in (store.read_text(name) or "").splitlines() if _valid_json(line)]


def _valid_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
