"""Anomaly detectors for the numbers a training step reports: pure, no Ray, no I/O.

Calibrated on organic spikes (bench/organic_spikes.py), not only on injected faults. Every level is robust:
the *baseline* is the median of the last `baseline_window` healthy steps (and the *current level*, while the
loss still falls, that window's recent trend carried forward to the step: `RollingWindow.level`), and the
*noise* is the median absolute step-to-step change (scaled to a standard deviation), so neither the fast
early fall of the loss nor one earlier outlier inflates them (the loss detectors use them; see below for
grad norms).

- **non-finite**: the loss or the pre-clip gradient norm is NaN or infinite. Always on, even in warmup.
- **loss spike**: loss > `spike_ratio` x the current level (a doubling, by default), or loss more than
  `spike_zscore` noise-sigmas above the baseline *and* more than `spike_min_rise` (a fraction) above it:
  quiet curves of big batches are held to their own noise, noisy small-batch curves to a rise that matters.
- **grad-norm spike**: grad norm > `grad_norm_max`, or more than `grad_norm_zscore` standard deviations of
  log(norm) above its mean over the last `window` healthy steps (grad norms vary multiplicatively, and
  jump several-fold on healthy runs: the plain spread, not a robust one, is the yardstick).
- **divergence**: loss above `lowest baseline + divergence_margin` for `divergence_steps` consecutive
  steps: the lowest baseline seen so far, so a slow climb cannot drag it along.

The statistics are fed by healthy steps only: an anomalous step never raises the bar for the next one. A
healthy step whose loss is more than `healthy_rise` above the baseline is *elevated*: it still feeds the
statistics, but `rise_start` remembers where the current elevated stretch began, so a rollback goes back
to before the ramp up to a spike, and a checkpoint saved during one is not counted healthy.
Spike detection needs `min_window` healthy steps first. Steps below `warmup_exempt_steps` are exempt from
spike and divergence detection (loss and grad norm move fast there) but still feed the statistics, so
detection is live the moment warmup ends.

`peek()` is `check()` without learning anything: the guardian asks it whether a step needs a rerun.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from raytrainer.config import GuardianConfig

NON_FINITE = "non_finite"
LOSS_SPIKE = "loss_spike"
GRAD_SPIKE = "grad_spike"
DIVERGENCE = "divergence"
RANKS_DISAGREE = "ranks_disagree"


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on one step: what kind of anomaly, and the numbers that show it."""

    kind: str
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail}


