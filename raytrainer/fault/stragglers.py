"""Stragglers: a rank whose own share of a step is slower than the others', step after step. Pure, no I/O.

A rank's own time is its wait for its batch plus its forwards: neither waits on another rank (a backward
and a gradient norm end in collectives, where the fast ranks wait for the slow one, so every rank's total
is about the same). Each rank's own times over the last `steps` steps are kept; a rank whose median over
them exceeds `factor` x the median of the other ranks' medians (and by more than MIN_GAP_S, so that
millisecond jitter is never a straggler) is named, once, and named again only after it has recovered.
Medians over a window, not a run of consecutive slow steps: on a busy host one fast step must not hide a
straggler, and one slow step must not make one.
"""

from __future__ import annotations

import statistics
from collections import deque

MIN_GAP_S = 0.02


class StragglerWatch:
    def __init__(self, factor: float, steps: int):
        self.factor = factor
        self.steps = steps
        self._times: dict[int, deque[float]] = {}
        self.named: set[int] = set()

    def observe(self, step: int, own_s: list[float] | None) -> list[dict]:
        """Events for this step: `straggler` when a rank's median over the window is slow, and
        `straggler_recovered` when a named one's is not any more."""
        if not own_s or len(own_s) < 2:
            return []
        if len(self._times) != len(own_s):  # a new world size: start over
            self._times = {r: deque(maxlen=self.steps) for r in range(len(own_s))}
            self.named.clear()
        for rank, t in enumerate(own_s):
            self._times[rank].append(float(t))
        if len(self._times[0]) < self.steps:
            return []
        medians = [statistics.median(self._times[r]) for r in range(len(own_s))]
        events = []
        for rank, mine in enumerate(medians):
            others = statistics.median(medians[:rank] + medians[rank + 1:])
            slow = mine > self.factor * others and mine - others > MIN_GAP_S
            if slow and rank not in self.named:
                self.named.add(rank)
                events.append({"event": "straggler", "step": step, "rank": rank, "own_s": round(mine, 4),
                               "others_s": round(others, 4), "ratio": round(mine / max(others, 1e-9), 2),
                               "steps": self.steps})
            elif not slow and rank in self.named:
                self.named.discard(rank)
                events.append({"event": "straggler_recovered", "step": step, "rank": rank, "own_s": round(mine, 4),
                               "others_s": round(others, 4), "ratio": round(mine / max(others, 1e-9), 2),
                               "steps": self.steps})
        return events
