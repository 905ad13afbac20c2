"""The guardian as a Ray actor: one per run, created by the job driver, consulted by rank 0 every step.

Lifetime: owned by the driver, not detached. Ray Train restarts and resizes worker groups underneath the
driver, which stays up, so an actor the driver owns outlives every worker-group restart and elastic resize,
and it dies with the job, so no stale guardian outlives its run. The actor is pinned (softly) to the
driver's node, so removing a worker node never takes it down, and asks for no CPU, so it never competes with
a training worker for a slot.

Durable state: after every call that changes what the guardian knows (a skip, rollback or abort, a
checkpoint staged, committed or deleted, a restore, a rollback fallback, a resume after an abort) the actor
puts `Guardian.state_dict()` in `<run>/guardian/state.json` beside the events log, written in the background
(a rollback or abort waits for the write before it is answered); healthy steps write nothing. When Ray
restarts the actor (`max_restarts`) or a resubmitted job creates a fresh one, `__init__` reloads that file
exactly (`Guardian.replace_state`) before answering anything, so known checkpoints, skipped ranges, the
rollback count and an abort survive; the checkpoint a worker group resumes from is then merged in as before
(`load_state_dict`).

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
import sys
import time
import warnings
from typing import Any

from raytrainer.config import Config, GuardianConfig
from raytrainer.fault.events import EventLog, RunStore, StateFile, TextStore
from raytrainer.fault.guardian import Decision, Guardian, StepReport

log = logging.getLogger("raytrainer.guardian")

NAMESPACE = "raytrainer"
# Actor handles held by this driver: a non-detached actor dies with its last handle.
_OWNED: dict[str, Any] = {}


def actor_name(run_name: str) -> str:
    return f"guardian:{run_name}"


class GuardianActor:
    """The Ray actor: a Guardian plus its events log and durable state (written from background threads)."""

    def __init__(self, guardian_cfg: dict, run_name: str, store: TextStore | None = None):
        self.events_log = EventLog(store, background=True) if store is not None else None
        self.state_file = StateFile(store) if store is not None else None
        self._changed = False
        self.guardian = Guardian(GuardianConfig.model_validate(guardian_cfg), run_name, on_event=self._on_event)
        saved = self.state_file.read() if self.state_file is not None else None
        if saved:
            self.guardian.replace_state(saved)
        restarted = _restarted_by_ray()
        if saved or restarted:
            where = f"{store}/{self.state_file.name}" if self.state_file is not None else "no storage"
            known = (f"reloaded its state from {where} ({self.guardian.rollbacks} rollbacks, skipped batches "
                     f"{self.guardian.skipped_ranges() or 'none'}{', aborted' if self.guardian.aborted else ''})"
                     if saved else f"no state had been saved to {where} yet")
            # A restart mid-run is worth a warning: the process died, and any decision not yet written is gone.
            (log.warning if restarted else log.info)("guardian for run %s %s: %s", run_name,
                                                     "restarted by Ray" if restarted else "started", known)

    def observe(self, report: StepReport) -> Decision:
        decision = self.guardian.observe(report)
        if decision.action in ("rollback", "abort") or decision.exclude_nodes:
            # Every rank acts on this at once (and after an abort the job ends): storage must hold it first.
            self._persist_now()
        else:
            self._persist()
        return decision

    def excluded_nodes(self) -> list[str]:
        return self.guardian.excluded_nodes

    def on_checkpoint_staged(self, step: int) -> None:
        self.guardian.on_checkpoint_staged(step)
        self._changed = True  # once per checkpoint: the batch it resumes at is only certain now
        self._persist()

    def on_checkpoint(self, step: int) -> None:
        self.guardian.on_checkpoint(step)
        self._persist()

    def checkpoints_exist(self, steps: list[int]) -> None:
        self.guardian.checkpoints_exist(steps)
        self._persist()

    def rollback_target(self) -> int | None:
        return self.guardian.rollback_target()

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        self.guardian.rollback_fell_back(intended, actual, reason)
        self._persist_now()

    def resume_after_abort(self, reason: str) -> bool:
        """Clear an abort (the person resubmitting said so); True if there was one."""
        was_aborted = self.guardian.aborted
        self.guardian.resume_after_abort(reason)
        self._persist_now()
        return was_aborted

    def state_dict(self) -> dict:
        return self.guardian.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guardian.load_state_dict(state)
        self._persist()

    def skipped_ranges(self) -> list[tuple[int, int]]:
        return self.guardian.skipped_ranges()

    def blacklisted_documents(self) -> list[int]:
        return self.guardian.blacklisted_documents()

    def events(self) -> list[dict]:
        return self.guardian.events

    def flush(self, timeout_s: float = 30.0) -> bool:
        if self.events_log is None or self.state_file is None:
            return True
        return self.events_log.flush(timeout_s) and self.state_file.flush(timeout_s)

    def ping(self) -> str:
        return self.guardian.run_name

    def _on_event(self, event: dict) -> None:
        if self.events_log is not None:
            self.events_log.append(event)
        self._changed = True  # every state change the guardian makes outside healthy steps emits an event

    def _persist(self) -> None:
        """Hand the state to its background writer if it changed since the last time."""
        if not self._changed or self.state_file is None:
            return
        self._changed = False
        self.state_file.put(self.guardian.state_dict())

    def _persist_now(self) -> None:
        self._persist()
        if not self.flush(timeout_s=30.0):
            log.warning("guardian for run %s: its state and events did not reach storage within 30 s; a restart "
                        "of this actor before they do would forget the last decision", self.guardian.run_name)


def _restarted_by_ray() -> bool:
    """Whether this actor's process died and Ray started it again (max_restarts)."""
    ray = sys.modules.get("ray")  # an actor's process has imported it; anything else need not pay for it
    try:
        with warnings.catch_warnings():  # Ray's own property reads its deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray is not None and ray.is_initialized() and bool(
                ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor: a GuardianActor built directly (tests, tools)
        return False


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

    def decide(self, step: int, stats: Any, cursor: dict | None = None, *, lr: float | None = None,
               batch: int | None = None, rerun: Any = None, nodes: list[str] | None = None,
               documents: list | None = None, settled: bool = False) -> Decision:
        """Report step `step` and get the decision. Call on rank 0 only, then broadcast the decision."""
        return self._call("observe", StepReport.from_stats(step, stats, cursor, lr=lr, batch=batch, rerun=rerun,
                                                           nodes=nodes, documents=documents, settled=settled))

    def excluded_nodes(self) -> list[str]:
        return self._call("excluded_nodes")

    def on_checkpoint_staged(self, step: int) -> None:
        self._call("on_checkpoint_staged", step)

    def on_checkpoint(self, step: int) -> None:
        self._call("on_checkpoint", step)

    def checkpoints_exist(self, steps: list[int]) -> None:
        self._call("checkpoints_exist", steps)

    def rollback_target(self) -> int | None:
        return self._call("rollback_target")

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        self._call("rollback_fell_back", intended, actual, reason)

    def state_dict(self) -> dict:
        return self._call("state_dict")

    def load_state_dict(self, state: dict) -> None:
        self._call("load_state_dict", state)

    def resume_after_abort(self, reason: str) -> bool:
        return self._call("resume_after_abort", reason)

    def skipped_ranges(self) -> list[tuple[int, int]]:
        return self._call("skipped_ranges")

    def blacklisted_documents(self) -> list[int]:
        return self._call("blacklisted_documents")

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


def read_guardian_state(cfg: Config, store: TextStore | None = None) -> dict | None:
    """The run's durable guardian state (`<run>/guardian/state.json`), or None when it has none: what the
    driver looks at before any actor or worker starts."""
    return StateFile(store if store is not None else RunStore.for_run(cfg)).read()


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
    log.debug("guardian for run %s is up (events: %s)", cfg.run.name, store if events else "not written")
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
