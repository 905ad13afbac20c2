"""A guardian abort ends the run: Ray Train must not restart the worker group for it.

Ray Train V2's controller sends every worker error to a failure policy, which answers RETRY (a new worker
group, up to FailureConfig.max_failures; forever with -1) or RAISE (the run ends with that error): see
ray/train/v2/_internal/execution/controller/controller.py, where a poll with errors calls
`self._failure_policy.make_decision(...)` and `_execute_failure_decision` turns RAISE into
ShuttingDownState -> ErroredState. The error is a WorkerGroupError whose `worker_failures` maps each
failed rank to a UserExceptionWithTraceback that wraps the exception the worker raised.

`GuardianAbortPolicy` wraps the policy Ray builds (DefaultFailurePolicy) and answers RAISE as soon as any
rank raised GuardianAbort, and RETRY without counting a failure when a rank raised Preempted (the group
checkpointed on a stop notice: nothing failed); every other error goes to Ray's policy unchanged.
FailureConfig takes no policy in Ray 2.60; DataParallelTrainer.fit (ray/train/v2/api/data_parallel_trainer.py)
builds one with `create_failure_policy(failure_config)` and passes it as `failure_policy=` to
`_initialize_and_run_controller`, which starts the controller actor with it. `end_runs_on_guardian_abort`
wraps that one call of the trainer it is given.

The policy is unpickled in the controller actor, so this module imports no torch.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy

from raytrainer.fault.guardian import GuardianAbort
from raytrainer.fault.preemption import Preempted

log = logging.getLogger("raytrainer.guardian")


def guardian_abort_in(error: BaseException | None) -> GuardianAbort | None:
    """The GuardianAbort a worker raised, if `error` (Ray Train's error for the run) carries one."""
    return _raised(error, GuardianAbort)


def preempted_in(error: BaseException | None) -> Preempted | None:
    """The Preempted a worker raised, if `error` carries one."""
    return _raised(error, Preempted)


def _raised(error: BaseException | None, kind: type) -> Any:
    failures = getattr(error, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        found = _unwrap(failure, kind)
        if found is not None:
            return found
    return _unwrap(error, kind)


def _unwrap(error: BaseException | None, kind: type = GuardianAbort) -> Any:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        # Ray Train wraps a worker's exception as UserExceptionWithTraceback(exc, traceback_str).
        error = getattr(error, "_base_exc", None) or error.__cause__
    return None


class GuardianAbortPolicy(FailurePolicy):
    """RAISE on a guardian abort; anything else is decided by the policy Ray built (`inner`)."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        if guardian_abort_in(training_failed_error) is None:
            if preempted_in(training_failed_error) is not None:
                log.warning("the worker group stopped on a stop notice after checkpointing (%s); starting the next "
                            "one from that checkpoint, not counted against parallel.max_failures",
                            (str(preempted_in(training_failed_error)).splitlines() or [""])[0])
                return FailureDecision.RETRY
            return self.inner.make_decision(training_failed_error)
        ranks = sorted(r for r, e in (getattr(training_failed_error, "worker_failures", None) or {}).items()
                       if _unwrap(e) is not None)
        log.warning("the guardian aborted the run (ranks %s raised GuardianAbort): ending it without a restart, "
                    "whatever parallel.max_failures says; the driver prints the incident report", ranks)
        return FailureDecision.RAISE


def end_runs_on_guardian_abort(trainer: Any) -> Any:
    """Make `trainer.fit()` start Ray Train's controller with GuardianAbortPolicy around Ray's own policy."""
    run_controller = trainer._initialize_and_run_controller  # the trainer's own, overrides included

    def run_controller_ending_on_abort(**controller_init_kwargs: Any) -> Any:
        inner = controller_init_kwargs.get("failure_policy")
        if not isinstance(inner, FailurePolicy):
            # Without the policy a guardian abort would be retried, forever with max_failures=-1.
            raise RuntimeError(
                "this Ray version no longer hands DataParallelTrainer's failure policy to "
                "_initialize_and_run_controller (failure_policy=...): raytrainer.train.ray_failure must be "
                "updated before a guardian abort can end a run")
        controller_init_kwargs["failure_policy"] = GuardianAbortPolicy(inner)
        return run_controller(**controller_init_kwargs)

    trainer._initialize_and_run_controller = run_controller_ending_on_abort
    return trainer
