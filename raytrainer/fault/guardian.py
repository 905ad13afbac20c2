"""The guardian's decisions: continue, skip the update, roll back, or abort. Pure logic: no Ray, no I/O.

The training loop reports every step before the optimizer step is applied and acts on the answer::

    decision = guardian.decide(step, stats, cursor)      # stats: .loss, .grad_norm (pre-clip), .finite, ...
    rerun    -> recompute the step (same micro-batches, parameters and RNG state), then report both:
                decision = guardian.decide(step, stats, cursor, rerun=stats2); it is never "rerun" again
    settle   -> the step looks anomalous while a checkpoint is still being committed: wait for every rank's
                uploads, report the commits (on_checkpoint), then report the step again:
                decision = guardian.decide(step, stats, cursor, settled=True); never "settle" again
    continue -> apply the update (with decision.lr_factor)
    skip     -> do not apply it; the batch is recorded and never replayed
    rollback -> every rank reloads checkpoint decision.rollback_to in place, rebuilds the data feed from its
                cursor and hands it decision.skip_ranges; the next step is decision.rollback_to
    abort    -> stop the run; decision.reason is the incident report
    when a checkpoint is staged:              guardian.on_checkpoint_staged(step)
    once every rank has committed it:         guardian.on_checkpoint(step)
    after retention deleted some:             guardian.checkpoints_exist(steps that remain)
    every decision names in `pin` the checkpoint a rollback would go to now: it must not be deleted.

Policy
------
Detection is in `raytrainer.fault.detectors` (non-finite, loss spike, grad-norm spike, divergence, ranks
whose gradient norms disagree). A step with any finding is an *anomaly*; its update is never applied.

0. **Settle, rerun first.** A step that looks anomalous while a checkpoint is staged but not yet committed
   by every rank is judged only once the uploads are done (`settle`; a rerun does the same), so a rollback
   decided now can go back to a checkpoint a slow rank was still uploading.
   **Rerun** (`rerun`, on by default). A step that looks anomalous (anything but divergence) is
   recomputed before anything is decided; healthy steps cost nothing. The same loss and grad norm again
   (within `rerun_tolerance`, relative) -> the cause is the data or the model's state: go on with 1-3.
   Different -> a transient fault: the ranks whose summed loss or grad norm moved between the two runs are
   named, with their nodes, in a `suspect_hardware` event; the rerun's values are judged instead (its
   gradients are the ones held now), so a clean rerun is applied. After `suspect_node_limit` such events on
   one node, the decision names it in `exclude_nodes`: the loop checkpoints, and the worker group is
   restarted without it.

   A loss spike that reproduces is blamed on documents first (`blame_documents`,
   raytrainer.fault.blame): the rerun's token losses are split by document; when a few documents carry the
   batch's excess, they are blacklisted (`decision.blacklist`; never drawn again, also after a rollback or
   restart) and the step is skipped without counting towards a rollback: its cause is known and gone.

1. **Skip.** An anomaly is skipped: no optimizer step, the batch is recorded (event log, state, and the
   list of skipped batches, so no restart or rollback replays it). A non-finite loss or grad is always at
   least a skip, warmup included.
2. **Roll back** when either
   - this anomaly makes more than `skips_before_rollback` anomalies within the last `window` steps
     (the defaults: the 4th anomaly inside 128 steps), or
   - the divergence detector fires (loss above baseline + margin for `divergence_steps` steps in a row).
   The *streak* starts at the earliest anomaly still inside the window (for divergence, at the first step
   above the baseline if that is earlier). The target is the newest committed checkpoint at a step
   <= that start. Checkpoint steps follow the loop's convention: checkpoint `c` holds the updates of steps
   0..c-1 and training resumes at step c, so `c <= streak start` means every update in it was applied
   before the trouble began (its last update came from the last healthy step before the streak), and no
   checkpoint written during the unresolved streak is ever chosen. Checkpoints newer than the target
   belong to an abandoned branch and are forgotten.
   Data: global-batch indices (the position in the data stream; equal to the step number until the first
   skip) in the half-open range ``[a, b)`` are skipped, where
       a = max(batch of the target checkpoint, batch of the streak's first step - rollback_skip_before)
       b = batch of the current step + 1 + rollback_skip_batches
   i.e. everything from the first anomalous batch (optionally a few before it) through the batch that
   triggered the rollback, plus `rollback_skip_batches` batches after it. `decision.skip_ranges` lists every
   range skipped so far in the run (merged), which is what a rebuilt data feed must skip.
   For `cooldown_steps` steps after the rollback (steps target .. target + cooldown_steps - 1) every
   decision carries lr_factor = `cooldown_lr_factor`.
   After a rollback the window of anomalies is cleared and the statistics forget the abandoned steps.
   If the target cannot be loaded, the loop loads the next older checkpoint (decision.fallbacks) and says
   so with `rollback_fell_back`; the guardian then resumes its timeline there.
3. **Abort** when a rollback is needed but `max_rollbacks` rollbacks were already made in this run, or
   there is no healthy checkpoint to go back to. Once aborted, every later decision is abort.

State
-----
`state_dict()` is JSON-able and goes into every checkpoint. `load_state_dict()` restores the statistics and
position of that checkpoint but never forgets what the live guardian already knows: skipped ranges are
united, the rollback count is the larger of the two, so a crash loop cannot reset the escalation and a
restarted or resubmitted job never replays a window it skipped. `replace_state()` is the exact restore
(the actor reloading its own durable copy after a restart): nothing merged, nothing registered.

Recoveries: the first step reported after a restore emits a `resumed` event with the last step seen before
it, the seconds without progress in between (`stalled_s`: failure detection, restart and reload) and the
steps done again (`steps_redone`), so the events log shows what each failure cost.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raytrainer.config import GuardianConfig
from raytrainer.fault.blame import DocumentLoss, culprits
from raytrainer.fault.detectors import DIVERGENCE, LOSS_SPIKE, Detectors, Finding, check_ranks_agree
from raytrainer.fault.stragglers import StragglerWatch

STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before elevated checkpoints and reruns; its missing keys default
ACTIONS = ("continue", "skip", "rollback", "abort", "rerun", "settle")
_MAX_CHECKPOINTS = 64  # checkpoints remembered as rollback targets
_MAX_EVENTS_IN_STATE = 500  # the event log in storage keeps everything; the state keeps the recent ones


class GuardianAbort(RuntimeError):
    """The guardian gave up on the run; its message is the incident report."""


@dataclass
class Decision:
    """What every rank does with this step. Small and picklable: it is broadcast from rank 0."""

    action: str = "continue"  # continue | skip | rollback | abort | rerun | settle
    reason: str = ""
    lr_factor: float = 1.0  # multiply the scheduled learning rate (cool-down after a rollback)
    rollback_to: int | None = None  # checkpoint step to reload; training resumes at this step
    skip_range: tuple[int, int] | None = None  # global batches [a, b) newly skipped by this rollback
    skip_ranges: list[tuple[int, int]] = field(default_factory=list)  # every range to skip (for a new feed)
    fallbacks: list[int] = field(default_factory=list)  # rollback: older healthy checkpoints, newest first
    pin: int | None = None  # the checkpoint a rollback would go to now: retention must keep it
    rerun: str | None = None  # after a rerun: "reproduced" (data or model) or "transient" (hardware)
    suspects: list[int] = field(default_factory=list)  # transient: the ranks whose numbers moved
    exclude_nodes: list[str] = field(default_factory=list)  # nodes to train without from now on
    stragglers: list[int] = field(default_factory=list)  # ranks named slow at this step
    blame: bool = False  # rerun: also split the rerun's loss by document (a loss spike may be the data)
    blacklist: list[int] = field(default_factory=list)  # documents blamed at this step: never draw them again

    @property
    def apply_update(self) -> bool:
        return self.action == "continue"


@dataclass
class StepReport:
    """What a step reports. `batch`: the global-batch index it consumed, if the loop knows it (otherwise the
    guardian derives it from the step and the ranges it told the data feed to skip)."""

    step: int
    loss: float
    grad_norm: float
    finite: bool = True
    lr: float | None = None
    tokens: int | None = None
    batch: int | None = None
    cursor: dict | None = None
    rank_ce_sum: list[float] | None = None  # every rank's summed token loss (its share of the loss)
    rank_grad_norm: list[float] | None = None  # every rank's gradient norm (equal on healthy hardware)
    rank_own_s: list[float] | None = None  # every rank's own time: its data wait and its forwards
    nodes: list[str] | None = None  # every rank's node
    rerun: StepReport | None = None  # the same step recomputed, when the guardian asked for it
    documents: list[DocumentLoss] | None = None  # the rerun's loss by document, when the guardian asked
    settled: bool = False  # reported again after a "settle": the checkpoints staged before it are committed

    @classmethod
    def from_stats(cls, step: int, stats: Any, cursor: dict | None = None, *, lr: float | None = None,
                   batch: int | None = None, rerun: Any = None, nodes: list[str] | None = None,
                   documents: list[DocumentLoss] | None = None, settled: bool = False) -> StepReport:
        """From the step engine's StepStats (or any object or dict with loss and grad_norm)."""
        get = stats.get if isinstance(stats, dict) else lambda k, d=None: getattr(stats, k, d)
        lr = lr if lr is not None else get("lr")
        tokens = get("tokens")
        metrics = get("metrics") or {}
        return cls(
            step=int(step),
            loss=_scalar(get("loss")),
            grad_norm=_scalar(get("grad_norm")),
            finite=bool(get("finite", True)),
            lr=None if lr is None else _scalar(lr),
            tokens=None if tokens is None else int(tokens),
            batch=batch,
            cursor=cursor,
            rank_ce_sum=_floats(metrics.get("rank_ce_sum")),
            rank_grad_norm=_floats(metrics.get("rank_grad_norm")),
            rank_own_s=_floats(metrics.get("rank_own_s")),
            nodes=None if nodes is None else [str(n) for n in nodes],
            rerun=None if rerun is None else cls.from_stats(step, rerun, cursor, lr=lr, batch=batch, nodes=nodes),
            documents=None if documents is None else list(documents),
            settled=settled,
        )


