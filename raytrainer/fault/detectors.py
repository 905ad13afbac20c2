"""Anomaly detectors for the numbers a training step reports: pure, no Ray, no I/O.

Four detectors, each a small function or class configured by `GuardianConfig`:

- **non-finite**: the loss or the pre-clip gradient norm is NaN or infinite. Always on, even in warmup.
- **loss spike**: loss > `spike_factor` x running mean, or its z-score over the last `window` healthy steps
  exceeds `spike_zscore`.
- **grad-norm spike**: grad norm > `grad_norm_max`, or its z-score exceeds `grad_norm_zscore`. Grad norms
  are positive and vary multiplicatively (a skewed distribution), so their z-score is taken on log(norm).
- **divergence**: loss above `baseline + divergence_margin` for `divergence_steps` consecutive steps. The
  baseline is the lowest running mean seen so far, so a slow climb cannot drag it along.

The statistics (running mean, sigma, baseline) are fed by healthy steps only: an anomalous step never raises
the bar for the next one. Sigma has a floor of `zscore_min_rel_std` x |mean| (for log grad norms: of
`zscore_min_rel_std`, the same relative spread) so that a very quiet stretch of the curve does not turn
ordinary noise into a 6-sigma event. Spike detection needs `min_window` healthy steps
first. Steps below `warmup_exempt_steps` are exempt from spike and divergence detection (loss and grad norm
move fast there) but still feed the statistics, so detection is live the moment warmup ends.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from raytrainer.config import GuardianConfig

NON_FINITE = "non_finite"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
DIVERGENCE = "divergence"


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on one step: what kind of anomaly, and the numbers that show it."""

    kind: str
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail}


