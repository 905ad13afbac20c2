"""The guardian's durable state: persisted at each decision that changes it, reloaded exactly by a restarted
actor, read by the driver before a resubmitted run starts; and a guardian actor killed mid-run on Ray."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import pytest

from raytrainer.config import Config, GuardianConfig
from raytrainer.fault.events import STATE_FILE, MemoryStore, RunStore, read_events
from raytrainer.fault.guardian import Guardian, StepReport
from raytrainer.fault.guardian_actor import GuardianActor, read_guardian_state
from runs import make_dataset, micro_config

GUARDIAN = GuardianConfig(warmup_exempt_steps=0, min_window=4, window=16, skips_before_rollback=1,
                          rollback_skip_batches=2, max_rollbacks=1, rerun=False)


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.writes: dict[str, int] = {}

    def write_text(self, name: str, text: str) -> None:
        self.writes[name] = self.writes.get(name, 0) + 1
        super().write_text(name, text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor(store) -> GuardianActor:
    return GuardianActor(GUARDIAN.model_dump(mode="json"), "durable", store)


def report(step: int, bad: bool = False) -> StepReport:
    return StepReport(step, math.nan if bad else 3.0 + 0.01 * (step % 3), 1.0)


def healthy(a: GuardianActor, steps: range) -> None:
    for step in steps:
        assert a.observe(report(step)).action == "continue", step


def test_state_is_persisted_at_decisions_only_and_a_restarted_actor_reloads_it_exactly():
    store = CountingStore()
    first = actor(store)
    healthy(first, range(10))
    assert store.writes.get(STATE_FILE, 0) == 0  # healthy steps write nothing
    first.on_checkpoint_staged(10)
    first.on_checkpoint(10)
    healthy(first, range(10, 12))
    assert first.observe(report(12, bad=True)).action == "skip"
    rollback = first.observe(report(13, bad=True))
    assert (rollback.action, rollback.rollback_to, rollback.skip_range) == ("rollback", 10, (12, 16))
    assert first.flush()
    healthy(first, range(10, 12))
    writes = store.writes[STATE_FILE]
    assert 1 <= writes <= 4  # staged, committed, skip, rollback (the background writer may coalesce)
    saved = json.loads(store.objects[STATE_FILE])
    assert saved["next"] == [10, 10]  # as of the rollback: the healthy steps since were not written
    assert saved["skipped"] == [[12, 16]] and saved["checkpoints"] == [[10, 10]] and len(saved["rollbacks"]) == 1

    # Ray restarts the actor: the new one knows the checkpoint, the skipped window and the rollback count ...
    second = actor(store)
    assert second.state_dict() == saved
    assert second.skipped_ranges() == [(12, 16)] and second.guardian.rollbacks == 1
    assert [e["event"] for e in second.events()][-1] == "rollback"  # reloading emits nothing
    # ... and goes on as the first one would: the second streak needs a rollback, but max_rollbacks=1 is used.
    healthy(second, range(10, 20))
    assert second.observe(report(20, bad=True)).action == "skip"
    abort = second.observe(report(21, bad=True))
    assert abort.action == "abort" and "guardian.max_rollbacks=1 rollbacks are used up" in abort.reason
    assert json.loads(store.objects[STATE_FILE])["aborted"] == abort.reason  # written before the answer


def test_replace_state_is_exact_where_load_state_dict_merges():
    g = Guardian(GUARDIAN, "a")
    for step in range(10):
        g.observe(report(step))
    g.on_checkpoint(5)
    state = g.state_dict()
    exact, merged = Guardian(GUARDIAN, "a"), Guardian(GUARDIAN, "a")
    exact.replace_state(state)
    merged.load_state_dict(state)
    assert exact.state_dict() == state
    assert exact.older_checkpoints(100) == [5]
    assert merged.older_checkpoints(100) == [10, 5]  # the resume step counts as a committed checkpoint
    assert exact.events == g.events and merged.events[-1]["event"] == "restore"
    with pytest.raises(ValueError, match="version"):
        exact.replace_state({**state, "version": 0})


def test_resume_after_abort_clears_the_abort_allows_more_rollbacks_and_is_recorded():
    store = MemoryStore()
    a = actor(store)
    healthy(a, range(10))
    a.on_checkpoint(10)
    for step, bad in [(10, True), (11, True)]:
        a.observe(report(step, bad))  # skip, rollback 1 of 1
    healthy(a, range(10, 14))
    for step in (14, 15):
        decision = a.observe(report(step, bad=True))
    assert decision.action == "abort"
    resumed = actor(store)  # the resubmitted job's fresh actor: still aborted
    assert resumed.observe(report(14)).action == "abort"
    assert resumed.resume_after_abort("resubmitted with run.resume_after_abort=true (optim.lr=0.001)")
    assert not resumed.resume_after_abort("again")  # nothing left to clear
    assert json.loads(store.objects[STATE_FILE])["aborted"] is None
    events = [e for e in resumed.events() if e["event"] == "resumed_after_abort"]
    assert len(events) == 1 and "optim.lr=0.001" in events[0]["reason"]
    healthy(resumed, range(14, 18))
    # The streak that caused the abort is still in the window: one more anomaly rolls back, now allowed.
    assert resumed.observe(report(18, bad=True)).action == "rollback"


def test_the_driver_refuses_an_aborted_run_until_told_how_to_go_on(tmp_path):
    from raytrainer.launch import AbortedRunError, check_not_aborted

    cfg = Config.model_validate({"checkpoint": {"storage": str(tmp_path)}, "run": {"name": "stopped"},
                                 "optim": {"lr": 3e-3}, "schedule": {"warmup_steps": 5}})
    assert read_guardian_state(cfg) is None and check_not_aborted(cfg) is None  # a new run
    g = actor(RunStore.for_run(cfg))
    g.on_checkpoint(0)
    for step in range(4):
        g.observe(report(step, bad=True))
    assert g.guardian.aborted and g.flush()
    first_line = g.guardian.state_dict()["aborted"].splitlines()[0]
    with pytest.raises(AbortedRunError) as refused:
        check_not_aborted(cfg)
    message = str(refused.value)
    assert first_line in message and "--set run.resume_after_abort=true" in message
    assert "optim.lr (now 0.003)" in message and "schedule.warmup_steps (now 5)" in message
    flagged = cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume_after_abort": True})})
    assert check_not_aborted(flagged).splitlines()[0] == first_line


def test_resume_false_starts_a_fresh_run_directory_and_leaves_the_old_one(tmp_path, caplog):
    from raytrainer.launch import fresh_run

    cfg = Config.model_validate({"checkpoint": {"storage": str(tmp_path)}, "run": {"name": "r", "resume": False}})
    assert fresh_run(cfg).run.name == "r"  # nothing there yet: the name is free
    (tmp_path / "r" / "checkpoints" / "step_00000010").mkdir(parents=True)
    with caplog.at_level("INFO", logger="raytrainer.launch"):
        renamed = fresh_run(cfg).run.name
    assert renamed.startswith("r-") and renamed.endswith("Z") and len(renamed) == len("r-20250101T000000Z")
    assert (tmp_path / "r" / "checkpoints" / "step_00000010").is_dir()
    [line] = [r.getMessage() for r in caplog.records if r.name == "raytrainer.launch"]
    assert str(tmp_path / "r") in line and str(tmp_path / renamed) in line  # one line says where it went


# --------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_a_guardian_actor_killed_mid_run_comes_back_with_its_skipped_ranges(tmp_path, capfd):
    """Ray kills the guardian's process after its first rollback and restarts it: training goes on, and the
    later rollback is made by a guardian that still knows the first window and counts the first rollback,
    as its events and the final checkpoint's guardian state show."""
    ray = pytest.importorskip("ray")
    from raytrainer.checkpoint import CheckpointStore
    from raytrainer.fault.guardian_actor import NAMESPACE, actor_name
    from raytrainer.launch import run

    dataset = make_dataset(tmp_path)
    cfg = micro_config(dataset, str(tmp_path / "runs"), name="killed", steps=60, extra=[
        "faults=[{step: 25, kind: nan_loss}, {step: 26, kind: nan_loss}, {step: 45, kind: nan_loss}, "
        "{step: 46, kind: nan_loss}]", "parallel.min_workers=1", "parallel.max_workers=1",
        "guardian.skips_before_rollback=1", "guardian.rollback_skip_batches=2", "guardian.max_rollbacks=3"])
    # A Ray of its own (not one `ray start` left running), with its own dashboard: Ray Train's placement-group
    # cleaner asks the state API whether the controller lives, and without a dashboard that API falls back
    # to 127.0.0.1:8265, where another cluster's dashboard may say no and have the run's workers removed.
    ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port())
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["result"] = run(cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    driver = threading.Thread(target=drive, daemon=True)
    try:
        driver.start()
        guardian_store = RunStore.for_run(cfg)
        deadline = time.monotonic() + 300
        state = None
        while time.monotonic() < deadline and driver.is_alive():
            state = read_guardian_state(cfg, guardian_store)
            if state and state["rollbacks"]:
                break
            time.sleep(0.2)
        assert state and len(state["rollbacks"]) == 1, outcome.get("error")
        ray.kill(ray.get_actor(actor_name("killed"), namespace=NAMESPACE), no_restart=False)
        driver.join(timeout=400)
        assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    finally:
        ray.shutdown()

    assert "guardian for run killed restarted by Ray: reloaded its state" in capfd.readouterr().err
    assert outcome["result"]["step"] == 60
    events = read_events(guardian_store)
    # No worker group restarted, so nothing was merged in from a checkpoint: what the guardian knew after
    # the kill came from its durable state alone.
    assert not [e for e in events if e["event"] == "restore"]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert (rollbacks[0]["step"], rollbacks[0]["rollback_to"], rollbacks[0]["skip_range"]) == (26, 20, [25, 29])
    later = [(i, e) for i, e in enumerate(rollbacks) if e["step"] == 46]
    assert len(later) == 1 and later[0][1]["rollback_to"] == 40
    # The restarted guardian counted the rollbacks made before the kill ...
    assert f"rollback {later[0][0] + 1} of 3" in later[0][1]["reason"] and later[0][0] >= 1
    final = read_guardian_state(cfg, guardian_store)
    assert len(final["rollbacks"]) == len(rollbacks)
    # ... and still skips the first window, as does the state saved in the last checkpoint.
    state = CheckpointStore(cfg.checkpoint.storage, "killed").read_json(60, "trainer_state.json")
    for skipped in (final["skipped"], state["guardian"]["skipped"]):
        assert any(a <= 25 and 29 <= b for a, b in skipped), skipped
        assert any(a <= later[0][1]["skip_range"][0] and later[0][1]["skip_range"][1] <= b for a, b in skipped)


def test_every_call_the_client_makes_exists_on_the_actor_and_in_the_loops_protocol():
    """Rank 0 reaches the actor only by method name: a name missing on either side fails a run at its first
    checkpoint, far from here."""
    import inspect

    from raytrainer.fault.guardian_actor import GuardianClient
    from raytrainer.train.loop import Guardian as GuardianProtocol
    from raytrainer.train.loop import NoGuardian

    source = inspect.getsource(GuardianClient)
    called = set(__import__("re").findall(r'self\._call\("(\w+)"', source))
    assert called, "no actor calls found"
    for name in called:
        assert callable(getattr(GuardianActor, name, None)), f"GuardianActor has no {name}()"
    protocol = {n for n in vars(GuardianProtocol) if not n.startswith("_")}
    for name in protocol:
        assert callable(getattr(GuardianClient, name, None)), f"GuardianClient has no {name}()"
        assert callable(getattr(NoGuardian, name, None)), f"NoGuardian has no {name}()"
        assert callable(getattr(Guardian, name, None)), f"Guardian has no {name}()"
