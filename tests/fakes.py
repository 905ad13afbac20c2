"""Stand-ins for the step engine and the data feed, for recovery tests that need thousands of steps in
seconds: the engine's "weights" are the list of global batches applied to it, so any load can be checked
against what the checkpoint must hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

from raytrainer.train.engine import StepStats


class FakeFeed:
    """Global batches 0, 1, 2, ... minus the skipped ranges; the cursor is the next batch and the skips."""

    def __init__(self, cursor: dict | None):
        self.next = cursor["next"] if cursor else 0
        self.skips: list[list[int]] = [list(r) for r in cursor["skip"]] if cursor else []
        self.batch_index: int | None = None

    def _skip_out(self, b: int) -> int:
        for a, e in sorted(self.skips):
            if a <= b < e:
                b = e
        return b

    def next_step(self) -> list[dict]:
        self.batch_index = self._skip_out(self.next)
        self.next = self.batch_index + 1
        return [{"batch": self.batch_index}]

    def skip_batches(self, start: int, end: int) -> None:
        self.skips.append([start, end])

    def cursor(self) -> dict:
        return {"next": self._skip_out(self.next), "skip": [list(r) for r in self.skips]}


class FakeEngine:
    """Loss 2.0 on healthy batches; NaN on the poisoned ones. Its weights: the batches it has applied."""

    current_lr = 1e-3

    def __init__(self, poisoned: set[int]):
        self.poisoned = poisoned
        self.applied: list[int] = []
        self._batch: int | None = None

    def forward_backward(self, micro_batches: list[dict], step: int, data_wait_s: float = 0.0,
                         stopping: bool = False) -> StepStats:
        self._batch = micro_batches[0]["batch"]
        loss = math.nan if self._batch in self.poisoned else 2.0 + 0.001 * (step % 3)
        return StepStats(step, loss, 1.0, math.isfinite(loss), 64, 64, 1e-3, 16,
                         metrics={"rank_stopping": [stopping]})

    def recompute(self, micro_batches: list[dict], step: int, data_wait_s: float = 0.0,
                  token_losses: bool = False) -> StepStats:
        # Deterministic: a poisoned batch again. No token losses: nothing to blame, the anomaly counts.
        return self.forward_backward(micro_batches, step, data_wait_s)

    def apply(self, skip: bool = False, lr_factor: float = 1.0) -> bool:
        if not skip:
            self.applied.append(self._batch)
        return not skip

    def zero_grad(self) -> None:
        pass

    def stage_checkpoint(self, directory: Path):
        snapshot = list(self.applied)

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "weights.json").write_text(json.dumps(snapshot))
        return write

    def save_checkpoint(self, directory: Path) -> None:
        self.stage_checkpoint(directory)()

    def load_checkpoint(self, directory: Path, saved_world_size: int) -> None:
        self.applied = json.loads((directory / "weights.json").read_text())

    def state_dict(self) -> dict:
        return {"applied": len(self.applied)}

    def load_state_dict(self, state: dict) -> None:
        assert state["applied"] == len(self.applied), "engine state and weights come from different saves"