class Guardian:
    """Decides, step by step, whether an update may be applied. See the module docstring for the policy."""

    def __init__(self, cfg: GuardianConfig, run_name: str = "",
                 on_event: Callable[[dict], None] | None = None, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.run_name = run_name
        self.on_event = on_event
        self.clock = clock
        self.detectors = Detectors(cfg)
        self._anomalies: list[dict] = []  # the current streak: anomalies within the last `window` steps
        self._history: deque[tuple[int, int]] = deque(maxlen=cfg.window + cfg.divergence_steps + 2)
        self._next: tuple[int, int] = (0, 0)  # the next step expected and the batch it will consume
        self._checkpoints: dict[int, int] = {}  # committed checkpoint step -> batch it resumes at
        self._staged: dict[int, int] = {}  # saved, not yet committed by every rank: step -> batch
        self._elevated: set[int] = set()  # checkpoints saved while the loss was above its baseline
        self._skipped: list[tuple[int, int]] = []  # merged, sorted [a, b) ranges of global batches
        self._rollbacks: list[dict] = []
        self._cooldown: tuple[int, int] | None = None  # steps [start, end) that run at cooldown_lr_factor
        self._aborted: str | None = None
        self._rollbacks_before_resume = 0  # rollbacks made before the run was resumed after an abort
        self._events: list[dict] = []
        self._seq = 0
        self._suspects: dict[str, int] = {}  # node -> suspect_hardware events on it
        self._verdict: str | None = None  # while deciding after a rerun: what it showed
        self.stragglers = StragglerWatch(cfg.straggler_factor, cfg.straggler_steps)
        self._excluded: list[str] = []  # nodes the run trains without
        self._blacklist: list[int] = []  # documents blamed for spikes, sorted
        # Live only (the actor outlives worker restarts): the last step seen, to report each recovery.
        self._last_seen: tuple[int, float] | None = None
        self._restored = False

    # ------------------------------------------------------------------ the per-step call

    def decide(self, step: int, stats: Any, cursor: dict | None = None, *, lr: float | None = None,
               batch: int | None = None, rerun: Any = None, nodes: list[str] | None = None,
               documents: list[DocumentLoss] | None = None, settled: bool = False) -> Decision:
        """The loop's per-step call: `stats` needs .loss and .grad_norm (pre-clip); .finite, .tokens, .lr
        and .metrics (rank_ce_sum, rank_grad_norm) are used when present. `rerun`: the same step recomputed,
        after a "rerun" decision; `documents`: its loss by document, when that decision asked for `blame`;
        `settled`: reported again after a "settle" decision."""
        return self.observe(StepReport.from_stats(step, stats, cursor, lr=lr, batch=batch, rerun=rerun,
                                                  nodes=nodes, documents=documents, settled=settled))

    def observe(self, report: StepReport) -> Decision:
        decision = self._observe(report)
        decision.pin = self.rollback_target()
        return decision

    def _observe(self, report: StepReport) -> Decision:
        step = report.step
        if self._aborted is not None:
            return Decision("abort", self._aborted)
        if report.rerun is None and not report.settled:
            # Nothing is learnt or recorded yet: the step is reported again with its rerun, or settled.
            suspicious = self._suspicions(report)
            if suspicious and self.cfg.rerun:
                return Decision("rerun", f"step {step}: {_describe(suspicious)}; recomputing the step to tell "
                                         "the data from the hardware",
                                blame=self.cfg.blame_documents and any(f.kind == LOSS_SPIKE for f in suspicious))
            if self._staged and (suspicious or self._suspicions(report, divergence=True)):
                return Decision("settle", f"step {step}: looks anomalous while checkpoint(s) {sorted(self._staged)} "
                                          "are still being committed; judged once they are")
        verdict, suspects, exclude = None, [], []
        timed = report  # the first run's times: a rerun's are not the step's (its data was already there)
        if report.rerun is not None:
            verdict, suspects = self._compare(report, report.rerun)
            if verdict == "transient":
                exclude = self._suspect_hardware(report, suspects)
                report = report.rerun  # its gradients are the ones held now: judge them
        batch = report.batch if report.batch is not None else self.batch_for(step)
        self._note_progress(step)
        self._history.append((step, batch))
        self._next = (step + 1, self._skip_out(batch + 1))
        lr_factor = self.lr_factor(step)
        slow, slow_nodes = self._watch_stragglers(timed)
        exclude += [n for n in slow_nodes if n not in exclude]

        findings = self.detectors.check(step, report.loss, report.grad_norm, report.finite)
        disagree = check_ranks_agree(report.rank_grad_norm, self.cfg.rerun_tolerance)
        findings += [disagree] if disagree is not None else []
        blamed = self._blame(report, findings) if verdict == "reproduced" else []
        if not findings:
            decision = Decision("continue", lr_factor=lr_factor)
        elif blamed:
            decision = self._skip_blamed(report, batch, findings, blamed, lr_factor)
        else:
            self._verdict = verdict  # the decision's event says what the rerun showed
            try:
                decision = self._anomaly(report, batch, findings, lr_factor)
            finally:
                self._verdict = None
        decision.rerun, decision.suspects, decision.exclude_nodes = verdict, suspects, exclude
        decision.stragglers = slow
        return decision

    def _watch_stragglers(self, report: StepReport) -> tuple[list[int], list[str]]:
        """(ranks named slow at this step, nodes to exclude for it when guardian.straggler_exclude)."""
        nodes = report.nodes or []
        named, exclude = [], []
        for event in self.stragglers.observe(report.step, report.rank_own_s):
            rank = event["rank"]
            node = nodes[rank] if rank < len(nodes) else None
            event["node"] = node
            if event["event"] == "straggler":
                named.append(rank)
                event["reason"] = (f"rank {rank}{f' on node {node}' if node else ''} spent {event['own_s']:.3g} s "
                                   f"on its own part of each step (data wait + forwards) for {event['steps']} "
                                   f"steps, {event['ratio']:g}x the other ranks' {event['others_s']:.3g} s "
                                   f"(guardian.straggler_factor={self.cfg.straggler_factor:g})")
                if self.cfg.straggler_exclude and node is not None and node not in self._excluded:
                    self._excluded.append(node)
                    exclude.append(node)
                    event["reason"] += "; its node is excluded (guardian.straggler_exclude)"
            else:
                event["reason"] = (f"rank {rank}{f' on node {node}' if node else ''} is back to {event['own_s']:.3g} s "
                                   f"a step over the last {event['steps']} steps, {event['ratio']:g}x the other "
                                   f"ranks' {event['others_s']:.3g} s")
            self._emit(event)
        return named, exclude

    def _blame(self, report: StepReport, findings: list[Finding]) -> list[DocumentLoss]:
        """The documents that carry a reproduced loss spike, if a few of them do."""
        kinds = {f.kind for f in findings}
        if not report.documents or LOSS_SPIKE not in kinds or DIVERGENCE in kinds or len(self.detectors.losses) == 0:
            return []
        cfg = self.cfg
        return culprits(report.documents, self.detectors.losses.median(), max_docs=cfg.blame_max_docs,
                        max_tokens=cfg.blame_max_tokens, min_rise=cfg.spike_min_rise)

    def _skip_blamed(self, report: StepReport, batch: int, findings: list[Finding], blamed: list[DocumentLoss],
                     lr_factor: float) -> Decision:
        """Skip the step and blacklist the documents that carry its spike; the cause is known and removed, so
        the anomaly does not count towards a rollback."""
        self._add_skipped(batch, batch + 1)
        ids = [d.doc for d in blamed]
        self._blacklist = sorted(set(self._blacklist) | set(ids))
        documents = report.documents or []
        rest = [d for d in documents if d.doc not in set(ids)]
        rest_loss = sum(d.ce_sum for d in rest) / max(1, sum(d.tokens for d in rest))
        names = ", ".join(f"{d.doc} ({d.shard} row {d.shard_row}, loss {d.mean:.3g})" for d in blamed)
        reason = (f"step {report.step}: {_describe(findings)}; reproduced on the rerun. Without {len(blamed)} of "
                  f"its {len(documents)} documents the batch's loss is {rest_loss:.4g}, no spike: document(s) "
                  f"{names} blacklisted, update skipped")
        self._emit({"event": "blame", "step": report.step, "batch": batch, "loss": _json_float(report.loss),
                    "loss_without": rest_loss, "baseline": self.detectors.losses.median(),
                    "documents": [d.to_dict() for d in blamed], "reason": reason})
        decision = Decision("skip", reason, lr_factor=lr_factor, blacklist=ids)
        self._emit_decision(decision, report, batch, findings)
        return decision

    def blacklisted_documents(self) -> list[int]:
        """Every document blamed so far (hand these to a rebuilt data feed)."""
        return list(self._blacklist)

    def _anomaly(self, report: StepReport, batch: int, findings: list[Finding], lr_factor: float) -> Decision:
        step = report.step
        self._anomalies = [a for a in self._anomalies if a["step"] > step - self.cfg.window]
        self._anomalies.append({"step": step, "batch": batch, "kinds": [f.kind for f in findings],
                                "loss": _json_float(report.loss), "grad_norm": _json_float(report.grad_norm)})
        diverged = any(f.kind == DIVERGENCE for f in findings)
        too_many = len(self._anomalies) > self.cfg.skips_before_rollback
        if diverged or too_many:
            return self._rollback(report, batch, findings, diverged)
        return self._skip(report, batch, findings, lr_factor)

    def on_checkpoint_staged(self, step: int) -> None:
        """A checkpoint for `step` is being written; it becomes a rollback target once on_checkpoint(step)
        says every rank has committed it. Remembers the batch it resumes at, which only now is certain."""
        self._staged[step] = self.batch_for(step)
        if not self.detectors.at_baseline:
            # Saved on the way up to what may be a spike: kept, but never a rollback target.
            self._elevated.add(step)
            self._emit({"event": "checkpoint_elevated", "step": step, "since": self.detectors.rise_start})

    def on_checkpoint(self, step: int) -> None:
        """A checkpoint for `step` (training resumes at `step`) is committed and may be rolled back to."""
        if step > self._next[0] and self._history:
            # Ahead of the current timeline: it was written on a branch a rollback abandoned since.
            self._staged.pop(step, None)
            return
        self._checkpoints[step] = self._staged.pop(step, None)
        if self._checkpoints[step] is None:
            self._checkpoints[step] = self.batch_for(step)
        for old in sorted(self._checkpoints)[:-_MAX_CHECKPOINTS]:
            del self._checkpoints[old]
        open_anomalies = [a["step"] for a in self._anomalies if a["step"] > step - self.cfg.window]
        self._emit({"event": "checkpoint", "step": step, "batch": self._checkpoints[step],
                    "open_anomalies": open_anomalies})

    # ------------------------------------------------------------------ reruns

    def _suspicions(self, report: StepReport, divergence: bool = False) -> list[Finding]:
        """What would make this step an anomaly; divergence only when asked (a rerun cannot explain a trend)."""
        findings = [f for f in self.detectors.peek(report.step, report.loss, report.grad_norm, report.finite)
                    if divergence or f.kind != DIVERGENCE]
        disagree = check_ranks_agree(report.rank_grad_norm, self.cfg.rerun_tolerance)
        return findings + ([disagree] if disagree is not None else [])

    def _compare(self, first: StepReport, again: StepReport) -> tuple[str, list[int]]:
        """("reproduced" | "transient", the ranks whose summed loss or grad norm moved between the runs)."""
        tol = self.cfg.rerun_tolerance
        moved = []
        pairs = list(zip(first.rank_ce_sum or [], again.rank_ce_sum or [], first.rank_grad_norm or [],
                         again.rank_grad_norm or [], strict=False))
        for rank, (ce1, ce2, g1, g2) in enumerate(pairs):
            if not (_same(ce1, ce2, tol) and _same(g1, g2, tol)):
                moved.append(rank)
        same = (_same(first.loss, again.loss, tol) and _same(first.grad_norm, again.grad_norm, tol)
                and first.finite == again.finite and not moved)
        return ("reproduced", []) if same else ("transient", moved)

    def _suspect_hardware(self, first: StepReport, ranks: list[int]) -> list[str]:
        """Record a transient fault on `ranks`; returns the nodes that have now had too many of them."""
        nodes = first.nodes or []
        on = sorted({nodes[r] for r in ranks if r < len(nodes)})
        for node in on:
            self._suspects[node] = self._suspects.get(node, 0) + 1
        limit = self.cfg.suspect_node_limit
        exclude = [n for n in on if limit and self._suspects[n] >= limit and n not in self._excluded]
        self._excluded += exclude
        again = first.rerun
        who = ", ".join(f"rank {r}" + (f" on node {nodes[r]}" if r < len(nodes) else "") for r in ranks) or \
            "no single rank (the numbers moved after the collective)"
        self._emit({"event": "suspect_hardware", "step": first.step, "ranks": ranks, "nodes": on,
                    "loss": [_json_float(first.loss), _json_float(again.loss)],
                    "grad_norm": [_json_float(first.grad_norm), _json_float(again.grad_norm)],
                    "reason": f"step {first.step} gave loss {first.loss:.6g} / grad norm {first.grad_norm:.6g}, "
                              f"then {again.loss:.6g} / {again.grad_norm:.6g} on the same data and parameters: "
                              f"a transient fault on {who}; the rerun's update is used",
                    "events_on_node": {n: self._suspects[n] for n in on}})
        for node in exclude:
            self._emit({"event": "exclude_node", "step": first.step, "node": node,
                        "reason": f"{self._suspects[node]} transient faults on node {node} "
                                  f"(guardian.suspect_node_limit={limit}): the run goes on without it"})
        return exclude

    @property
    def excluded_nodes(self) -> list[str]:
        return list(self._excluded)

    # ------------------------------------------------------------------ queries

    def lr_factor(self, step: int) -> float:
        if self._cooldown is not None and self._cooldown[0] <= step < self._cooldown[1]:
            return self.cfg.cooldown_lr_factor
        return 1.0

    def skipped_ranges(self) -> list[tuple[int, int]]:
        """Every range [a, b) of global batches the data feed must skip (hand these to a rebuilt feed)."""
        return list(self._skipped)

    def checkpoints_exist(self, steps: list[int]) -> None:
        """These are all the checkpoints left in storage (retention deleted the others): forget the rest, so
        no rollback ever targets a deleted one."""
        gone = [c for c in self._checkpoints if c not in set(steps)]
        for c in gone:
            del self._checkpoints[c]
        if gone:
            self._emit({"event": "checkpoints_deleted", "steps": sorted(gone)})

    def rollback_target(self) -> int | None:
        """The checkpoint a rollback would go to if one were needed now: the newest one before every anomaly
        still inside the window (and before a divergence run under way). No later rollback goes further back
        until this one is reached, so it is the one to pin."""
        now = self._next[0] - 1
        starts = [a["step"] for a in self._anomalies if a["step"] > now - self.cfg.window]
        if self.detectors.divergence.run_start is not None:
            starts.append(self.detectors.divergence.run_start)
        if self.detectors.rise_start is not None:
            starts.append(self.detectors.rise_start)
        return self.healthy_checkpoint(min(starts, default=now + 1))

    def older_checkpoints(self, step: int) -> list[int]:
        """Known checkpoints older than `step`, newest first: where a rollback goes if `step` is unreadable."""
        return sorted((c for c in self._checkpoints if c < step), reverse=True)

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        """The loop could not load rollback target `intended` and loaded the older `actual` instead."""
        batch = self._checkpoints.get(actual, self.batch_for(actual))
        for c in [c for c in self._checkpoints if c > actual]:
            del self._checkpoints[c]
        self.detectors.rewind(actual)
        self._history = deque(((s, b) for s, b in self._history if s < actual), maxlen=self._history.maxlen)
        self._next = (actual, self._skip_out(batch))
        if self._rollbacks:
            self._rollbacks[-1]["to"] = actual
        if self._cooldown is not None:
            self._cooldown = (actual, actual + self.cfg.cooldown_steps)
        self._emit({"event": "rollback_fallback", "step": actual, "intended": intended, "rollback_to": actual,
                    "reason": reason})

    def resume_after_abort(self, reason: str) -> None:
        """The person running the job chose to go on after an abort: forget it, and allow max_rollbacks more."""
        if self._aborted is None:
            return
        self._aborted = None
        self._rollbacks_before_resume = len(self._rollbacks)
        self._emit({"event": "resumed_after_abort", "reason": reason, "rollbacks": self.rollbacks})

    def healthy_checkpoint(self, streak_start: int) -> int | None:
        """The newest committed checkpoint whose updates all predate a streak that began at `streak_start`,
        and that was saved with the loss at its baseline (not on the way up to a spike)."""
        return max((c for c in self._checkpoints if c <= streak_start and c not in self._elevated), default=None)

    def batch_for(self, step: int) -> int:
        """The global-batch index step `step` consumes in the current timeline."""
        next_step, next_batch = self._next
        if self._history and self._history[-1][0] == step == next_step - 1:
            return self._history[-1][1]  # the last step, reported again (a retried call)
        if step >= next_step:
            b = self._skip_out(next_batch)
            for _ in range(step - next_step):
                b = self._skip_out(b + 1)
            return b
        # Earlier than expected without a load_state_dict: map from the start of the stream.
        b = step
        for a, e in self._skipped:
            if a <= b:
                b += e - a
        return b

    @property
    def rollbacks(self) -> int:
        return len(self._rollbacks)

    @property
    def aborted(self) -> bool:
        return self._aborted is not None

    @property
    def events(self) -> list[dict]:
        return list(self._events)

    # ------------------------------------------------------------------ decisions

    def _skip(self, report: StepReport, batch: int, findings: list[Finding], lr_factor: float) -> Decision:
        self._add_skipped(batch, batch + 1)
        n, allowed = len(self._anomalies), self.cfg.skips_before_rollback
        reason = (f"step {report.step}: {_describe(findings)}; update skipped (anomaly {n} of {allowed} "
                  f"allowed within {self.cfg.window} steps before a rollback)")
        decision = Decision("skip", reason, lr_factor=lr_factor)
        self._emit_decision(decision, report, batch, findings)
        return decision

    def _rollback(self, report: StepReport, batch: int, findings: list[Finding], diverged: bool) -> Decision:
        step = report.step
        streak_start = min(a["step"] for a in self._anomalies)
        streak_batch = min(a["batch"] for a in self._anomalies)
        run_start = self.detectors.divergence.run_start
        if diverged and run_start is not None and run_start < streak_start:
            streak_batch = self._batch_in_history(run_start, batch - (step - run_start))
            streak_start = run_start
        rise_start = self.detectors.rise_start
        if rise_start is not None and rise_start < streak_start:
            # The loss was already climbing before the first anomaly: go back to before the climb.
            streak_batch = self._batch_in_history(rise_start, batch - (step - rise_start))
            streak_start = rise_start
        why = ("the loss diverged" if diverged else
               f"{len(self._anomalies)} anomalies within {self.cfg.window} steps "
               f"(guardian.skips_before_rollback={self.cfg.skips_before_rollback})")
        if self.rollbacks - self._rollbacks_before_resume >= self.cfg.max_rollbacks:
            used_up = f"{why}, and guardian.max_rollbacks={self.cfg.max_rollbacks} rollbacks are used up"
            return self._abort(report, batch, findings, used_up)
        target = self.healthy_checkpoint(streak_start)
        if target is None:
            known = sorted(self._checkpoints) or "none"
            elevated = sorted(c for c in self._checkpoints if c in self._elevated)
            no_target = (f"{why}, but no committed checkpoint saved at the loss baseline precedes the anomalies "
                         f"that began at step {streak_start} (checkpoints known: {known}"
                         f"{f'; saved while the loss was elevated: {elevated}' if elevated else ''}); "
                         "lower checkpoint.every_steps")
            return self._abort(report, batch, findings, no_target)

        target_batch = self._checkpoints[target]
        start = max(target_batch, streak_batch - self.cfg.rollback_skip_before)
        end = batch + 1 + self.cfg.rollback_skip_batches
        self._add_skipped(start, end)
        for c in [c for c in self._checkpoints if c > target]:
            del self._checkpoints[c]  # an abandoned branch
        self._staged = {c: b for c, b in self._staged.items() if c <= target}
        self.detectors.rewind(target)
        self._history = deque(((s, b) for s, b in self._history if s < target), maxlen=self._history.maxlen)
        self._anomalies.clear()
        self._next = (target, self._skip_out(target_batch))
        self._rollbacks.append({"at_step": step, "to": target, "skip": [start, end]})
        lr_factor = 1.0
        if self.cfg.cooldown_steps > 0 and self.cfg.cooldown_lr_factor < 1.0:
            self._cooldown = (target, target + self.cfg.cooldown_steps)
            lr_factor = self.cfg.cooldown_lr_factor
        reason = (f"step {step}: {_describe(findings)}; {why}: rolling back to checkpoint {target} (the last "
                  f"healthy one; anomalies began at step {streak_start}) and skipping global batches "
                  f"[{start}, {end}); rollback {self.rollbacks} of {self.cfg.max_rollbacks}")
        if lr_factor < 1.0:
            reason += f"; lr x{lr_factor:g} for {self.cfg.cooldown_steps} steps"
        decision = Decision("rollback", reason, lr_factor=lr_factor, rollback_to=target,
                            skip_range=(start, end), skip_ranges=self.skipped_ranges(),
                            fallbacks=self.older_checkpoints(target))
        self._emit_decision(decision, report, batch, findings)
        return decision

    def _abort(self, report: StepReport, batch: int, findings: list[Finding], why: str) -> Decision:
        history = "; ".join(f"step {r['at_step']} -> checkpoint {r['to']}, skipped batches "
                            f"[{r['skip'][0]}, {r['skip'][1]})" for r in self._rollbacks) or "none"
        streak = ", ".join(f"{a['step']} ({'+'.join(a['kinds'])})" for a in self._anomalies)
        lines = [
            f"guardian stopped run '{self.run_name}' at step {report.step} (global batch {batch}): {why}.",
            f"  this step: loss={report.loss}, grad_norm={report.grad_norm}, lr={report.lr}; "
            f"{_describe(findings)}",
            f"  anomalies within the last {self.cfg.window} steps: {streak or 'none'}",
            f"  rollbacks so far: {history}",
            f"  global batches skipped so far: {self._skipped or 'none'}",
            "  what to try: lower optim.lr or raise schedule.warmup_steps; look at the skipped batches; "
            "raise guardian.max_rollbacks or guardian.skips_before_rollback to keep going; every decision "
            "is in the run's guardian/events.jsonl",
        ]
        self._aborted = "\n".join(lines)
        decision = Decision("abort", self._aborted)
        self._emit_decision(decision, report, batch, findings)
        return decision

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """JSON-able; describes the guardian after the last reported step (the loop saves it in checkpoint
        `step` right before committing it)."""
        return {
            "version": STATE_VERSION,
            "detectors": self.detectors.state_dict(),
            "anomalies": [dict(a) for a in self._anomalies],
            "history": [list(h) for h in self._history],
            "next": list(self._next),
            "checkpoints": [[c, b] for c, b in sorted(self._checkpoints.items())],
            "skipped": [list(r) for r in self._skipped],
            "rollbacks": [dict(r) for r in self._rollbacks],
            "cooldown": None if self._cooldown is None else list(self._cooldown),
            "aborted": self._aborted,
            "rollbacks_before_resume": self._rollbacks_before_resume,
            "staged": [[c, b] for c, b in sorted(self._staged.items())],
            "elevated": sorted(self._elevated),
            "suspects": dict(self._suspects),
            "excluded": list(self._excluded),
            "blacklist": list(self._blacklist),
            "events": self._events[-_MAX_EVENTS_IN_STATE:],
            "seq": self._seq,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from a checkpoint's state, keeping what the live guardian knows (see the module doc)."""
        if not state:
            return  # a checkpoint written without a guardian (guardian.enabled was false, or not rank 0)
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"guardian state version {version!r} is not {STATE_VERSION}: this checkpoint "
                             "was written by another raytrainer version; start fresh (run.resume=false)")
        resume_step, resume_batch = (int(x) for x in state["next"])
        self.detectors.load_state_dict(state["detectors"])
        self._anomalies = [dict(a) for a in state["anomalies"]]
        self._history = deque((tuple(h) for h in state["history"]), maxlen=self._history.maxlen)
        live = {c: b for c, b in self._checkpoints.items() if c <= resume_step}
        self._checkpoints = {**live, **{int(c): int(b) for c, b in state["checkpoints"]}}
        self._checkpoints[resume_step] = resume_batch  # the checkpoint being restored is committed
        for a, b in state["skipped"]:
            self._add_skipped(int(a), int(b))
        if len(state["rollbacks"]) > len(self._rollbacks):
            self._rollbacks = [dict(r) for r in state["rollbacks"]]
        cooldown = state.get("cooldown")
        if cooldown is not None and (self._cooldown is None or cooldown[1] > self._cooldown[1]):
            self._cooldown = (int(cooldown[0]), int(cooldown[1]))
        self._aborted = self._aborted or state.get("aborted")
        self._rollbacks_before_resume = max(self._rollbacks_before_resume, int(state.get("rollbacks_before_resume", 0)))
        self._staged.update({int(c): int(b) for c, b in state.get("staged", []) if int(c) <= resume_step})
        self._elevated |= {int(c) for c in state.get("elevated", [])}
        for node, n in state.get("suspects", {}).items():
            self._suspects[node] = max(self._suspects.get(node, 0), int(n))
        self._excluded += [n for n in state.get("excluded", []) if n not in self._excluded]
        self._blacklist = sorted(set(self._blacklist) | {int(d) for d in state.get("blacklist", [])})
        by_seq = {e["seq"]: e for e in state.get("events", [])}
        by_seq.update({e["seq"]: e for e in self._events})
        self._events = [by_seq[s] for s in sorted(by_seq)]
        self._seq = max(self._seq, int(state.get("seq", 0)))
        self._next = (resume_step, self._skip_out(resume_batch))
        self._emit({"event": "restore", "step": resume_step, "batch": self._next[1],
                    "skipped": self.skipped_ranges(), "rollbacks": self.rollbacks})
        self._restored = True

    def replace_state(self, state: dict) -> None:
        """Become exactly the guardian that wrote `state`: the actor reloading its own durable copy after a
        restart. Unlike load_state_dict (a checkpoint's state, merged with what the live guardian knows), it
        merges nothing, registers no checkpoint and emits no event."""
        if not state:
            return
        version = state.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"guardian state version {version!r} is not {STATE_VERSION}: it was written by "
                             "another raytrainer version; start fresh (run.resume=false)")
        self.detectors.load_state_dict(state["detectors"])
        self._anomalies = [dict(a) for a in state["anomalies"]]
        self._history = deque((tuple(h) for h in state["history"]), maxlen=self._history.maxlen)
        self._next = (int(state["next"][0]), int(state["next"][1]))
        self._checkpoints = {int(c): int(b) for c, b in state["checkpoints"]}
        self._staged = {int(c): int(b) for c, b in state.get("staged", [])}
        self._elevated = {int(c) for c in state.get("elevated", [])}
        self._suspects = {str(n): int(c) for n, c in state.get("suspects", {}).items()}
        self._excluded = [str(n) for n in state.get("excluded", [])]
        self._blacklist = sorted(int(d) for d in state.get("blacklist", []))
        self._skipped = [(int(a), int(b)) for a, b in state["skipped"]]
        self._rollbacks = [dict(r) for r in state["rollbacks"]]
        cooldown = state.get("cooldown")
        self._cooldown = None if cooldown is None else (int(cooldown[0]), int(cooldown[1]))
        self._aborted = state.get("aborted")
        self._rollbacks_before_resume = int(state.get("rollbacks_before_resume", 0))
        self._events = [dict(e) for e in state.get("events", [])]
        self._seq = int(state.get("seq", 0))

    def _note_progress(self, step: int) -> None:
        """After a restore, the first step reported says how long the run made no progress and how many
        steps it does again: the cost of the failure, in the events log."""
        now = self.clock()
        if self._restored and self._last_seen is not None:
            last_step, last_time = self._last_seen
            self._emit({"event": "resumed", "step": step, "last_step_before": last_step,
                        "stalled_s": round(now - last_time, 3), "steps_redone": max(0, last_step + 1 - step)})
        self._restored = False
        self._last_seen = (step, now)

    # ------------------------------------------------------------------ helpers

    def _add_skipped(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self._skipped, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self._skipped = merged

    def _skip_out(self, batch: int) -> int:
        """The first batch at or after `batch` that is not skipped."""
        for a, b in self._skipped:
            if a <= batch < b:
                batch = b
        return batch

    def _batch_in_history(self, step: int, default: int) -> int:
        return next((b for s, b in reversed(self._history) if s == step), default)

    def _emit_decision(self, decision: Decision, report: StepReport, batch: int,
                       findings: list[Finding]) -> None:
        event = {
            "event": decision.action,
            "step": report.step,
            "batch": batch,
            "reason": decision.reason,
            "findings": [f.to_dict() for f in findings],
            "loss": _json_float(report.loss),
            "grad_norm": _json_float(report.grad_norm),
            "lr": report.lr,
            "lr_factor": decision.lr_factor,
            "tokens": report.tokens,
            "cursor": report.cursor,
            "rollbacks": self.rollbacks,
        }
        if self._verdict is not None:
            event["rerun"] = self._verdict
        if decision.action == "rollback":
            event["rollback_to"] = decision.rollback_to
            event["skip_range"] = list(decision.skip_range)
        self._emit(event)

    def _emit(self, event: dict) -> None:
        self._seq += 1
        event = {"seq": self._seq, "time": self.clock(), "run": self.run_name, **event}
        self._events.append(event)
        del self._events[:-_MAX_EVENTS_IN_STATE]
        if self.on_event is not None:
            self.on_event(event)


def _describe(findings: list[Finding]) -> str:
    return "; ".join(f.detail for f in findings)


def _scalar(x: Any) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _same(a: float, b: float, tolerance: float) -> bool:
    """Equal within a relative tolerance; two NaNs (or equal infinities) are the same result again."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)


def _json_float(x: float) -> float | str:
    """JSON has no NaN or infinity; keep them readable as strings."""
    return x if math.isfinite(x) else str(x)


__all__ = ["ACTIONS", "Decision", "Guardian", "GuardianAbort", "StepReport"]
