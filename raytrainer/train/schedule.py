"""Learning-rate schedules as pure functions of the step, so a resumed run gets the same value.

Every schedule starts with a linear warmup, lr * (step + 1) / warmup_steps, so step 0 already trains
(at lr / warmup_steps) and step warmup_steps - 1 reaches the peak lr. Then:

- cosine:   from lr at step warmup_steps to min_lr = lr * min_lr_ratio at the last step (steps - 1).
- wsd:      warmup, stable at lr, then a decay of `decay_steps` steps starting at `decay_start` that reaches
            min_lr at its last step (decay_start + decay_steps - 1) and stays there. Shapes: linear, cosine,
            sqrt (1 - sqrt(progress)). Because the stable phase does not depend on when the decay starts, a
            decay can be branched from any stable-phase checkpoint: resume it with schedule.decay_start set
            to the checkpoint's step (and train.steps = decay_start + decay_steps).
- constant: lr after warmup.
"""

from __future__ import annotations

import math

from raytrainer.config import Config

WSD_DEFAULT_DECAY_FRACTION = 0.2


def wsd_decay_window(cfg: Config) -> tuple[int, int]:
    """(first step of the decay, its length in steps) of a wsd schedule, defaults resolved."""
    s, total = cfg.schedule, cfg.train.steps
    decay_steps = s.decay_steps if s.decay_steps is not None else max(1, round(WSD_DEFAULT_DECAY_FRACTION * total))
    decay_start = s.decay_start if s.decay_start is not None else total - decay_steps
    if decay_start < s.warmup_steps:
        raise ValueError(
            f"schedule: the wsd decay would start at step {decay_start}, before warmup ends at "
            f"schedule.warmup_steps={s.warmup_steps} (train.steps={total}, decay_steps={decay_steps}); "
            "lower schedule.decay_steps or schedule.warmup_steps, or set schedule.decay_start"
        )
    return decay_start, decay_steps


def decay_factor(progress: float, shape: str) -> float:
    """1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":  # "1 - sqrt", as in the WSD / MiniCPM papers: a fast first drop, then a long tail
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"schedule.decay_shape={shape!r}: expected linear, cosine or sqrt")


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based); parameter groups multiply it by their lr_scale."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    s, lr, total = cfg.schedule, cfg.optim.lr, cfg.train.steps
    min_lr = lr * s.min_lr_ratio
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    if s.name == "constant":
        return lr
    if s.name == "cosine":
        last = total - 1
        if last <= s.warmup_steps:  # nothing left to decay over
            return lr
        progress = min(1.0, (step - s.warmup_steps) / (last - s.warmup_steps))
        return min_lr + (lr - min_lr) * decay_factor(progress, "cosine")
    if s.name == "wsd":
        decay_start, decay_steps = wsd_decay_window(cfg)
        if step < decay_start:
            return lr
        # the decay's first step is already below lr and its last step is at min_lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return min_lr + (lr - min_lr) * decay_factor(progress, s.decay_shape)
    raise ValueError(f"schedule.name={s.name!r}: expected cosine, wsd or constant")
