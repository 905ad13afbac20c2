"""Learning-rate schedules at their boundary steps: warmup, the peak, decay start, the last step."""

from __future__ import annotations

import math

import pytest

from raytrainer.config import load_config
from raytrainer.train.schedule import lr_at, wsd_decay_window

LR = 1.0
MIN_LR = 0.1


def config(name: str, *overrides: str, steps: int = 100, warmup: int = 10):
    return load_config(None, [f"schedule.name={name}", f"optim.lr={LR}", f"schedule.min_lr_ratio={MIN_LR}",
                              f"train.steps={steps}", f"schedule.warmup_steps={warmup}", *overrides])


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_linear_warmup_starts_above_zero_and_reaches_the_peak_on_its_last_step(name):
    cfg = config(name)
    assert lr_at(0, cfg) == pytest.approx(LR / 10)
    assert lr_at(4, cfg) == pytest.approx(LR * 5 / 10)
    assert lr_at(9, cfg) == pytest.approx(LR)  # warmup - 1
    assert lr_at(10, cfg) == pytest.approx(LR)  # warmup: the first post-warmup step is at the peak
    warmup = [lr_at(s, cfg) for s in range(10)]
    assert warmup == sorted(warmup)


def test_cosine_decays_monotonically_to_min_lr_at_the_last_step():
    cfg = config("cosine")
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lr_at(99, cfg) == pytest.approx(LR * MIN_LR)  # the last step of train.steps=100
    # halfway through the decay (step 10 + 89/2): the cosine is at the midpoint of lr and min_lr
    mid = (LR + LR * MIN_LR) / 2
    assert lr_at(54, cfg) > mid > lr_at(55, cfg)
    assert lr_at(150, cfg) == pytest.approx(LR * MIN_LR)  # past the end it stays at min_lr


def test_cosine_without_warmup_starts_at_the_peak():
    cfg = config("cosine", warmup=0)
    assert lr_at(0, cfg) == pytest.approx(LR)
    assert lr_at(99, cfg) == pytest.approx(LR * MIN_LR)


def test_constant_stays_at_the_peak_after_warmup():
    cfg = config("constant")
    assert [lr_at(s, cfg) for s in (10, 50, 99, 500)] == [LR] * 4


def test_wsd_default_decay_is_the_last_fifth_of_the_run():
    cfg = config("wsd")
    assert wsd_decay_window(cfg) == (80, 20)
    assert lr_at(79, cfg) == LR  # the last stable step
    assert lr_at(80, cfg) == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 - 1 / 20))  # decay start: first drop
    assert lr_at(99, cfg) == pytest.approx(MIN_LR)  # the last step reaches min_lr
    assert lr_at(120, cfg) == pytest.approx(MIN_LR)


@pytest.mark.parametrize(("shape", "factor_at_half"), [
    ("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5)),
])
def test_wsd_decay_shapes(shape, factor_at_half):
    cfg = config("wsd", "schedule.decay_start=50", "schedule.decay_steps=10", f"schedule.decay_shape={shape}")
    assert lr_at(49, cfg) == LR
    assert lr_at(54, cfg) == pytest.approx(MIN_LR + (LR - MIN_LR) * factor_at_half)  # 5 of 10 decay steps
    assert lr_at(59, cfg) == pytest.approx(MIN_LR)  # the decay's last step
    assert lr_at(60, cfg) == pytest.approx(MIN_LR)  # and it stays there (a decay before the end of the run)
    decay = [lr_at(s, cfg) for s in range(49, 61)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_wsd_decay_branches_from_any_stable_phase_checkpoint():
    """The stable phase does not depend on when the decay starts: a run resumed from its checkpoint at step
    S with decay_start=S sees exactly the lrs the main run had up to S, then decays."""
    main = config("wsd", "schedule.decay_start=1000", steps=2000)
    for start in (30, 47):
        branch = config("wsd", f"schedule.decay_start={start}", "schedule.decay_steps=20", steps=start + 20)
        assert [lr_at(s, branch) for s in range(start)] == [lr_at(s, main) for s in range(start)]
        assert lr_at(start, branch) < LR
        assert lr_at(start + 19, branch) == pytest.approx(MIN_LR)


def test_wsd_decay_that_would_start_inside_warmup_is_refused_with_the_keys_named():
    cfg = config("wsd", "schedule.decay_steps=95", steps=100, warmup=10)
    with pytest.raises(ValueError, match="schedule.warmup_steps=10"):
        lr_at(50, cfg)


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, config("cosine"))
