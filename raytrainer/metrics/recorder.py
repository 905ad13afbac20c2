"""Rank 0's metrics recorder: `log()` only appends to a buffer; a background thread hands batches to every
sink each `metrics.flush_every_s` seconds (and when asked to, at each checkpoint and at the end).

A sink that cannot be written (bucket gone, disk full, a tracking server down) costs one warning, keeps its
unwritten records (up to `max_pending`) and is tried again at the next flush; training never waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from raytrainer.metrics.sinks import Sink

log = logging.getLogger("raytrainer.metrics")


class _SinkQueue:
    def __init__(self, sink: Sink, max_pending: int):
        self.sink = sink
        self.pending: list[dict] = []
        self.max_pending = max_pending
        self.failing = False
        self.dropped = 0

    def add(self, records: list[dict]) -> None:
        self.pending.extend(records)
        overflow = len(self.pending) - self.max_pending
        if overflow > 0:  # a sink down for hours must not grow the trainer's memory without bound
            del self.pending[:overflow]
            self.dropped += overflow

    def drain(self) -> None:
        if not self.pending:
            return
        batch = self.pending
        try:
            self.sink.write(batch)
        except Exception as e:  # a metrics sink must never stop training
            if not self.failing:
                log.warning("metrics: cannot write to %s (%s: %s); training goes on, and the %s records are "
                            "kept and retried at each flush", self.sink.name, type(e).__name__, e, self.sink.name)
            self.failing = True
            return
        self.pending = self.pending[len(batch):]
        if self.failing:
            lost = f" ({self.dropped} of the oldest records were dropped while it was down)" if self.dropped else ""
            log.warning("metrics: %s is written again%s", self.sink.name, lost)
        self.failing, self.dropped = False, 0


class MetricsRecorder:
    def __init__(self, sinks: Sequence[Sink], attempt: str, flush_every_s: float = 10.0,
                 max_pending: int = 200_000):
        self.attempt = attempt
        self.flush_every_s = flush_every_s
        self._queues = [_SinkQueue(s, max_pending) for s in sinks]
        self._buffer: list[dict] = []
        self._cond = threading.Condition()
        self._flush_requested = 0  # flush generations asked for / done
        self._flush_done = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="metrics-recorder", daemon=True)
        self._thread.start()

    @property
    def sinks(self) -> list[Sink]:
        return [q.sink for q in self._queues]

    def log(self, kind: str, **fields) -> dict:
        """Record one event; returns the record (with `kind`, `attempt`, `time`)."""
        record = {"kind": kind, "attempt": self.attempt, "time": time.time(), **fields}
        with self._cond:
            self._buffer.append(record)
        return record

    def flush(self, timeout_s: float | None = None) -> bool:
        """Hand everything logged so far to the sinks. With a timeout, wait at most that long for it; True
        when the flush happened (whether or not every sink took it)."""
        with self._cond:
            self._flush_requested += 1
            wanted = self._flush_requested
            self._cond.notify_all()
            if timeout_s is None or timeout_s <= 0:
                return False
            deadline = time.monotonic() + timeout_s
            while self._flush_done < wanted and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._flush_done >= wanted

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=max(1.0, timeout_s / 3))
        for q in self._queues:
            try:
                q.sink.close()
            except Exception as e:
                log.warning("metrics: closing %s failed (%s: %s)", q.sink.name, type(e).__name__, e)
            if q.pending:
                log.warning("metrics: %d records could not be written to %s before the run ended",
                            len(q.pending), q.sink.name)

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_every_s
                while not self._closed and self._flush_done >= self._flush_requested:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                wanted = self._flush_requested
                batch, self._buffer = self._buffer, []
                closed = self._closed
            for q in self._queues:
                q.add(batch)
                q.drain()
            with self._cond:
                self._flush_done = max(self._flush_done, wanted)
                self._cond.notify_all()
            if closed:
                return


class NullRecorder:
    """Ranks other than 0, and runs with metrics off: records nothing."""

    attempt = ""
    sinks: list[Sink] = []

    def log(self, kind: str, **fields) -> dict:
        return {"kind": kind, **fields}

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        pass
