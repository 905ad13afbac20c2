"""The guardian as a Ray actor: one per run, created by the job driver, consulted by rank 0 every step.

Lifetime: owned by the driver, not detached. Ray Train restarts and resizes worker groups underneath the
driver, which stays up, so an actor the driver owns outlives every worker-group restart and elastic resize,
and it dies with the job, so no stale guardian outlives its run. A resubmitted job creates a fresh actor
that takes its state from the checkpoint it resumes (`load_state_dict`) and continues the events log in
storage. The actor is pinned (softly) to the driver's node, so removing a worker node never takes it down,
and asks for no CPU, so it never competes with a training worker for a slot.

Driver::

    guardian = start_guardian(cfg)            # before TorchTrainer.fit(); keeps the actor alive
    ...
    stop_guardian(cfg.run.name)               # after fit(): flushes the events log

Rank 0 of the worker group::

    guardian = GuardianClient.connect(cfg.run.name)
    decision = guardian.decide(step, stats, cursor)   # one actor round trip per step
"""

from __future__ import annotations

import logging
import time
from typing import Any

from raytrainer.config import Config, GuardianConfig
from raytrainer.fault.events import EventLog, RunStore, TextStore
from raytrainer.fault.guardian import Decision, Guardian, StepReport

log = logging.getLogger("raytrainer.guardian")

NAMESPACE = "raytrainer"
# Actor handles held by this driver: a non-detached actor dies with its last handle.
_OWNED: dict[str, Any] = {}


def actor_name(run_name: str) -> str:
    return f"guardian:{run_name}"


class GuardianActor:
    """The Ray actor: a Guardian plus its events log (written from a background thread)."""

    def __init__(self, guardian_cfg: dict, run_name: str, store: TextStore | None = None):
        self.events_log = EventLog(store, background=True) if store is not None else None
        self.guardian = Guardian(
            GuardianConfig.model_validate(guardian_cfg),
            run_name,
            on_event=self.events_log.append if self.events_log is not None else None,
        )

    def observe(self, report: StepReport) -> Decision:
        decision = self.guardian.observe(report)
        if decision.action == "abort":
            self.flush()  # the job is about to end: the report must reach storage
        return decision

    def on_checkpoint_staged(self, step: int) -> None:
        self.guardian.on_checkpoint_staged(step)

    def on_checkpoint(self, step: int) -> None:
        self.guardian.on_checkpoint(step)

    def checkpoints_exist(self, steps: list[int]) -> None:
        self.guardian.checkpoints_exist(steps)

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        self.guardian.rollback_fell_back(intended, actual, reason)

    def state_dict(self) -> dict:
        return self.guardian.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guardian.load_state_dict(state)

    def skipped_ranges(self) -> list[tuple[int, int]]:
        return self.guardian.skipped_ranges()

    def events(self) -> list[dict]:
        return self.guardian.events

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True if self.events_log is None else self.events_log.flush(timeout_s)

    def ping(self) -> str:
        return self.guardian.run_name


class GuardianClient:
    """Rank 0's handle on the actor: the same methods as `Guardian`, each one actor round trip."""

    def __init__(self, actor: Any, run_name: str = "", timeout_s: float = 120.0):
        self.actor = actor
        self.run_name = run_name
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, run_name: str, wait_s: float = 30.0, timeout_s: float = 120.0) -> GuardianClient:
        """Find the run's guardian (created by the driver before training started)."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            try:
                return cls(ray.get_actor(actor_name(run_name), namespace=NAMESPACE), run_name, timeout_s)
            except ValueError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no guardian actor '{actor_name(run_name)}' in Ray namespace '{NAMESPACE}' after "
                        f"{wait_s:g} s: the driver creates it with raytrainer.fault.guardian_actor."
                        "start_guardian(cfg) before training (or set guardian.enabled=false)"
                    ) from None
                time.sleep(0.5)

    def decide(self, step: int, stats: Any, cursor: dict | None = None, *,
               lr: float | None = None, batch: int | None = None) -> Decision:
        """Report step `step` and get the decision. Call on rank 0 only, then broadcast the decision."""
        return self._call("observe", StepReport.from_stats(step, stats, cursor, lr=lr, batch=batch))

    def on_checkpoint_staged(self, step: int) -> None:
        self._call("on_checkpoint_staged", step)

    def on_checkpoint(self, step: int) -> None:
        self._call("on_checkpoint", step)

    def checkpoints_exist(self, steps: list[int]) -> None:
        self._call("checkpoints_exist", steps)

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        self._call("rollback_fell_back", intended, actual, reason)

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", state)

    def skipped_ranges(self) -> list[tuple[int, int]]:
        return self._call("skipped_ranges")

    @property
    def events(self) -> list[dict]:
        return self._call("events")

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._call("flush", timeout_s)

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"guardian actor '{actor_name(self.run_name)}' did not answer {method}() within "
                f"{self.timeout_s:g} s; is the driver (and the node it runs on) still alive?"
            ) from None


def start_guardian(cfg: Config, store: TextStore | None = None, events: bool = True) -> GuardianClient:
    """Create (or find) the run's guardian actor from the driver; the driver keeps it alive.

    store: where the events log goes; default `<checkpoint.storage>/<run.name>/guardian/` (local or s3://).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if events and store is None:
        store = RunStore.for_run(cfg)
    name = actor_name(cfg.run.name)
    driver_node = ray.get_runtime_context().get_node_id()
    actor = (
        ray.remote(GuardianActor)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime=None,  # owned by the driver: outlives worker groups, dies with the job
            num_cpus=0,
            max_restarts=3,
            max_task_retries=3,
            scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=True),
        )
        .remote(cfg.guardian.model_dump(mode="json"), cfg.run.name, store if events else None)
    )
    ray.get(actor.ping.remote(), timeout=120)  # fail here, before any worker starts, if it cannot start
    _OWNED[name] = actor
    log.info("guardian for run %s is up (events: %s)", cfg.run.name, store if events else "not written")
    return GuardianClient(actor, cfg.run.name)


def stop_guardian(run_name: str, timeout_s: float = 30.0) -> None:
    """Flush the events log and let the actor go (the driver's reference was what kept it alive)."""
    import ray

    actor = _OWNED.pop(actor_name(run_name), None)
    if actor is None:
        return
    try:
        ray.get(actor.flush.remote(timeout_s), timeout=timeout_s + 5)
    finally:
        ray.kill(actor)