class RollingWindow:
    """The last `size` healthy values, each with its step (so a rollback can forget the abandoned steps).
    Statistics are over the newest `span` of them (all by default); the older ones are kept so that after a
    rollback far back the baseline of the steps before the target is still there."""

    def __init__(self, size: int, span: int | None = None):
        self.size = size
        self.span = span or size
        self.items: deque[tuple[int, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return min(len(self.items), self.span)

    def add(self, step: int, value: float) -> None:
        self.items.append((step, value))

    def values(self) -> list[float]:
        return [v for _, v in list(self.items)[-self.span:]]

    def mean(self) -> float:
        values = self.values()
        return sum(values) / len(values)

    def std(self) -> float:
        values = self.values()
        if len(values) < 2:
            return 0.0
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    def median(self) -> float:
        return statistics.median(self.values())

    def level(self, step: int) -> float:
        """Where the values are at `step`: the span's median, or, while they fall, the trend of its newest
        quarter (at least 8 values; Theil-Sen: the median pairwise slope) carried forward to `step`. On a fast
        early fall the median lags half a window up the slope, and even the last value is a step behind: a
        batch that doubles the current loss would look 1.5-1.9x either. Never above the median (a rising
        trend is not extrapolated) and never below 3/4 of the quarter's lowest value."""
        median = statistics.median(self.values())
        recent = list(self.items)[-self.span:][-max(8, len(self) // 4):]
        slopes = [(vb - va) / (sb - sa) for i, (sa, va) in enumerate(recent) for sb, vb in recent[i + 1:] if sb > sa]
        if len(recent) < 3 or not slopes:
            return median
        slope = statistics.median(slopes)
        if slope >= 0:
            return median
        intercept = statistics.median(v - slope * s for s, v in recent)
        floor = 0.75 * min(v for _, v in recent)
        return min(median, max(intercept + slope * step, floor))

    def noise(self) -> float:
        """A robust standard deviation of the values around their trend: the median absolute deviation of
        the step-to-step changes, scaled (x1.4826 for a normal, /sqrt(2) for a difference of two)."""
        values = self.values()
        if len(values) < 3:
            return 0.0
        diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
        centre = statistics.median(diffs)
        return 1.4826 * statistics.median(abs(d - centre) for d in diffs) / math.sqrt(2)

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


def check_loss_spike(step: int, loss: float, losses: RollingWindow, cfg: GuardianConfig) -> Finding | None:
    """A doubling is measured against where the loss is now (`level`: a poisoned batch early on, while the
    loss still falls fast, doubles the current loss but not the window's median); the finer noise test
    against the median, which content-driven batches of 1.5x on a falling curve do not cross."""
    if len(losses) < cfg.min_window:
        return None
    level = losses.level(step)
    if level <= 0:
        return None
    ratio = loss / level
    if ratio > cfg.spike_ratio:
        return Finding(LOSS_SPIKE, f"loss {loss:.4g} is {ratio:.2f}x its recent level {level:.4g} "
                                   f"(limit guardian.spike_ratio={cfg.spike_ratio:g})")
    base = losses.median()
    ratio = loss / base
    sigma = max(losses.noise(), cfg.zscore_min_rel_std * base, 1e-12)
    z = (loss - base) / sigma
    if z > cfg.spike_zscore and ratio > 1 + cfg.spike_min_rise:
        return Finding(
            LOSS_SPIKE,
            f"loss {loss:.4g} is {z:.1f} sigma ({ratio:.2f}x) above its recent median {base:.4g} "
            f"(limits guardian.spike_zscore={cfg.spike_zscore:g} and spike_min_rise={cfg.spike_min_rise:g}, "
            f"over {len(losses)} steps)",
        )
    return None


def check_grad_spike(grad_norm: float, log_norms: RollingWindow, cfg: GuardianConfig) -> Finding | None:
    """`log_norms`: the window of log(grad norm) of healthy steps. Its mean and standard deviation, not the
    robust ones: grad norms jump several-fold now and then on healthy runs (clipping takes care of those),
    and those jumps belong in the spread a spike is measured against."""
    if grad_norm > cfg.grad_norm_max:
        return Finding(GRAD_SPIKE,
                       f"grad norm {grad_norm:.4g} > guardian.grad_norm_max={cfg.grad_norm_max:g}")
    if len(log_norms) < cfg.min_window:
        return None
    z = log_norms.zscore(_log(grad_norm), cfg.zscore_min_rel_std)
    if z > cfg.grad_norm_zscore:
        return Finding(
            GRAD_SPIKE,
            f"grad norm {grad_norm:.4g} is {z:.1f} sigma (of log norm) above its recent geometric mean "
            f"{math.exp(log_norms.mean()):.4g} (limit guardian.grad_norm_zscore={cfg.grad_norm_zscore:g} over "
            f"{len(log_norms)} steps)",
        )
    return None


def check_ranks_agree(rank_grad_norms: list[float] | None, tolerance: float) -> Finding | None:
    """Once reduced, the gradients are the same numbers on every rank, so are their norms: a rank whose norm
    differs holds corrupted gradients (its update would split the replicas apart)."""
    if not rank_grad_norms or len(rank_grad_norms) < 2:
        return None
    centre = statistics.median(rank_grad_norms)
    scale = max(abs(centre), 1e-12)
    odd = [r for r, g in enumerate(rank_grad_norms) if not math.isfinite(g) or abs(g - centre) > tolerance * scale]
    if not odd:
        return None  # with two ranks both stray from their median: the rerun tells which one moved
    shown = ", ".join(f"rank {r}: {rank_grad_norms[r]:.6g}" for r in odd[:4])
    return Finding(RANKS_DISAGREE, f"the ranks' gradient norms disagree ({shown}; the others {centre:.6g})")


class DivergenceTracker:
    """Counts consecutive steps whose loss sits above baseline + margin; fires at `divergence_steps`."""

    def __init__(self, cfg: GuardianConfig):
        self.cfg = cfg
        self.baseline: float | None = None
        self.run_start: int | None = None  # first step of the current run above the baseline
        self.run_length = 0

    def lower_baseline(self, level: float) -> None:
        self.baseline = level if self.baseline is None else min(self.baseline, level)

    def above(self, loss: float) -> bool:
        return self.baseline is not None and (
            not math.isfinite(loss) or loss > self.baseline + self.cfg.divergence_margin)

    def would_fire(self, loss: float) -> bool:
        return self.above(loss) and self.run_length + 1 >= self.cfg.divergence_steps

    def update(self, step: int, loss: float) -> Finding | None:
        if self.baseline is None:
            return None
        if not self.above(loss):
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
        kept = max(cfg.window, cfg.baseline_window)  # a rollback goes back at most `window` steps
        self.losses = RollingWindow(kept, cfg.baseline_window)
        self.log_grad_norms = RollingWindow(kept, cfg.window)
        self.divergence = DivergenceTracker(cfg)
        self.rise_start: int | None = None  # first step of the elevated stretch the loss is in now

    def peek(self, step: int, loss: float, grad_norm: float, finite: bool = True) -> list[Finding]:
        """What check() would find for this step, without learning anything from it."""
        non_finite = check_finite(loss, grad_norm, finite)
        if non_finite is not None:
            return [non_finite]
        if step < self.cfg.warmup_exempt_steps:
            return []
        findings = self._spikes(step, loss, grad_norm)
        if self.divergence.would_fire(loss):
            findings.append(Finding(DIVERGENCE, "the loss stays above its baseline"))
        return findings

    def check(self, step: int, loss: float, grad_norm: float, finite: bool = True) -> list[Finding]:
        """Findings for this step (empty: healthy). Only a healthy step feeds the statistics."""
        non_finite = check_finite(loss, grad_norm, finite)
        if non_finite is not None:
            self._note_rise(step, elevated=True)
            # Counts towards a divergence run too: a NaN is not below the baseline.
            diverged = None if step < self.cfg.warmup_exempt_steps else self.divergence.update(step, math.nan)
            return [non_finite] + ([diverged] if diverged else [])
        if step < self.cfg.warmup_exempt_steps:
            self._learn(step, loss, grad_norm)
            return []
        self._note_rise(step, self.elevated(loss))
        findings = self._spikes(step, loss, grad_norm)
        diverged = self.divergence.update(step, loss)
        if diverged is not None:
            findings.append(diverged)
        if not findings:
            self._learn(step, loss, grad_norm)
        return findings

    def _spikes(self, step: int, loss: float, grad_norm: float) -> list[Finding]:
        return [f for f in (check_loss_spike(step, loss, self.losses, self.cfg),
                            check_grad_spike(grad_norm, self.log_grad_norms, self.cfg)) if f is not None]

    def elevated(self, loss: float) -> bool:
        """Loss more than `healthy_rise` above the baseline (or no baseline yet to tell)."""
        if len(self.losses) < self.cfg.min_window:
            return False
        return not math.isfinite(loss) or loss > (1 + self.cfg.healthy_rise) * self.losses.median()

    @property
    def at_baseline(self) -> bool:
        """The last step seen was not elevated: a checkpoint saved now is healthy."""
        return self.rise_start is None

    def _note_rise(self, step: int, elevated: bool) -> None:
        if not elevated:
            self.rise_start = None
        elif self.rise_start is None:
            self.rise_start = step

    def _learn(self, step: int, loss: float, grad_norm: float) -> None:
        self.losses.add(step, loss)
        self.log_grad_norms.add(step, _log(grad_norm))
        if len(self.losses) >= self.cfg.min_window:
            self.divergence.lower_baseline(self.losses.median())

    def rewind(self, step: int) -> None:
        """Back to the statistics of the healthy steps before `step` (after a rollback to checkpoint
        `step`)."""
        self.losses.rewind(step)
        self.log_grad_norms.rewind(step)
        self.divergence.reset()
        self.rise_start = None

    def state_dict(self) -> dict:
        return {
            "losses": self.losses.to_list(),
            "log_grad_norms": self.log_grad_norms.to_list(),
            "baseline": self.divergence.baseline,
            "divergence_run": [self.divergence.run_start, self.divergence.run_length],
            "rise_start": self.rise_start,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses.load_list(state.get("losses", []))
        self.log_grad_norms.load_list(state.get("log_grad_norms", []))
        self.divergence.baseline = state.get("baseline")
        self.divergence.run_start, self.divergence.run_length = state.get("divergence_run", [None, 0])
        self.rise_start = state.get("rise_start")


def _log(x: float) -> float:
    return math.log(max(x, 1e-30))  # a zero grad norm (a step with no labelled tokens) stays finite
