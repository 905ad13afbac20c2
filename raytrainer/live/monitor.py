"""The run's monitor: a Ray actor the job driver owns, holding the records rank 0 announces.

Rank 0 sends each record without waiting (one fire-and-forget call per step); the driver takes what is new
twice a second. Owned by the driver like the guardian, it outlives worker-group restarts and dies with the
job. Only the newest `keep` records are held: the metrics files are the record, this is the view.

The other way, it carries the driver's request to pause the run (Ctrl-C, raytrainer.live.pause), which rank 0
reads at most once a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("raytrainer.live")

NAMESPACE = "raytrainer"
_OWNED: dict[str, Any] = {}


def monitor_name(run_name: str) -> str:
    return f"monitor:{run_name}"


class RunMonitor:
    def __init__(self, keep: int = 10_000):
        self.records: list[dict] = []
        self.first = 0  # the index of records[0] among everything ever announced
        self.keep = keep
        self.pause: str | None = None  # why the driver asked the run to checkpoint and end

    def request_pause(self, reason: str) -> None:
        self.pause = self.pause or reason

    def pause_request(self) -> str | None:
        return self.pause

    def push(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) > self.keep:
            drop = len(self.records) - self.keep
            del self.records[:drop]
            self.first += drop

    def take(self, after: int) -> tuple[list[dict], int]:
        """Records announced after the first `after` ones (those dropped meanwhile are skipped), and the
        new count."""
        if after > self.first + len(self.records):  # this actor was restarted: everything it has is new
            after = self.first
        start = max(after - self.first, 0)
        return self.records[start:], self.first + len(self.records)


def start_monitor(run_name: str) -> Any:
    """From the driver, before fit(): the actor rank 0 announces to."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = (
        ray.remote(RunMonitor)
        .options(name=monitor_name(run_name), namespace=NAMESPACE, get_if_exists=True, lifetime=None, num_cpus=0,
                 max_restarts=3, scheduling_strategy=NodeAffinitySchedulingStrategy(
                     ray.get_runtime_context().get_node_id(), soft=True))
        .remote()
    )
    _OWNED[monitor_name(run_name)] = actor
    return actor


def stop_monitor(run_name: str) -> None:
    import ray

    actor = _OWNED.pop(monitor_name(run_name), None)
    if actor is not None:
        ray.kill(actor)


class ForwardToDriver(logging.Handler):
    """Sends this worker's warnings and errors to the driver's view (with its rank): with Ray's per-process
    log streaming off, this is how a rank's warning reaches the person."""

    def __init__(self, announce, rank: int):
        super().__init__(logging.WARNING)
        self.announce = announce
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.announce({"kind": "log", "rank": self.rank, "level": record.levelname, "logger": record.name,
                           "message": record.getMessage()})
        except Exception:  # a log line must never fail the step that logged it
            pass


def announcer(run_name: str):
    """Rank 0's side: a callable that sends a record to the monitor without waiting, or None when the job has
    no monitor (a worker started outside `raytrainer.launch`)."""
    import ray

    try:
        actor = ray.get_actor(monitor_name(run_name), namespace=NAMESPACE)
    except ValueError:
        return None
    broken: list[bool] = []

    def announce(record: dict) -> None:
        if broken:
            return
        try:
            actor.push.remote(record)
        except Exception as e:  # the view is not worth a failed step
            broken.append(True)
            log.warning("live view: cannot reach the run's monitor (%s: %s); the driver's progress stops here, "
                        "the metrics files go on", type(e).__name__, e)

    return announce


def pause_requests(run_name: str, every_s: float = 1.0) -> Callable[[], str | None]:
    """Rank 0's side: a callable that says why the driver asked the run to pause, or None. It never waits: it
    asks the monitor at most every `every_s` seconds and reads the answer at a later call, once it is there (a
    monitor that is restarting or gone costs a step nothing)."""
    import ray

    try:
        actor = ray.get_actor(monitor_name(run_name), namespace=NAMESPACE)
    except ValueError:
        return lambda: None
    asked: list[Any] = [None]  # the question in flight
    last = [-float("inf")]

    def pause_request() -> str | None:
        if asked[0] is not None:
            ready, _ = ray.wait([asked[0]], timeout=0)
            if not ready:
                return None
            try:
                reason = ray.get(ready[0])
            except Exception:  # no monitor, no request: the run goes on
                reason = None
            asked[0] = None
            if reason:
                return reason
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            try:
                asked[0] = actor.pause_request.remote()
            except Exception:
                asked[0] = None
        return None

    return pause_request
