"""Learning-rate schedules as pure functions of the step, so a resumed run gets the same value."""

from __future__ import annotations

import math

from raytrainer.config import Config


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    s, lr, total = cfg.schedule, cfg.optim.lr, cfg.train.steps
    min_lr = lr * s.min_lr_ratio
    if s.warmup_steps and step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    if s.name == "constant":
        return lr
    if s.name == "cosine":
        span = max(1, total - s.warmup_steps - 1)
        progress = min(1.0, (step - s.warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at lr, then decay to min_lr over decay_steps starting at decay_start
    decay_steps = s.decay_steps or max(1, round(0.2 * total))
    decay_start = s.decay_start if s.decay_start is not None else total - decay_steps
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if s.decay_shape == "linear":
        factor = 1 - progress
    elif s.decay_shape == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # sqrt ("1 - sqrt"), as in the WSD/MiniCPM papers
        factor = 1 - math.sqrt(progress)
    return min_lr + (lr - min_lr) * factor
