"""Rank 0's background bookkeeping: notice when every rank has committed a step; pin, unpin and delete.

None of it ever blocks a training step. The training thread queues work (`watch`, `pin`, `delete`) and
collects what finished (`committed()`); storage is touched only from this thread. A watched step is
checked by listing its own `_commit/` directory, never the whole run. A watched step that is still
incomplete when a newer one completes was torn (some rank's upload failed) and is deleted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from raytrainer.checkpoint.store import CheckpointStore

log = logging.getLogger("raytrainer.checkpoint")

POLL_S = 0.1  # the first check of a pending step; later checks back off to MAX_POLL_S
MAX_POLL_S = 2.0


class Housekeeper:
    def __init__(self, store: CheckpointStore, poll_s: float = POLL_S):
        self.store = store
        self.poll_s = poll_s
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._committed: list[int] = []  # complete steps not yet collected by the training thread
        self._torn: list[int] = []
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._next_check: dict[int, tuple[float, float]] = {}  # step -> (next check time, back-off)

    # ---- from the training thread

    def watch(self, step: int) -> None:
        """Report `step` through committed() once every rank has committed it."""
        self._put(("watch", step))

    def pin(self, step: int, reason: str) -> None:
        self._put(("pin", step, reason))

    def unpin(self, step: int) -> None:
        self._put(("unpin", step))

    def delete(self, step: int) -> None:
        self._put(("delete", step))

    def committed(self) -> list[int]:
        """Steps found complete since the last call, oldest first."""
        with self._lock:
            out, self._committed = sorted(self._committed), []
        return out

    def torn(self) -> list[int]:
        """Watched steps given up on (a newer step completed first), since the last call."""
        with self._lock:
            out, self._torn = self._torn, []
        return out

    def flush(self, timeout_s: float | None = None, include_watches: bool = True) -> bool:
        """Wait until every queued job is done (and, with include_watches, every watched step resolved)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._jobs.unfinished_tasks == 0 and (not include_watches or self._idle.is_set()):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            if self._thread is None or not self._thread.is_alive():
                return self._jobs.unfinished_tasks == 0
            time.sleep(0.02)

    def close(self, timeout_s: float = 60.0) -> None:
        if self._thread is None:
            return
        self.flush(timeout_s, include_watches=False)
        self._stop = True
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)
        self._thread = None

    # ---- the thread

    def _put(self, job: tuple) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="checkpoint-housekeeping", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        watching: list[int] = []
        while not self._stop:
            try:
                job = self._jobs.get(timeout=self.poll_s if watching else None)
            except queue.Empty:
                job = ()
            try:
                if job is None:
                    return
                if job:
                    self._do(job, watching)
                if watching:
                    self._check(watching)
            except Exception as e:  # housekeeping never fails a run; the next job retries what it needs
                log.warning("checkpoint housekeeping: %s failed: %s", job[0] if job else "a check", e)
            finally:
                if watching:
                    self._idle.clear()
                else:
                    self._idle.set()
                if job != ():
                    self._jobs.task_done()

    def _do(self, job: tuple, watching: list[int]) -> None:
        kind, step = job[0], job[1]
        if kind == "watch":
            self._next_check.pop(step, None)
            if step not in watching:
                watching.append(step)
                self._idle.clear()
        elif kind == "pin":
            self.store.pin(step, job[2])
        elif kind == "unpin":
            self.store.unpin(step)
        elif kind == "delete":
            if step in watching:
                watching.remove(step)
            self.store.delete(step)

    def _check(self, watching: list[int]) -> None:
        now = time.monotonic()
        for step in sorted(watching):
            due, wait = self._next_check.get(step, (0.0, self.poll_s))
            if now < due:
                continue
            self._next_check[step] = (now + wait, min(2 * wait, MAX_POLL_S))
            if self.store.is_complete(step):
                watching.remove(step)
                older = [s for s in watching if s < step]
                for s in older:
                    watching.remove(s)
                with self._lock:
                    self._committed.append(step)
                    self._torn.extend(older)
