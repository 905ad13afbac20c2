"""A run's metrics put back together from every attempt's records.

Records are replayed in the order they were written. A `rollback` to step t abandons the steps from t on
written before it; a `resume` at step k abandons the steps from k on that an earlier attempt had written
(they are trained again). What is left is the run's timeline: one record per step, the one that counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from raytrainer.metrics.sinks import METRICS_DIR
from raytrainer.storage import Storage


@dataclass
class RunHistory:
    steps: list[dict] = field(default_factory=list)  # the timeline: one record per step, by step
    evals: list[dict] = field(default_factory=list)
    abandoned: list[dict] = field(default_factory=list)  # step records a rollback or restart superseded
    events: list[dict] = field(default_factory=list)  # rollback, resume, checkpoint, finish records
    attempts: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bad_lines: int = 0

    @property
    def empty(self) -> bool:
        return not (self.steps or self.evals or self.events)

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == kind]


def metrics_files(run: Storage) -> list[str]:
    return [n for n in run.child(METRICS_DIR).listdir() if n.endswith(".jsonl")]


def read_records(run: Storage) -> tuple[list[dict], list[str], int]:
    records, bad = [], 0
    files = metrics_files(run)
    for name in files:
        for line in run.child(METRICS_DIR).read_bytes(name).decode(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                bad += 1
                continue
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            else:
                bad += 1
    return records, files, bad


def build_history(records: list[dict]) -> RunHistory:
    history = RunHistory()
    live_steps: dict[int, dict] = {}
    live_evals: dict[int, dict] = {}

    def abandon(from_step: int, why: str) -> None:
        # Step s trains the model at s into s+1; an evaluation at s measures the model at s, which the
        # rollback or resume goes back to, so it still counts.
        for step in [s for s in live_steps if s >= from_step]:
            history.abandoned.append({**live_steps.pop(step), "abandoned_by": why})
        for step in [s for s in live_evals if s > from_step]:
            del live_evals[step]

    for r in records:
        attempt = r.get("attempt")
        if attempt and attempt not in history.attempts:
            history.attempts.append(attempt)
        kind = r.get("kind")
        if kind == "step":
            live_steps[int(r["step"])] = r
        elif kind == "eval":
            live_evals[int(r["step"])] = r
        else:
            history.events.append(r)
            if kind == "rollback":
                abandon(int(r["to"]), f"rollback at step {r['step']} to {r['to']}")
            elif kind == "resume":
                abandon(int(r["step"]), f"restart resumed at step {r['step']}")
    history.steps = [live_steps[s] for s in sorted(live_steps)]
    history.evals = [live_evals[s] for s in sorted(live_evals)]
    return history


def read_history(run: Storage) -> RunHistory:
    """The timeline of the run stored at `run` (`<checkpoint.storage>/<run.name>`)."""
    records, files, bad = read_records(run)
    history = build_history(records)
    history.files, history.bad_lines = files, bad
    return history
