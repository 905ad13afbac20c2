"""Ctrl-C in the driver pauses the run instead of dropping what it trained since its last checkpoint.

The first Ctrl-C asks every rank, through the run's monitor, to checkpoint at the end of its step; the group
ends there and the job with it (exit status 130), and the same command resumes from that checkpoint. A second
Ctrl-C stops at once, as Ray Train does by default (its controller aborts the workers); the run then resumes
from its newest committed checkpoint. A third leaves the driver without waiting for anything.

Ray Train installs its own SIGINT handler when fit() starts its controller; `pause_on_ctrl_c` takes that
handler's place on the trainer (the hook is a private method of Ray 2.60's DataParallelTrainer, so a Ray without
it keeps Ray's own handling and the log says so).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("raytrainer.launch")

CTRL_C = "Ctrl-C in the driver"
EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a job ended by Ctrl-C


class CtrlC:
    """How many times Ctrl-C was pressed during fit(), and what each press did."""

    def __init__(self, monitor: Any, say: Callable[[str], None]):
        self.monitor = monitor
        self.say = say
        self.presses = 0
        self._controller: Any = None
        self._previous: Any = None  # the SIGINT handling before fit() (None: ours was never installed)

    @property
    def paused(self) -> bool:
        return self.presses == 1

    @property
    def stopped_at_once(self) -> bool:
        return self.presses >= 2

    def register(self, controller: Any) -> None:
        """In place of Ray Train's _register_sigint_handler(controller)."""
        self._controller = controller
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self.on_sigint)

    def close(self) -> None:
        """After fit(): Ctrl-C is Python's KeyboardInterrupt again (what the presses did stays as it was)."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.presses += 1
        if self.presses == 1:
            self.monitor.request_pause.remote(CTRL_C)
            self.say("Ctrl-C: every rank checkpoints at the end of its step and the run pauses there (the same "
                     "command resumes it); Ctrl-C again stops at once, losing the steps since the last checkpoint")
        elif self.presses == 2:
            self.say("Ctrl-C again: stopping the workers now; the run resumes from its newest committed checkpoint")
            if self._controller is not None:
                self._controller.abort.remote()
        else:
            sys.exit(EXIT_CODE)


def pause_on_ctrl_c(trainer: Any, monitor: Any, say: Callable[[str], None]) -> CtrlC:
    """Make `trainer.fit()` pause the run on Ctrl-C (see the module docstring); returns what the presses did."""
    ctrl_c = CtrlC(monitor, say)
    if not callable(getattr(trainer, "_register_sigint_handler", None)):
        log.warning("this Ray version's trainer has no _register_sigint_handler: Ctrl-C stops the run at once, as "
                    "Ray Train does, and the run resumes from its newest checkpoint")
        return ctrl_c
    trainer._register_sigint_handler = ctrl_c.register
    return ctrl_c
