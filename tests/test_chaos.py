"""The chaos soak's short schedule: every fault kind once (worker kill, hang, NaN, poisoned batch, exploding
gradient, a flipped bit in one rank's gradients, an S3 outage during a save, SIGTERM) in one two-worker run on
Ray with checkpoints on S3, scored against the same run without faults. The micro model, the tiny preset's
guardian thresholds, learning rate and keep_last; bench/chaos.py runs the preset as shipped for 300 steps."""

from __future__ import annotations

import pytest

from raytrainer.fault.chaos import KINDS, schedule, scorecard
from raytrainer.metrics.history import build_history
from raytrainer.soak import soak
from runs import MICRO, make_dataset


def test_the_schedule_has_every_kind_once_at_distinct_steps_and_the_outage_hits_a_save():
    for seed in range(20):
        faults = schedule(seed, 70, 2, 10, 20)
        kinds = [f["kind"] for f in faults if f["rank"] == 0 or f["kind"] != "loss_spike"]
        assert sorted(kinds) == sorted(KINDS)
        steps = [f["step"] for f in faults if f["rank"] == 0 or f["kind"] != "loss_spike"]
        assert len(set(steps)) == len(steps) and all(20 <= s < 60 for s in steps)
        assert all(f["step"] % 10 == 9 for f in faults if f["kind"] == "s3_outage")
        assert [f["rank"] for f in faults if f["kind"] == "loss_spike"] == [0, 1]


def step(s: int, loss: float | None = None, **kw) -> dict:
    return {"kind": "step", "step": s, "batch": s, "loss": 3.0 - 0.01 * s if loss is None else loss,
            "applied": True, "action": "continue", "rerun": None, "step_time_s": 0.5, **kw}


def chaos_records(crash_resume_at: int = 20, sigterm_redone: int = 0) -> list[dict]:
    records = [{"kind": "start", "step": 0, "time": 0}]
    for s in range(22):
        if s == 12:
            records.append(step(s, 9.0, applied=False, action="skip", rerun="reproduced", step_time_s=1.1))
        elif s == 15:
            records.append(step(s, rerun="transient", step_time_s=1.0))
        else:
            records.append(step(s))
        if s in (9, 19):
            records.append({"kind": "checkpoint", "step": s + 1, "time": s + 1})
    records.append({"kind": "resume", "step": crash_resume_at, "time": 100})  # the crash at 22
    for s in range(crash_resume_at, 28):
        records.append(step(s, 3.0 - 0.01 * s + 0.001))  # after the skip at 12 the model differs
    records += [{"kind": "preempted", "step": 28, "ranks": [1], "time": 120},
                {"kind": "checkpoint", "step": 28, "time": 121}, {"kind": "resume", "step": 28, "time": 130}]
    records += [step(s, 3.0 - 0.01 * s + 0.001) for s in range(28, 40)] + [{"kind": "finish", "step": 40}]
    return records


FAULTS = [{"step": 12, "kind": "nan_loss", "rank": 0}, {"step": 15, "kind": "grad_bitflip", "rank": 1},
          {"step": 22, "kind": "crash", "rank": 0}, {"step": 27, "kind": "sigterm", "rank": 1}]
EVENTS = [{"event": "skip", "seq": 0, "step": 12, "batch": 12, "rerun": "reproduced"},
          {"event": "suspect_hardware", "seq": 0, "step": 15, "ranks": [1]},
          {"event": "resumed", "seq": 1, "step": 20, "last_step_before": 21, "steps_redone": 2, "stalled_s": 15.0},
          {"event": "resumed", "seq": 2, "step": 28, "last_step_before": 27, "steps_redone": 0, "stalled_s": 9.0}]


