"""Recovery with the `tiny` preset's own settings (a checkpoint every 25 steps, keep_last 2, the default
guardian thresholds, learning rate and schedule; only the model and batch are shrunk to seconds per run):
anomalies that escalate to a rollback whose target is older than the newest `keep_last` checkpoints.
The target must survive retention (it is pinned), the run must finish without starting over, and storage
must never hold more than retention allows."""

from __future__ import annotations

import pytest
import torch

from raytrainer.checkpoint import CheckpointStore
from raytrainer.config import load_config
from raytrainer.fault.events import EventLog, RunStore, read_events
from raytrainer.fault.guardian import Guardian
from raytrainer.metrics import read_history
from raytrainer.storage import open_storage
from raytrainer.train.loop import WorkerEnv
from raytrainer.train.ray_entry import build_trainer
from runs import MICRO_MODEL, make_dataset

# Four anomalies (non-finite steps, as a flaky device gives) inside the default 128-step window: the fourth
# (guardian.skips_before_rollback=3) rolls back to the newest checkpoint before the first, step 25, while
# the newest two are 50 and 75.
FAULTS = "faults=[{step: 30, kind: nan_loss}, {step: 55, kind: nan_loss}, {step: 70, kind: nan_loss}, " \
         "{step: 85, kind: nan_loss}]"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("defaults-data"))


def tiny_as_shipped(dataset, storage, extra=()):
    return load_config("tiny", [*MICRO_MODEL, f"data.path={dataset}", f"checkpoint.storage={storage}", *extra])


def retention_bound(cfg) -> int:
    """keep_last complete + the pinned target + one being written (keep_every is unset in the preset)."""
    assert cfg.checkpoint.keep_every is None
    return cfg.checkpoint.keep_last + 1 + 1


def test_rollback_past_keep_last_with_the_presets_settings(dataset, tmp_path):
    cfg = tiny_as_shipped(dataset, tmp_path, [FAULTS])
    assert (cfg.checkpoint.every_steps, cfg.checkpoint.keep_last, cfg.train.steps) == (25, 2, 100)
    events = EventLog(RunStore.for_run(cfg))
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=guardian)
    store = CheckpointStore(str(tmp_path), cfg.run.name)
    most_stored = 0
    train_step = trainer.train_step

    def watched_step(step):
        nonlocal most_stored
        nxt = train_step(step)
        most_stored = max(most_stored, len(store.step_numbers()))
        return nxt

    trainer.train_step = watched_step
    result = trainer.fit()
    events.flush()

    rollbacks = [h for h in result["history"] if h.get("action") == "rollback"]
    assert [(r["step"], r["to"]) for r in rollbacks] == [(85, 25)], rollbacks
    assert result["step"] == 100 and trainer.start_step == 0  # one attempt, never started over
    assert most_stored <= retention_bound(cfg), most_stored
    # After the run: the newest keep_last complete ones, plus the pinned rollback target if it is older.
    assert store.steps()[-2:] == [75, 100] and len(store.steps()) <= 3
    assert all(info.complete for info in store.list())
    logged = read_events(RunStore.for_run(cfg))
    rollback = next(e for e in logged if e["event"] == "rollback")
    assert rollback["rollback_to"] == 25
    # A deleted checkpoint is never named as a target: every target was complete when chosen.
    deleted = {s for e in logged if e["event"] == "checkpoints_deleted" for s in e["steps"]}
    assert 25 not in {s for e in logged if e["event"] == "checkpoints_deleted" and e["seq"] < rollback["seq"]
                      for s in e["steps"]}
    assert deleted, "retention ran during the run"

    # The metrics on record: one timeline step per step, the abandoned branch marked by the rollback record.
    history = read_history(open_storage(str(tmp_path)).child(cfg.run.name))
    assert [r["step"] for r in history.steps] == list(range(100))
    marks = history.of_kind("rollback")
    assert [(r["step"], r["to"], r["abandoned"]) for r in marks] == [(85, 25, [25, 85])]
    assert sorted(r["step"] for r in history.abandoned) == list(range(25, 85))
    assert all(r["abandoned_by"] == "rollback at step 85 to 25" for r in history.abandoned)
    # The skipped NaN steps were on the abandoned branch; faults fire once, so the timeline is clean.
    assert {r["step"]: r["action"] for r in history.abandoned if r["action"] != "continue"} == {
        30: "skip", 55: "skip", 70: "skip"}
    assert all(r["action"] == "continue" for r in history.steps)
    assert history.steps[-1]["tokens_seen"] == sum(r["tokens"] for r in history.steps if r["applied"])


def test_unreadable_rollback_target_falls_back_to_an_older_checkpoint(dataset, tmp_path, caplog):
    """The target's file is damaged after it was committed: the rollback uses the next older checkpoint
    kept by retention (keep_every), says so in the events log, and marks the damaged one."""
    cfg = tiny_as_shipped(dataset, tmp_path, [FAULTS, "checkpoint.every_steps=10", "checkpoint.keep_every=20",
                                               "train.steps=90"])
    events = EventLog(RunStore.for_run(cfg))
    guardian = Guardian(cfg.guardian, cfg.run.name, on_event=events.append)
    trainer = build_trainer(cfg, WorkerEnv(), torch.device("cpu"), guardian=guardian)
    store = CheckpointStore(str(tmp_path), cfg.run.name)
    train_step = trainer.train_step
    caplog.set_level("WARNING", logger="raytrainer.checkpoint")

    damaged = []

    def damage_target_before_the_rollback(step):
        if step == 85 and not damaged:
            damaged.append(step)
            trainer.checkpoints.wait()
            shard = next((tmp_path / cfg.run.name / "checkpoints" / "step_00000030" / "model").glob("*.distcp"))
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
            shard.write_bytes(bytes(data))
        return train_step(step)

    trainer.train_step = damage_target_before_the_rollback
    result = trainer.fit()
    events.flush()
    rollbacks = [h for h in result["history"] if h.get("action") == "rollback"]
    assert [(r["step"], r["to"]) for r in rollbacks] == [(85, 20)], rollbacks
    logged = read_events(RunStore.for_run(cfg))
    fallback = next(e for e in logged if e["event"] == "rollback_fallback")
    assert (fallback["intended"], fallback["rollback_to"]) == (30, 20)
    assert result["step"] == 90
    warned = [r.getMessage() for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(warned) == 1 and "step 30" in warned[0] and "sha256" in warned[0] and "step 20" in warned[0]
    assert store.steps()[-2:] == [80, 90]