class RollingWindow:
    """The last `size` healthy values, each with its step (so a rollback can forget the abandoned steps)."""

    def __init__(self, size: int):
        self.size = size
        self.items: deque[tuple[int, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, step: int, value: float) -> None:
        self.items.append((step, value))

    def mean(self) -> float:
        return sum(v for _, v in self.items) / len(self.items)

    def std(self) -> float:
        n = len(self.items)
        if n < 2:
            return 0.0
        m = self.mean()
        return math.sqrt(sum((v - m) ** 2 for _, v in self.items) / (n - 1))

    def zscore(self, value: float, min_std: float) -> float:
        sigma = max(self.std(), min_std, 1e-12)
        return (value - self.mean()) / sigma

    def rewind(self, step: int) -> None:
        """Forget every value recorded at `step` or later."""
        self.items = deque(((s, v) for s, v in self.items if s < step), maxlen=self.size)

    def to_list(self) -> list[list]:
        return [[s, v] for s, v in self.items]

    def load_list(self, items: list) -> None:
        self.items = deque(((int(s), float(v)) for s, v in items), maxlen=self.size)


def check_finite(loss: float, grad_norm: float, finite: bool = True) -> Finding | None:
    if finite and math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    return Finding(NON_FINITE, f"non-finite step: loss={loss}, grad_norm={grad_norm}")


def check_loss_spike(loss: float, losses: RollingWindow, cfg: GuardianConfig) -> Finding | None:
    if len(losses) < cfg.min_window:
        return None
    mean = losses.mean()
    if mean > 0 and loss > cfg.spike_factor * mean:
        return Finding(LOSS_SPIKE, f"loss {loss:.4g} > {cfg.spike_factor:g} x running mean {mean:.4g}")
    z = losses.zscore(loss, cfg.zscore_min_rel_std * abs(mean))
    if z > cfg.spike_zscore:
        return Finding(
            LOSS_SPIKE,
            f"loss {loss:.4g} is {z:.1f} sigma above the running mean {mean:.4g} "
            f"(limit {cfg.spike_zscore:g} sigma over {len(losses)} steps)",
        )
    return None


def check_grad_spike(grad_norm: float, log_norms: RollingWindow, cfg: GuardianConfig) -> Finding | None:
    """`log_norms`: the window of log(grad norm) of healthy steps."""
    if grad_norm > cfg.grad_norm_max:
        return Finding(GRAD_SPIKE,
                       f"grad norm {grad_norm:.4g} > guardian.grad_norm_max={cfg.grad_norm_max:g}")
    if len(log_norms) < cfg.min_window:
        return None
    z = log_norms.zscore(_log(grad_norm), cfg.zscore_min_rel_std)
    if z > cfg.grad_norm_zscore:
        return Finding(
            GRAD_SPIKE,
            f"grad norm {grad_norm:.4g} is {z:.1f} sigma (of log norm) above the running geometric mean "
            f"{math.exp(log_norms.mean()):.4g} (limit {cfg.grad_norm_zscore:g} sigma over "
            f"{len(log_norms)} steps)",
        )
    return None


class DivergenceTracker:
    """Counts consecutive steps whose loss sits above baseline + margin; fires at `divergence_steps`."""

    def __init__(self, cfg: GuardianConfig):
        self.cfg = cfg
        self.baseline: float | None = None
        self.run_start: int | None = None  # first step of the current run above the baseline
        self.run_length = 0

    def lower_baseline(self, running_mean: float) -> None:
        self.baseline = running_mean if self.baseline is None else min(self.baseline, running_mean)

    def update(self, step: int, loss: float) -> Finding | None:
        if self.baseline is None:
            return None
        above = not math.isfinite(loss) or loss > self.baseline + self.cfg.divergence_margin
        if not above:
            self.reset()
            return None
        if self.run_length == 0:
            self.run_start = step
        self.run_length += 1
        if self.run_length < self.cfg.divergence_steps:
            return None
        return Finding(
            DIVERGENCE,
            f"loss above baseline {self.baseline:.4g} + "
            f"guardian.divergence_margin={self.cfg.divergence_margin:g} "
            f"for {self.run_length} consecutive steps (since step {self.run_start}; "
            f"limit guardian.divergence_steps={self.cfg.divergence_steps})",
        )

    def reset(self) -> None:
        self.run_start = None
        self.run_length = 0


class Detectors:
    """All four detectors over one stream of steps, with the statistics they share."""

    def __init__(self, cfg: GuardianConfig):
        self.cfg = cfg
        self.losses = RollingWindow(cfg.window)
        self.log_grad_norms = RollingWindow(cfg.window)
        self.divergence = DivergenceTracker(cfg)

    def check(self, step: int, loss: float, grad_norm: float, finite: bool = True) -> list[Finding]:
        """Findings for this step (empty: healthy). Only a healthy step feeds the statistics."""
        non_finite = check_finite(loss, grad_norm, finite)
        if non_finite is not None:
            # Counts towards a divergence run too: a NaN is not below the baseline.
            diverged = None if step < self.cfg.warmup_exempt_steps else self.divergence.update(step, math.nan)
            return [non_finite] + ([diverged] if diverged else [])
        if step < self.cfg.warmup_exempt_steps:
            self._learn(step, loss, grad_norm)
            return []
        findings = [f for f in (check_loss_spike(loss, self.losses, self.cfg),
                                check_grad_spike(grad_norm, self.log_grad_norms, self.cfg)) if f is not None]
        diverged = self.divergence.update(step, loss)
        if diverged is not None:
            findings.append(diverged)
        if not findings:
            self._learn(step, loss, grad_norm)
        return findings

    def _learn(self, step: int, loss: float, grad_norm: float) -> None:
        self.losses.add(step, loss)
        self.log_grad_norms.add(step, _log(grad_norm))
        if len(self.losses) >= self.cfg.min_window:
            self.divergence.lower_baseline(self.losses.mean())

    def rewind(self, step: int) -> None:
        """Back to the statistics of the healthy steps before `step` (after a rollback to checkpoint
        `step`)."""
        self.losses.rewind(step)
        self.log_grad_norms.rewind(step)
        self.divergence.reset()

    def state_dict(self) -> dict:
        return {
            "losses": self.losses.to_list(),
            "log_grad_norms": self.log_grad_norms.to_list(),
            "baseline": self.divergence.baseline,
            "divergence_run": [self.divergence.run_start, self.divergence.run_length],
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_list(state.get("losses", []))
        self.log_grad_norms.load_list(state.get("log_grad_norms", []))
        self.divergence.baseline = state.get("baseline")
        self.divergence.run_start, self.divergence.run_length = state.get("divergence_run", [None, 0])


def _log(x: float) -> float:
    return math.log(max(x, 1e-30))  # a zero grad norm (a step with no labelled tokens) stays finite