def test_the_scorecard_of_a_run_that_survived_everything_passes_every_check():
    clean = build_history([step(s) for s in range(40)] + [{"kind": "finish", "step": 40}])
    card = scorecard(FAULTS, build_history(chaos_records()), EVENTS, clean, steps=40, every_steps=10)
    assert card.ok, card.table()
    rows = {r["kind"]: r for r in card.rows}
    assert rows["nan_loss"]["observed"] == "skip (reproduced)" and rows["nan_loss"]["seconds"] == pytest.approx(0.6)
    assert rows["crash"]["steps_lost"] == 2 and rows["crash"]["seconds"] == 15.0
    assert rows["sigterm"]["observed"] == "checkpoint 28, restart at step 28" and rows["sigterm"]["steps_lost"] == 0
    assert "| 22 | crash | 0 | restart | restart at step 20 | yes | yes | 2 | 15.0 |" in card.table()


def test_the_scorecard_fails_what_went_wrong():
    clean = build_history([step(s) for s in range(40)] + [{"kind": "finish", "step": 40}])
    # A restart that went back past a committed checkpoint (to 10, with 20 committed) lost a checkpoint.
    card = scorecard(FAULTS, build_history(chaos_records(crash_resume_at=10)), EVENTS, clean, steps=40,
                     every_steps=10)
    assert not card.checks["no checkpoint lost: every restart began at the newest committed checkpoint, or later"]
    # A SIGTERM whose restart redid steps did not survive as expected; an unexplained restart is flagged.
    events = [*EVENTS[:3], {**EVENTS[3], "steps_redone": 3},
              {"event": "resumed", "seq": 3, "step": 30, "last_step_before": 35}]
    card = scorecard(FAULTS, build_history(chaos_records()), events, clean, steps=40, every_steps=10)
    assert not card.checks["every fault detected and survived as expected"]
    assert not card.checks["every restart was caused by an injected fault"]
    # A diverging tail fails the final-loss check.
    bad_clean = build_history([step(s, 2.0) for s in range(40)] + [{"kind": "finish", "step": 40}])
    card = scorecard(FAULTS, build_history(chaos_records()), EVENTS, bad_clean, steps=40, every_steps=10)
    assert not card.checks["final loss within 5% of the clean run's"]


def test_an_s3_outage_is_survived_only_by_a_retried_upload_without_a_restart():
    clean = build_history([step(s) for s in range(40)] + [{"kind": "finish", "step": 40}])
    faults = sorted([*FAULTS, {"step": 19, "kind": "s3_outage", "rank": 1}], key=lambda f: f["step"])
    card = scorecard(faults, build_history(chaos_records()), EVENTS, clean, steps=40, every_steps=10)
    assert card.ok, card.table()
    rows = {r["kind"]: r for r in card.rows}
    assert rows["s3_outage"]["observed"] == "upload retried, checkpoint 20 committed"
    assert rows["crash"]["observed"] == "restart at step 20"  # the crash's restart is not put down to the outage
    assert [r["step"] for r in card.rows] == [12, 15, 19, 22, 27]
    # The outage cost a restart of its own: detected, but not survived as expected.
    events = [*EVENTS, {"event": "resumed", "seq": 3, "step": 20, "last_step_before": 23, "steps_redone": 3}]
    card = scorecard(faults, build_history(chaos_records()), events, clean, steps=40, every_steps=10)
    rows = {r["kind"]: r for r in card.rows}
    assert rows["s3_outage"]["detected"] and not rows["s3_outage"]["survived"]
    assert not card.checks["every fault detected and survived as expected"]


@pytest.mark.slow
def test_a_short_chaos_soak_survives_every_fault_and_trains_the_clean_runs_batches(tmp_path):
    import ray

    dataset = make_dataset(tmp_path)
    try:
        card, faults, _ = soak("tiny", [*MICRO, f"data.path={dataset}", "eval.every_steps=null",
                                        "guardian.step_timeout_s=15"], steps=60, seed=0, workdir=str(tmp_path))
    finally:
        ray.shutdown()
    print(card.table())
    assert card.ok, card.table()
    assert {r["kind"] for r in card.rows} == set(KINDS)
    sigterm = next(r for r in card.rows if r["kind"] == "sigterm")
    assert sigterm["steps_lost"] == 0
