"""Notice that a worker is about to be stopped, and what the run does with it.

A spot reclaim or a scheduler's SIGTERM gives a worker seconds to minutes before it is gone. Every step,
each rank tells the others whether it has been told (one flag in the step's own collective, so it costs
nothing); when any has, every rank finishes the step, the whole group checkpoints at once and waits until the
checkpoint is committed, and the group ends with `Preempted`. Ray Train places the next group from that
checkpoint (elastically, without a node that is gone), so a preemption loses no step taken before the notice,
instead of the interval since the last scheduled checkpoint.

    notice = StopNotice()
    notice.notify("SIGTERM")          # from a signal handler, or Ray's drain notice (raytrainer.train.ray_notice)
    notice.reason()                   # None until told
"""

from __future__ import annotations

from collections.abc import Callable


class Preempted(RuntimeError):
    """A rank was told to stop: the group checkpointed and ended; the run goes on from that checkpoint."""


class StopNotice:
    """Whether this worker has been told to stop, and why (the first reason is kept)."""

    def __init__(self, sources: tuple[Callable[[], str | None], ...] = ()):
        self._reason: str | None = None
        self._sources = sources  # polled on each reason(): e.g. Ray's notice that this node is being drained

    def notify(self, reason: str) -> None:
        """Safe in a signal handler: one assignment, no lock, no logging."""
        if self._reason is None:
            self._reason = reason

    @property
    def told(self) -> bool:
        """Whether a reason is recorded (without asking the sources)."""
        return self._reason is not None

    def reason(self) -> str | None:
        if self._reason is None:
            for source in self._sources:
                found = source()
                if found:
                    self.notify(found)
                    break
        return self._reason
