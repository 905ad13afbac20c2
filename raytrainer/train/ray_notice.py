"""Where a Ray worker learns it is about to be stopped: a SIGTERM to its process, or Ray's notice that its node is
being drained for preemption. Both go into a raytrainer.fault.preemption.StopNotice that the loop reads.

A Ray worker runs the train function in a thread of its own, where signal.signal() is refused; the process's
main thread handles SIGTERM with a handler that exits at once, through `raise_sys_exit_with_custom_error_message`
in ray._private.worker (main_loop's sigterm_handler looks that name up when the signal comes). The notice takes
that one name's place: the first SIGTERM is recorded and the handler returns, so the process goes on and the
group checkpoints at the end of the step; a second SIGTERM exits at once, as before. The handler runs in the
middle of whatever Ray's main thread was doing, so it does nothing but set the notice: no logging (a worker's
warnings go to the driver through a Ray actor call, which from there corrupts Ray's task context) and no lock.
Holding the main thread until the checkpoint is done is no option either: Ray Train's report barrier waits on
actor calls that only the main thread serves. In a process's main thread (no Ray worker), an ordinary signal
handler records the notice the same way.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from raytrainer.fault.preemption import StopNotice

log = logging.getLogger("raytrainer.train")

SIGTERM_REASON = "SIGTERM"


def watch_for_stop(notice: StopNotice) -> Callable[[], None]:
    """Route this process's SIGTERM into `notice`; returns the function that puts the old handling back. The loop
    says so in the log when it sees the notice (never the handler: see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: Any) -> None:
            if notice.told:
                signal.signal(signal.SIGTERM, previous)
                signal.raise_signal(signal.SIGTERM)
                return
            notice.notify(SIGTERM_REASON)

        signal.signal(signal.SIGTERM, on_sigterm)
        return lambda: signal.signal(signal.SIGTERM, previous)

    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    if original is None:
        log.warning("this Ray version's workers handle SIGTERM without ray._private.worker."
                    "raise_sys_exit_with_custom_error_message: a SIGTERM'd worker stops at once and the run resumes "
                    "from its last scheduled checkpoint")
        return lambda: None

    def on_exit(message: str, *args: Any, **kwargs: Any) -> Any:
        if "SIGTERM" in str(message) and not notice.told:
            notice.notify(SIGTERM_REASON)
            return None
        return original(message, *args, **kwargs)

    ray_worker.raise_sys_exit_with_custom_error_message = on_exit
    return lambda: setattr(ray_worker, "raise_sys_exit_with_custom_error_message", original)


def ray_drain_notice() -> str | None:
    """Ray Train's preemption notice for this worker group (a node of it is being drained), if any. Read from
    this worker's own context, which Ray Train's preemption watcher marks on every worker: no collective."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except Exception:  # not in a Ray Train worker, or a Ray version without the notice
        return None
    if info is None:
        return None
    return f"Ray is draining node(s) {', '.join(info.preempted_node_ids)} for preemption{_deadline(info.deadline_ms)}"


def _deadline(deadline_ms: int | None) -> str:
    if not deadline_ms:
        return ""
    at = time.gmtime(deadline_ms / 1000)
    return f" by {time.strftime('%H:%M:%S', at)} UTC (in {deadline_ms / 1000 - time.time():.0f} s)"
