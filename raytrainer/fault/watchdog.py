"""A per-worker step watchdog: a stuck step ends the process instead of hanging the job forever.

A rank stuck in a collective (a peer died mid all-reduce, a NIC hung, a storage call never returns) blocks
without an error. The loop arms the watchdog around every step; if a step runs past `timeout_s`
(guardian.step_timeout_s) a thread logs which rank and step, dumps every thread's stack and calls
`os._exit(WATCHDOG_EXIT_CODE)`. Ray Train sees a dead worker and restarts the group from the last checkpoint.

    watchdog = StepWatchdog(cfg.guardian.step_timeout_s, rank)
    with watchdog.step(step):
        ...one training step...
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("raytrainer.guardian")

WATCHDOG_EXIT_CODE = 86  # "a step timed out": distinct from crashes (1), signals (128+n) and injected crashes


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, exit_fn: Callable[[int], None] = os._exit):
        if timeout_s <= 0:
            raise ValueError(f"guardian.step_timeout_s={timeout_s} must be positive")
        self.timeout_s = timeout_s
        self.rank = rank
        self.exit_fn = exit_fn
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._step: int | None = None
        self._armed_at = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.fired = False

    @contextmanager
    def step(self, step: int, timeout_s: float | None = None) -> Iterator[None]:
        """Arm for one step (`timeout_s` overrides the default, e.g. for a first step that compiles)."""
        self.arm(step, timeout_s)
        try:
            yield
        finally:
            self.disarm()

    def arm(self, step: int, timeout_s: float | None = None) -> None:
        with self._cond:
            self._step = step
            self._armed_at = time.monotonic()
            self._deadline = self._armed_at + (timeout_s or self.timeout_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name=f"step-watchdog-rank{self.rank}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._step = None
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                step, elapsed = self._step, time.monotonic() - self._armed_at
                self._deadline = None
                self.fired = True
                break
            else:
                return
        self._fire(step, elapsed)

    def _fire(self, step: int | None, elapsed: float) -> None:
        message = (
            f"raytrainer watchdog: rank {self.rank} stuck in step {step} for {elapsed:.1f} s "
            f"(guardian.step_timeout_s={self.timeout_s:g}); exiting with code {WATCHDOG_EXIT_CODE} so "
            "Ray Train restarts the worker group from the last checkpoint. Stacks of every thread follow."
        )
        log.error(message)
        print(message, file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError):
            pass  # stderr may be closed or not a real file; the message above is what matters
        sys.stderr.flush()
        self.exit_fn(WATCHDOG_EXIT_CODE)
        with self._cond:  # only reached when exit_fn returns (tests): a later arm starts a fresh thread
            self._thread = None
