"""The chaos soak's short schedule: every fault kind once (worker kill, hang, NaN, poisoned batch, exploding
gradient, a flipped bit in one rank's gradients, an S3 outage during a save, SIGTERM) in one two-worker run on
Ray with checkpoints on S3, scored against the same run without faults. The micro model, the tiny preset's
guardian thresholds, learning rate and keep_last; bench/chaos.py runs the preset as shipped for 300 steps."""

from __future__ import annotations

import pytest

from raytrainer.fault.chaos import KINDS, schedule
from raytrainer.soak import soak
from runs import MICRO, make_dataset

pytestmark = pytest.mark.slow


def test_the_schedule_has_every_kind_once_at_distinct_steps_and_the_outage_hits_a_save():
    for seed in range(20):
        faults = schedule(seed, 70, 2, 10, 20)
        kinds = [f["kind"] for f in faults if f["rank"] == 0 or f["kind"] != "loss_spike"]
        assert sorted(kinds) == sorted(KINDS)
        steps = [f["step"] for f in faults if f["rank"] == 0 or f["kind"] != "loss_spike"]
        assert len(set(steps)) == len(steps) and all(20 <= s < 60 for s in steps)
        assert all(f["step"] % 10 == 9 for f in faults if f["kind"] == "s3_outage")
        assert [f["rank"] for f in faults if f["kind"] == "loss_spike"] == [0, 1]


def test_a_short_chaos_soak_survives_every_fault_and_trains_the_clean_runs_batches(tmp_path):
    dataset = make_dataset(tmp_path)
    card, faults, _ = soak("tiny", [*MICRO, f"data.path={dataset}", "eval.every_steps=null",
                                    "guardian.step_timeout_s=15"], steps=60, seed=0, workdir=str(tmp_path))
    print(card.table())
    assert card.ok, card.table()
    assert {r["kind"] for r in card.rows} == set(KINDS)
    sigterm = next(r for r in card.rows if r["kind"] == "sigterm")
    assert sigterm["steps_lost"] == 0
