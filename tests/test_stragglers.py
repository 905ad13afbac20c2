"""A rank slower than the others over a window of steps is named once; jitter and a single slow step are
not stragglers."""

from __future__ import annotations

import numpy as np

from raytrainer.fault.stragglers import StragglerWatch


def test_a_rank_slow_over_the_window_is_named_once_and_recovers():
    watch = StragglerWatch(factor=1.5, steps=5)
    events = []
    for step in range(30):
        slow = 4 <= step < 14
        events += watch.observe(step, [0.10, 0.40 if slow else 0.11, 0.10, 0.12])
    # Named once most of its last 5 steps were slow (step 6), recovered once most were not (step 16).
    assert [(e["event"], e["step"], e["rank"]) for e in events] == [("straggler", 6, 1), ("straggler_recovered", 16, 1)]
    assert events[0]["ratio"] == 4.0 and events[0]["steps"] == 5
    assert events[1]["own_s"] == 0.11 and events[1]["ratio"] == 1.1  # the numbers that say it is over


def test_a_busy_host_does_not_hide_a_straggler_nor_make_one():
    rng = np.random.default_rng(0)
    watch = StragglerWatch(factor=1.5, steps=20)
    # Rank 1's forwards are 0.25 s slower; every rank's times jitter 5x, as on an oversubscribed machine.
    noisy = [[0.05 * rng.uniform(1, 5) + (0.25 if r == 1 else 0.0) for r in range(2)] for _ in range(60)]
    events = [e for s, times in enumerate(noisy) for e in watch.observe(s, times)]
    assert [(e["event"], e["rank"]) for e in events] == [("straggler", 1)]
    quiet = StragglerWatch(factor=1.5, steps=20)
    assert not [e for s in range(60) for e in quiet.observe(s, [0.05 * rng.uniform(1, 5) for _ in range(4)])]


def test_jitter_one_slow_step_and_a_lone_rank_are_not_stragglers():
    watch = StragglerWatch(factor=1.5, steps=3)
    # 1 ms forwards that double now and then: below MIN_GAP_S.
    assert not [e for s in range(50) for e in watch.observe(s, [0.001, 0.002 if s % 2 else 0.001])]
    assert not [e for s in range(50) for e in watch.observe(s, [0.1, 1.0 if s % 3 == 0 else 0.1])]
    assert StragglerWatch(1.5, 3).observe(0, [5.0]) == []
