"""The guardian's policy: skip -> rollback -> abort, healthy checkpoints, skip ranges, cooldown, state."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raytrainer.config import GuardianConfig
from raytrainer.fault.guardian import Decision, Guardian

NOISE = np.random.default_rng(0).normal(0, 1, 4096)


def stats(step: int, spike: bool = False, nan: bool = False) -> dict:
    loss = 3.0 + 0.03 * NOISE[step % len(NOISE)]
    grad_norm = 1.0 + 0.05 * NOISE[-step % len(NOISE)]
    loss = math.nan if nan else (9.0 if spike else loss)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": 8192, "lr": 1e-3}


def drive(g: Guardian, steps, spikes=(), checkpoints=()) -> dict[int, Decision]:
    """Like the loop: report each step; after step s completes, a checkpoint for s + 1 may be committed.
    Stops at the first rollback or abort."""
    decisions = {}
    for s in steps:
        numbers = stats(s, spike=s in spikes)
        decisions[s] = d = g.decide(s, numbers, cursor={"batch": s})
        if d.action == "rerun":  # as the loop does: the same numbers again, so the spike reproduces
            decisions[s] = d = g.decide(s, numbers, cursor={"batch": s}, rerun=numbers)
        if d.action in ("rollback", "abort"):
            break
        if s + 1 in checkpoints:
            g.on_checkpoint(s + 1)
    return decisions


def actions(decisions: dict[int, Decision]) -> dict[int, str]:
    return {s: d.action for s, d in decisions.items() if d.action != "continue"}


def make(**overrides) -> Guardian:
    """The policy after a rerun has reproduced the step (reruns have tests of their own)."""
    return Guardian(GuardianConfig(**{"rerun": False, **overrides}), run_name="test")


def test_healthy_run_only_continues():
    g = make()
    assert actions(drive(g, range(500), checkpoints=(100, 200, 300))) == {}
    assert g.skipped_ranges() == [] and g.rollbacks == 0


def test_escalation_skip_then_rollback_then_abort():
    g = make(skips_before_rollback=3, max_rollbacks=1, rollback_skip_batches=8)
    first = drive(g, range(200), spikes=(120, 121, 122, 123), checkpoints=(50, 100))
    assert actions(first) == {120: "skip", 121: "skip", 122: "skip", 123: "rollback"}
    rollback = first[123]
    assert rollback.rollback_to == 100 and rollback.skip_range == (120, 132)
    assert "rolling back to checkpoint 100" in rollback.reason
    # Resume at the checkpoint; a second streak needs a second rollback, but only one is allowed.
    second = drive(g, range(100, 300), spikes=(130, 131, 132, 133))
    assert actions(second) == {130: "skip", 131: "skip", 132: "skip", 133: "abort"}
    report = second[133].reason
    assert "guardian.max_rollbacks=1" in report and "step 123 -> checkpoint 100" in report
    assert g.decide(134, stats(134)).action == "abort"  # sticky


def test_non_finite_loss_is_skipped_at_once_even_in_warmup():
    g = make(warmup_exempt_steps=20)
    assert g.decide(3, stats(3, nan=True)).action == "skip"
    assert g.decide(4, stats(4)).action == "continue"
    assert g.decide(5, {"loss": 3.0, "grad_norm": 1.0, "finite": False}).action == "skip"


def test_more_anomalies_than_allowed_within_the_window_roll_back_but_spread_out_ones_do_not():
    g = make(skips_before_rollback=1, window=128)
    spaced = drive(g, range(600), spikes=(150, 300, 450), checkpoints=(100, 200, 400))
    assert actions(spaced) == {150: "skip", 300: "skip", 450: "skip"}
    close = drive(g, range(600, 700), spikes=(610, 650))
    assert actions(close) == {610: "skip", 650: "rollback"}


def test_divergence_rolls_back_directly():
    g = make(divergence_steps=20, divergence_margin=0.5, spike_zscore=1000.0, spike_ratio=100.0)
    drive(g, range(200), checkpoints=(100, 180))
    decisions = {}
    for s in range(200, 260):
        decisions[s] = g.decide(s, {"loss": 4.0, "grad_norm": 1.0})  # +1.0 above baseline, no spike
        if decisions[s].action != "continue":
            break
    assert actions(decisions) == {219: "rollback"}
    assert decisions[219].rollback_to == 180  # the divergence began at step 200: 180 is still healthy
    assert decisions[219].skip_range == (200, 228)
    assert "diverged" in decisions[219].reason


def test_rollback_target_is_the_last_checkpoint_before_the_streak_never_one_written_during_it():
    g = make(skips_before_rollback=3)
    decisions = drive(g, range(300), spikes=(140, 160, 161, 162), checkpoints=(50, 100, 150))
    assert actions(decisions) == {140: "skip", 160: "skip", 161: "skip", 162: "rollback"}
    assert decisions[162].rollback_to == 100  # 150 was written inside the unresolved streak
    assert g.healthy_checkpoint(10**9) == 100  # the abandoned branch's checkpoint is forgotten


def test_checkpoint_at_the_streak_start_is_healthy_and_old_anomalies_age_out():
    g = make(skips_before_rollback=3)
    decisions = drive(g, range(300), spikes=(100, 101, 102, 103), checkpoints=(50, 100))
    assert decisions[103].rollback_to == 100  # holds updates of steps 0..99 only
    g = make(skips_before_rollback=3, window=128)
    decisions = drive(g, range(400), spikes=(30, 200, 201, 202, 203), checkpoints=(100, 150))
    assert decisions[203].action == "rollback" and decisions[203].rollback_to == 150  # 30 left the window


def test_no_checkpoint_to_roll_back_to_aborts_with_a_clear_report():
    g = make(skips_before_rollback=0)
    decision = drive(g, range(100), spikes=(50,))[50]
    assert decision.action == "abort"
    assert "no committed checkpoint" in decision.reason and "checkpoint.every_steps" in decision.reason


def test_skip_range_is_exact_and_respects_the_checkpoint():
    for before, expected in ((0, (120, 132)), (5, (115, 132)), (50, (100, 132))):
        g = make(skips_before_rollback=3, rollback_skip_batches=8, rollback_skip_before=before)
        d = drive(g, range(200), spikes=(120, 121, 122, 123), checkpoints=(100,))[123]
        assert d.skip_range == expected and d.skip_ranges == [expected]
    g = make(skips_before_rollback=0, rollback_skip_batches=0)
    assert drive(g, range(200), spikes=(120,), checkpoints=(100,))[120].skip_range == (120, 121)


def test_batches_shift_after_a_rollback_and_later_ranges_are_in_batch_space():
    g = make(skips_before_rollback=3, rollback_skip_batches=8, max_rollbacks=3)
    drive(g, range(200), spikes=(120, 121, 122, 123), checkpoints=(100,))
    # The data feed restarts at checkpoint 100 and skips batches [120, 132): step 120 consumes batch 132.
    assert [g.batch_for(s) for s in (100, 119, 120, 125)] == [100, 119, 132, 137]
    second = drive(g, range(100, 200), spikes=(140, 141, 142, 143))
    assert second[143].rollback_to == 100
    assert second[143].skip_range == (152, 164)  # steps 140..143 consumed batches 152..155
    assert second[143].skip_ranges == [(120, 132), (152, 164)]
    assert [g.batch_for(s) for s in (119, 120, 139, 140)] == [119, 132, 151, 164]


def test_skipped_updates_are_recorded_as_skipped_batches():
    g = make()
    drive(g, range(100))
    at_checkpoint_100 = g.state_dict()
    drive(g, range(100, 160), spikes=(150,))
    assert g.skipped_ranges() == [(150, 151)]
    assert g.batch_for(160) == 160  # the live feed already consumed batch 150; nothing shifts now
    g.load_state_dict(at_checkpoint_100)  # a restart from checkpoint 100 never replays batch 150
    assert [g.batch_for(s) for s in (149, 150)] == [149, 151]


def test_cooldown_lr_factor_for_cooldown_steps_after_a_rollback():
    g = make(skips_before_rollback=0, cooldown_lr_factor=0.5, cooldown_steps=10)
    rollback = drive(g, range(200), spikes=(120,), checkpoints=(100,))[120]
    assert rollback.action == "rollback" and rollback.lr_factor == 0.5 and "lr x0.5" in rollback.reason
    factors = {s: g.decide(s, stats(s)).lr_factor for s in range(100, 115)}
    assert factors == {s: (0.5 if s < 110 else 1.0) for s in range(100, 115)}
    assert make(cooldown_steps=10).lr_factor(100) == 1.0  # no rollback, no cooldown


def test_state_round_trip_through_json_gives_identical_decisions():
    cfg = dict(skips_before_rollback=2, cooldown_lr_factor=0.5, cooldown_steps=5)
    a = make(**cfg)
    drive(a, range(200), spikes=(150, 151, 152), checkpoints=(100, 140))
    drive(a, range(140, 180), checkpoints=(180,))
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    b = make(**cfg)
    b.load_state_dict(state)
    later = [(s, stats(s, spike=s in (190, 191, 192))) for s in range(180, 260)]
    assert [a.decide(s, st) for s, st in later] == [b.decide(s, st) for s, st in later]
    assert a.skipped_ranges() == b.skipped_ranges() and a.rollbacks == b.rollbacks == 2


def test_loading_an_older_state_never_forgets_skipped_windows_or_rollbacks():
    g = make(skips_before_rollback=0)
    drive(g, range(100), checkpoints=(50,))
    old = g.state_dict()  # saved in checkpoint 100, before the trouble
    g.on_checkpoint(100)
    drive(g, range(100, 200), spikes=(130,))
    assert g.rollbacks == 1 and g.skipped_ranges() == [(130, 139)]
    # The worker group crashes and restarts from checkpoint 100: the skipped window must survive.
    g.load_state_dict(old)
    assert g.rollbacks == 1 and g.skipped_ranges() == [(130, 139)]
    assert g.batch_for(130) == 139
    # A resubmitted job: a fresh guardian restored from a checkpoint written after the rollback.
    drive(g, range(100, 150), checkpoints=(150,))
    fresh = make(skips_before_rollback=0)
    fresh.load_state_dict(g.state_dict())
    assert fresh.skipped_ranges() == [(130, 139)] and fresh.rollbacks == 1
    assert fresh.healthy_checkpoint(10**9) == 150


def test_state_of_another_version_is_refused_with_a_clear_message():
    g = make()
    g.load_state_dict({})  # a checkpoint without guardian state: nothing to restore
    with pytest.raises(ValueError, match="guardian state version"):
        g.load_state_dict({"version": 99})


def test_events_record_every_decision_with_its_reason():
    events = []
    g = Guardian(GuardianConfig(skips_before_rollback=1), run_name="run-a", on_event=events.append,
                 clock=lambda: 1000.0)
    drive(g, range(200), spikes=(120, 121), checkpoints=(100,))
    kinds = [(e["event"], e["step"]) for e in events]
    assert kinds == [("checkpoint", 100), ("skip", 120), ("rollback", 121)]
    skip, rollback = events[1], events[2]
    assert skip["run"] == "run-a" and skip["time"] == 1000.0 and skip["loss"] == 9.0
    assert skip["findings"][0]["kind"] == "loss_spike" and "skipped" in skip["reason"]
    assert skip["rerun"] == rollback["rerun"] == "reproduced"
    assert skip["cursor"] == {"batch": 120} and skip["lr"] == 1e-3 and skip["tokens"] == 8192
    assert rollback["rollback_to"] == 100 and rollback["skip_range"] == [120, 130]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert g.events == events and g.state_dict()["events"] == events
    json.dumps(events, allow_nan=False)


def test_nan_values_in_events_are_json_safe():
    events = []
    g = Guardian(GuardianConfig(rerun=False), on_event=events.append)
    g.decide(0, {"loss": math.nan, "grad_norm": math.inf})
    assert events[0]["loss"] == "nan" and events[0]["grad_norm"] == "inf"
    json.dumps(g.state_dict(), allow_nan=False)


def test_a_restore_reports_the_stall_and_the_steps_done_again():
    now = [1000.0]
    g = Guardian(GuardianConfig(), run_name="test", clock=lambda: now[0])
    for s in range(13):  # a checkpoint for step 10 is committed; the workers then die after step 12
        g.decide(s, stats(s))
        now[0] += 1.0
        if s + 1 == 10:
            g.on_checkpoint(10)
            saved = g.state_dict()
    now[0] += 20.0  # failure detection, restart, reload
    g.load_state_dict(saved)
    g.decide(10, stats(10))
    resumed = [e for e in g.events if e["event"] == "resumed"]
    assert resumed == [{**resumed[0], "step": 10, "last_step_before": 12, "stalled_s": 21.0, "steps_redone": 3}]
    g.decide(11, stats(11))
    assert len([e for e in g.events if e["event"] == "resumed"]) == 1  # once per restore


@pytest.mark.parametrize("rerun", [False, True])
def test_an_anomaly_while_a_checkpoint_is_being_committed_is_judged_once_it_is(rerun):
    """Checkpoint 100 is staged but not yet committed by every rank when step 101 spikes; with
    skips_before_rollback=0 the rollback must reach it, so the guardian asks the loop to settle the uploads
    first (with guardian.rerun=true, the rerun does that): nothing is recorded until the step is reported
    again."""
    g = make(skips_before_rollback=0, rerun=rerun)
    drive(g, range(100), checkpoints=(50,))
    g.on_checkpoint_staged(100)
    first = g.decide(100, stats(100), cursor={"batch": 100})
    assert first.action == "continue"  # a healthy step never waits for an upload
    spike = stats(101, spike=True)
    asked = g.decide(101, spike, cursor={"batch": 101})
    assert asked.action == ("rerun" if rerun else "settle") and g.skipped_ranges() == []
    g.on_checkpoint(100)  # what settling reports
    again = {"rerun": spike} if rerun else {"settled": True}
    decision = g.decide(101, spike, cursor={"batch": 101}, **again)
    assert decision.action == "rollback" and decision.rollback_to == 100, decision.reason


def test_no_upload_in_flight_no_settle_and_a_settled_step_is_judged():
    g = make(skips_before_rollback=0)
    drive(g, range(100), checkpoints=(50,))
    assert g.decide(100, stats(100, spike=True), cursor={"batch": 100}).action == "rollback"  # nothing staged
    g = make(skips_before_rollback=0)
    drive(g, range(100), checkpoints=(50,))
    g.on_checkpoint_staged(100)
    g.decide(100, stats(100), cursor={"batch": 100})
    # the upload never committed (a failed save): the settled step is judged with what is committed
    decision = g.decide(101, stats(101, spike=True), cursor={"batch": 101}, settled=True)
    assert decision.action == "rollback" and decision.rollback_to == 50


def test_a_divergence_waits_for_a_checkpoint_being_committed_even_with_reruns_on():
    """A trend is never rerun, so the settle is the only wait before a divergence's rollback."""
    g = make(rerun=True, divergence_steps=20, divergence_margin=0.5, spike_zscore=1000.0, spike_ratio=100.0)
    drive(g, range(200), checkpoints=(100,))
    g.on_checkpoint_staged(200)  # saved at the last healthy step, a slow rank still uploading
    decisions = {}
    for s in range(200, 260):
        decisions[s] = g.decide(s, {"loss": 4.0, "grad_norm": 1.0})
        if decisions[s].action != "continue":
            break
    assert actions(decisions) == {219: "settle"}
    g.on_checkpoint(200)
    decision = g.decide(219, {"loss": 4.0, "grad_norm": 1.0}, settled=True)
    assert decision.action == "rollback" and decision.rollback_to == 200, decision.reason
