"""Detectors on synthetic loss curves: spikes are found, ordinary noise is not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raytrainer.config import GuardianConfig
from raytrainer.fault.detectors import (
    DIVERGENCE,
    GRAD_SPIKE,
    LOSS_SPIKE,
    NON_FINITE,
    Detectors,
    RollingWindow,
    check_finite,
)


def realistic_curve(steps: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pretraining-like run: fast early drop, slow decline; batch-to-batch loss noise of ~2% with mild
    autocorrelation and tails a bit heavier than Gaussian; grad norms falling after init, log-normal noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    level = 2.3 + 8.5 * np.exp(-t / 60) + 1.2 * np.exp(-t / 600)
    shocks = rng.standard_t(20, steps)
    noise = np.zeros(steps)
    for i in range(1, steps):
        noise[i] = 0.3 * noise[i - 1] + shocks[i]
    loss = level * (1 + 0.02 * noise)
    grad_norm = (0.3 + 3.0 * np.exp(-t / 40)) * np.exp(rng.normal(0, 0.15, steps))
    return loss, grad_norm


def run(detectors: Detectors, losses, grad_norms, start: int = 0) -> dict[int, list[str]]:
    found = {}
    for i, (loss, gn) in enumerate(zip(losses, grad_norms, strict=True)):
        findings = detectors.check(start + i, float(loss), float(gn))
        if findings:
            found[start + i] = [f.kind for f in findings]
    return found


@pytest.mark.parametrize("seed", range(5))
def test_realistic_noisy_curve_gives_no_detections(seed):
    loss, grad_norm = realistic_curve(seed=seed)
    assert run(Detectors(GuardianConfig()), loss, grad_norm) == {}


@pytest.mark.parametrize("seed", range(3))
def test_spikes_on_the_same_curve_are_found(seed):
    loss, grad_norm = realistic_curve(seed=seed)
    loss[700] *= 1.5  # +50%: far beyond the noise, well under 3x the mean -> z-score
    loss[1200] *= 4.0  # the factor test
    grad_norm[1500] *= 4.0  # log-z-score, still far below grad_norm_max
    found = run(Detectors(GuardianConfig()), loss, grad_norm)
    assert found == {700: [LOSS_SPIKE], 1200: [LOSS_SPIKE], 1500: [GRAD_SPIKE]}


def test_loss_spike_by_factor_and_by_zscore():
    cfg = GuardianConfig(spike_ratio=3.0, spike_zscore=6.0, spike_min_rise=0.0, zscore_min_rel_std=0.0)
    d = Detectors(cfg)
    rng = np.random.default_rng(0)
    run(d, 2.0 + rng.normal(0, 0.01, 200), np.ones(200))
    assert d.check(200, 2.1, 1.0)[0].kind == LOSS_SPIKE  # ~10 sigma, far below 3x
    factor = d.check(201, 6.5, 1.0)
    assert factor[0].kind == LOSS_SPIKE and "spike_ratio=3" in factor[0].detail
    assert d.check(202, 2.03, 1.0) == []  # 3 sigma: noise


def test_zscore_floor_keeps_a_flat_quiet_curve_from_flagging_tiny_bumps():
    d = Detectors(GuardianConfig(zscore_min_rel_std=0.01, spike_min_rise=0.0))
    run(d, np.full(200, 2.0) + np.random.default_rng(1).normal(0, 1e-4, 200), np.ones(200))
    assert d.check(200, 2.05, 1.0) == []  # 500 raw sigma, but 2.5% of the mean: not a spike
    assert d.check(201, 2.3, 1.0)[0].kind == LOSS_SPIKE


def test_grad_norm_spike_absolute_and_zscore():
    d = Detectors(GuardianConfig(grad_norm_max=10.0))
    rng = np.random.default_rng(2)
    run(d, np.full(200, 3.0) + rng.normal(0, 0.02, 200), np.exp(rng.normal(0, 0.1, 200)))
    assert d.check(200, 3.0, 11.0)[0].kind == GRAD_SPIKE
    assert "grad_norm_max" in d.check(201, 3.0, 11.0)[0].detail
    assert d.check(202, 3.0, 3.0)[0].kind == GRAD_SPIKE  # 3x with 10% noise: 11 sigma in log space
    assert d.check(203, 3.0, 1.2) == []


def test_non_finite_is_immediate_and_even_in_warmup():
    d = Detectors(GuardianConfig(warmup_exempt_steps=20))
    assert [f.kind for f in d.check(0, math.nan, 1.0)] == [NON_FINITE]
    assert [f.kind for f in d.check(1, 2.0, math.inf)] == [NON_FINITE]
    assert [f.kind for f in d.check(2, 2.0, 1.0, finite=False)] == [NON_FINITE]
    assert check_finite(2.0, 1.0) is None
    assert len(d.losses) == 0  # none of them fed the statistics


def test_warmup_steps_are_exempt_but_feed_the_statistics():
    cfg = GuardianConfig(warmup_exempt_steps=20, min_window=16)
    d = Detectors(cfg)
    assert run(d, [10.0 - 0.1 * i for i in range(19)] + [500.0], [50.0] * 20) == {}  # spikes during warmup
    assert len(d.losses) == 20
    after = Detectors(cfg)
    run(after, [10.0 - 0.1 * i for i in range(20)], [1.0] * 20)
    assert [f.kind for f in after.check(20, 500.0, 1.0)] == [LOSS_SPIKE]  # live the step warmup ends


def test_anomalies_do_not_pollute_the_statistics():
    d = Detectors(GuardianConfig())
    rng = np.random.default_rng(3)
    run(d, 3.0 + rng.normal(0, 0.03, 300), np.exp(rng.normal(0, 0.1, 300)))
    mean, std, n = d.losses.mean(), d.losses.std(), len(d.losses)
    # A long burst of spikes: each one is still a spike, because none of them entered the window.
    for step in range(300, 340):
        assert d.check(step, 6.0, 1.0)[0].kind == LOSS_SPIKE
    assert (d.losses.mean(), d.losses.std(), len(d.losses)) == (mean, std, n)
    assert d.check(340, 3.01, 1.0) == []


def test_divergence_fires_after_n_consecutive_steps_above_baseline():
    cfg = GuardianConfig(divergence_steps=50, divergence_margin=0.5)
    d = Detectors(cfg)
    rng = np.random.default_rng(4)
    run(d, 3.0 + rng.normal(0, 0.02, 200), np.ones(200))
    baseline = d.divergence.baseline
    assert baseline == pytest.approx(3.0, abs=0.02)
    # A slow climb to +0.8: never a spike (the window follows it), but it stays above baseline + 0.5.
    climb = list(np.linspace(3.0, 3.8, 60)) + [3.8] * 100
    found = run(d, climb, [1.0] * len(climb), start=200)
    first_above = 200 + next(i for i, v in enumerate(climb) if v > baseline + 0.5)
    assert min(found) == first_above + 49 and found[first_above + 49] == [DIVERGENCE]
    assert d.divergence.run_start == first_above
    assert d.divergence.baseline == baseline  # the climb did not drag the baseline up


def test_a_short_excursion_is_not_divergence():
    d = Detectors(GuardianConfig(divergence_steps=50, divergence_margin=0.5))
    run(d, [3.0] * 200, [1.0] * 200)
    excursion = list(np.linspace(3.0, 3.7, 40)) + [3.7] * 20 + [3.0] * 100  # ~45 steps above, then back
    kinds = {k for found in run(d, excursion, [1.0] * 160, start=200).values() for k in found}
    assert DIVERGENCE not in kinds


def test_rewind_forgets_abandoned_steps_and_state_round_trips():
    d = Detectors(GuardianConfig())
    run(d, [3.0 + 0.001 * i for i in range(100)], [1.0] * 100)
    state = d.state_dict()
    d.rewind(60)
    assert max(s for s, _ in d.losses.items) == 59 and len(d.log_grad_norms.items) == 60
    restored = Detectors(GuardianConfig())
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_rolling_window_statistics():
    w = RollingWindow(3)
    for i, v in enumerate([1.0, 2.0, 3.0, 4.0]):
        w.add(i, v)
    assert len(w) == 3 and w.mean() == 3.0 and w.std() == 1.0
    assert w.zscore(5.0, min_std=0.0) == 2.0 and w.zscore(5.0, min_std=4.0) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_a_doubling_while_the_loss_still_falls_fast_is_caught_at_the_first_eligible_step(seed):
    """A fast early fall: the window's median still sits half a window up the slope, so a poisoned batch that
    doubles the current loss is only ~1.45x that median, under the preset's spike_min_rise. The doubling
    test measures it against the window's trend carried forward to the step instead."""
    from raytrainer.config import load_config

    cfg = load_config("tiny", ["guardian.warmup_exempt_steps=5", "guardian.min_window=8",
                               "guardian.window=16"]).guardian  # the soak's guardian: MICRO's windows
    t = np.arange(40)
    level = 3.3 + 6.0 * np.exp(-t / 3)
    loss = level * (1 + 0.02 * np.random.default_rng(seed).standard_normal(40))
    assert run(Detectors(cfg), loss, np.ones(40)) == {}  # the clean fall itself: nothing
    first = cfg.min_window
    detectors = Detectors(cfg)
    assert run(detectors, loss[:first], np.ones(first)) == {}
    poisoned = 2 * level[first]
    assert poisoned / detectors.losses.median() < 1 + cfg.spike_min_rise  # the median alone would miss it
    assert [f.kind for f in detectors.check(first, float(poisoned), 1.0)] == [LOSS_SPIKE]


def test_the_current_level_follows_a_falling_trend_but_never_a_rising_one():
    window = RollingWindow(32)
    for s in range(16):
        window.add(s, 10.0 - 0.25 * s)  # 10 ... 6.25
    assert window.level(16) == pytest.approx(6.0)  # the trend, one step on; the median is 8.1
    assert window.level(1000) == pytest.approx(0.75 * 6.25)  # never far below what was seen
    rising = RollingWindow(32)
    for s in range(16):
        rising.add(s, 5.0 + 0.1 * s)
    assert rising.level(16) == pytest.approx(rising.median())
