"""A chaos soak: a seeded schedule of every fault kind, and the scorecard of a run that went through it.

    faults = schedule(seed=0, steps=300, world_size=2, every_steps=25, first=40)
    ... run the job with `faults` (and once without, the clean run) ...
    card = scorecard(faults, chaos_history, guardian_events, clean_history, steps=300, every_steps=25)
    card.rows      # per fault: what was expected, what the run did, steps and seconds it cost
    card.checks    # run finished; every fault survived as expected; batches trained = clean run's minus the
                   # skipped; losses equal to the clean run's until the first skipped update; final loss close

Expected decisions: a NaN, a poisoned batch and an exploding gradient are skipped (their reruns reproduce); a
flipped bit in one rank's gradients is a transient fault, its clean rerun applied; a killed worker and a hung
one (the step watchdog) restart the group from the newest committed checkpoint; a SIGTERM checkpoints the group
first, so its restart redoes no step; an S3 outage during a save (shorter than checkpoint.upload_retry_s) costs
no restart: the upload is retried and the checkpoint it hit is committed. The data faults are at most
`guardian.skips_before_rollback` of them, so none of them escalates to a rollback.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DATA_FAULTS = ("nan_loss", "loss_spike", "grad_explode")
RESTART_FAULTS = ("crash", "hang", "s3_outage", "sigterm")
KINDS = (*DATA_FAULTS, "grad_bitflip", *RESTART_FAULTS)
EXPECTED = {"nan_loss": "skip", "loss_spike": "skip", "grad_explode": "skip", "grad_bitflip": "transient, applied",
            "crash": "restart", "hang": "restart", "s3_outage": "upload retried, no restart",
            "sigterm": "checkpoint, restart"}


def schedule(seed: int, steps: int, world_size: int, every_steps: int, first: int,
             kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """One fault of each kind at distinct steps in [first, steps - every_steps), in a seeded order, on seeded
    ranks. An S3 outage comes last, on the step before a checkpoint, so it hits that save; the others fall
    between checkpoints, at least two steps from one."""
    rng = random.Random(seed)
    last = steps - every_steps
    span = last - first
    if span < 2 * len(kinds):
        raise ValueError(f"{len(kinds)} faults need more than {span} steps between step {first} and {last}")
    slots = sorted(rng.sample(range(len(kinds) * 2), len(kinds)))
    order = [k for k in kinds if k != "s3_outage"]
    rng.shuffle(order)
    # The outage last: its failed upload may surface a checkpoint later, and the restart it then costs would
    # replay (and, with the fault markers unwritable during the outage, fire again) faults scheduled after it.
    order += [k for k in kinds if k == "s3_outage"]
    faults = []
    for slot, kind in zip(slots, order, strict=True):
        step = first + slot * span // (2 * len(kinds))
        if kind == "s3_outage":
            step = (step // every_steps + 1) * every_steps - 1
        elif step % every_steps in (0, 1, every_steps - 1):
            step += 2
        rank = rng.randrange(world_size) if kind not in ("loss_spike",) else 0
        fault = {"step": step, "kind": kind, "rank": rank}
        if kind == "grad_explode":
            fault["scale"] = 1000.0
        faults.append(fault)
        if kind == "loss_spike":  # a poisoned batch is poisoned on every rank
            faults += [{"step": step, "kind": kind, "rank": r} for r in range(1, world_size)]
    steps_taken = [f["step"] for f in faults if f["rank"] == 0 or f["kind"] != "loss_spike"]
    if len(set(steps_taken)) != len(steps_taken):
        return schedule(seed + 1, steps, world_size, every_steps, first, kinds)
    return sorted(faults, key=lambda f: (f["step"], f["rank"]))


@dataclass
class Scorecard:
    rows: list[dict] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def table(self) -> str:
        lines = ["| step | fault | rank | expected | observed | detected | survived | steps lost | seconds |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['step']} | {r['kind']} | {r['rank']} | {r['expected']} | {r['observed']} | "
                         f"{'yes' if r['detected'] else 'NO'} | {'yes' if r['survived'] else 'NO'} | "
                         f"{r['steps_lost']} | {r['seconds']:.1f} |")
        lines += ["", "| check | |", "|---|---|"] + [f"| {k} | {'pass' if v else 'FAIL'} |"
                                                    for k, v in self.checks.items()]
        return "\n".join(lines + ([""] + self.notes if self.notes else []))


def scorecard(faults: list[dict], chaos, events: list[dict], clean, steps: int, every_steps: int,
              loss_tolerance: float = 0.05) -> Scorecard:
    """`chaos`, `clean`: the two runs' raytrainer.metrics RunHistory; `events`: the chaos run's guardian events."""
    card = Scorecard()
    timeline = {r["step"]: r for r in chaos.steps}
    step_times = sorted(r.get("step_time_s", 0.0) for r in chaos.steps if r.get("action") == "continue")
    typical = step_times[len(step_times) // 2] if step_times else 0.0
    resumed = [e for e in events if e.get("event") == "resumed"]
    preempted = chaos.of_kind("preempted")
    once = [f for f in faults if not (f["kind"] == "loss_spike" and f["rank"] != 0)]
    unmatched = sorted(resumed, key=lambda e: e.get("seq", 0))  # restarts not yet put down to a fault
    finished = bool(chaos.of_kind("finish")) and max(timeline, default=-1) == steps - 1
    # An outage's window is wide (its upload error may surface a checkpoint later): it takes only the restarts
    # no other fault explains.
    for f in sorted(once, key=lambda f: f["kind"] == "s3_outage"):
        kind, step = f["kind"], f["step"]
        row = {"step": step, "kind": kind, "rank": f["rank"], "expected": EXPECTED[kind], "steps_lost": 0,
               "seconds": 0.0}
        # A restart may replay the step after its fault fired: the record of the faulty pass is an abandoned one.
        record = next((r for r in [*chaos.steps, *chaos.abandoned] if r["step"] == step and r.get("rerun")),
                      timeline.get(step, {}))
        if kind in DATA_FAULTS:
            decision = next((e for e in events if e.get("step") == step and e.get("event") in ("skip", "rollback")),
                            {})
            row["observed"] = f"{decision.get('event', 'continue')} ({decision.get('rerun') or 'no rerun'})"
            row["detected"] = bool(decision)
            row["survived"] = finished and decision.get("event") == "skip" and decision.get("rerun") == "reproduced"
            row["seconds"] = max(0.0, record.get("step_time_s", 0.0) - typical)
        elif kind == "grad_bitflip":
            applied = "applied" if record.get("applied") else "not applied"
            row["observed"] = f"{record.get('rerun') or 'no rerun'}, {applied}"
            row["detected"] = any(e.get("event") == "suspect_hardware" and e.get("step") == step for e in events)
            row["survived"] = finished and row["detected"] and bool(record.get("applied"))
            row["seconds"] = max(0.0, record.get("step_time_s", 0.0) - typical)
        else:
            hi = step + (every_steps + 1 if kind == "s3_outage" else 2)  # an upload's error may surface later
            resume = next((e for e in unmatched if step - 1 <= e.get("last_step_before", -1) <= hi), None)
            if resume is not None:
                unmatched.remove(resume)
                row["observed"] = f"restart at step {resume['step']}"
                row["steps_lost"] = int(resume.get("steps_redone", 0))
                row["seconds"] = float(resume.get("stalled_s", 0.0))
            else:
                row["observed"] = "no restart"
            row["detected"] = resume is not None
            if kind == "sigterm":
                notice = next((p for p in preempted if p["step"] >= step), None)
                row["observed"] = (f"checkpoint {notice['step']}, " if notice else "no checkpoint, ") + row["observed"]
                row["detected"] = row["detected"] and notice is not None
            if kind == "s3_outage":
                hit = (step // every_steps + 1) * every_steps
                committed = any(c["step"] == hit for c in chaos.of_kind("checkpoint"))
                if resume is None:
                    row["observed"] = f"upload retried, checkpoint {hit} committed" if committed else "save lost"
                row["detected"] = committed or resume is not None
            row["survived"] = finished and row["detected"] and (kind != "sigterm" or row["steps_lost"] == 0) and (
                kind != "s3_outage" or resume is None)
        card.rows.append(row)

    card.rows.sort(key=lambda r: r["step"])
    card.checks["the run finished"] = finished
    card.checks["every restart was caused by an injected fault"] = not unmatched
    card.checks["every fault detected and survived as expected"] = all(r["detected"] and r["survived"]
                                                                        for r in card.rows)
    data_steps = {f["step"] for f in once if f["kind"] in DATA_FAULTS}
    card.checks["no false alarm: updates skipped only where a data fault was injected"] = all(
        r.get("applied") or r["step"] in data_steps for r in chaos.steps)
    card.checks["the clean run applied every update"] = all(r.get("applied") for r in clean.steps)
    trained = [r["batch"] for r in chaos.steps if r.get("applied")]
    skipped = {e["batch"] for e in events if e.get("event") == "skip" and e.get("batch") is not None}
    for e in events:
        if e.get("event") == "rollback" and e.get("skip_range"):
            skipped |= set(range(*e["skip_range"]))
    clean_batches = [r["batch"] for r in clean.steps]
    expected = [b for b in range(max(trained, default=-1) + 1) if b not in skipped]
    card.checks["batches trained = the clean run's minus the skipped ones, each once, in order"] = (
        trained == expected and set(clean_batches) >= {b for b in expected if b < len(clean_batches)})
    commits = chaos.of_kind("checkpoint")
    card.checks["no checkpoint lost: every restart began at the newest committed checkpoint, or later"] = all(
        r["step"] >= max((c["step"] for c in commits if c.get("time", 0) <= r.get("time", 0)), default=0)
        for r in chaos.of_kind("resume"))
    first_skip = min(data_steps, default=steps)
    same = [(s, timeline[s]["loss"], r["loss"]) for s, r in ((r["step"], r) for r in clean.steps)
            if s < first_skip and s in timeline]
    card.checks["losses equal to the clean run's until the first skipped update"] = all(
        math.isclose(a, b, rel_tol=1e-6) for _, a, b in same) and len(same) == first_skip
    tail = [r["loss"] for r in chaos.steps[-10:]]
    clean_tail = [r["loss"] for r in clean.steps[-10:]]
    if tail and clean_tail:
        a, b = sum(tail) / len(tail), sum(clean_tail) / len(clean_tail)
        card.checks[f"final loss within {loss_tolerance:.0%} of the clean run's"] = abs(a - b) <= loss_tolerance * b
        card.notes.append(f"final loss (mean of the last 10 steps): chaos {a:.4f}, clean {b:.4f}")
    lost = sum(r["steps_lost"] for r in card.rows)
    card.notes.append(f"steps trained again after restarts: {lost}; seconds without progress: "
                      f"{sum(r['seconds'] for r in card.rows if r['kind'] in RESTART_FAULTS):.0f}")
    return card
