"""The per-worker training loop: the algorithm, with Ray and storage kept behind small interfaces.

    restore the latest checkpoint every rank can read (or start fresh)
    for each global step:
        take this rank's micro-batches of the global batch
        forward + backward (accumulated), global loss and pre-clip grad norm
        ask the guardian: continue | skip | roll back | abort
        apply (or skip) the optimizer step
        record the step's metrics (rank 0, in the background); checkpoint when due
        rank 0: tell the guardian of checkpoints every rank has committed; retention keeps its target

`raytrainer.train.ray_entry` builds a Trainer inside a Ray Train worker; tests build one in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from raytrainer.checkpoint.manager import CheckpointManager, TrainerState, all_ranks_agree
from raytrainer.config import Config
from raytrainer.data.tokenizers import load_tokenizer
from raytrainer.fault.blame import DocumentLoss, document_losses, merge, name_documents
from raytrainer.fault.guardian import Decision, GuardianAbort
from raytrainer.fault.preemption import Preempted
from raytrainer.metrics.recorder import NullRecorder
from raytrainer.train.engine import StepEngine, StepStats
from raytrainer.train.metrics import Throughput, perplexity

log = logging.getLogger("raytrainer.train")

METRICS_FLUSH_AT_SAVE_S = 5.0
STOP_COMMIT_WAIT_S = 60.0  # how long a stopping group waits to see its last checkpoint committed


class NodesExcluded(RuntimeError):
    """The guardian excluded a node after repeated transient faults there: the step is checkpointed, and the
    worker group must be restarted without it (the elastic policy keeps it out)."""


class Guardian(Protocol):
    def decide(self, step: int, stats: StepStats, cursor: dict, *, lr: float | None = None,
               batch: int | None = None, rerun: StepStats | None = None,
               nodes: list[str] | None = None, documents: list[DocumentLoss] | None = None,
               settled: bool = False) -> Decision: ...
    def on_checkpoint_staged(self, step: int) -> None: ...
    def on_checkpoint(self, step: int) -> None: ...
    def checkpoints_exist(self, steps: list[int]) -> None: ...
    def rollback_target(self) -> int | None: ...
    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None: ...
    def skipped_ranges(self) -> list[tuple[int, int]]: ...
    def blacklisted_documents(self) -> list[int]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NoGuardian:
    """guardian.enabled=false: never intervenes, but a non-finite step is still never applied."""

    def decide(self, step: int, stats: StepStats, cursor: dict, *, lr: float | None = None,
               batch: int | None = None, rerun: StepStats | None = None,
               nodes: list[str] | None = None, documents: list[DocumentLoss] | None = None,
               settled: bool = False) -> Decision:
        if not stats.finite:
            return Decision("skip", f"non-finite loss/grad at step {step}")
        return Decision()

    def skipped_ranges(self) -> list[tuple[int, int]]:
        return []

    def blacklisted_documents(self) -> list[int]:
        return []

    def on_checkpoint_staged(self, step: int) -> None:
        pass

    def on_checkpoint(self, step: int) -> None:
        pass

    def checkpoints_exist(self, steps: list[int]) -> None:
        pass

    def rollback_target(self) -> int | None:
        return None

    def rollback_fell_back(self, intended: int, actual: int, reason: str) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class WorkerEnv:
    """What the loop needs from its surroundings (Ray Train, or a test)."""

    rank: int = 0
    world_size: int = 1
    # Metrics to the driver / Ray; with checkpoint_step, rank 0 also registers that committed checkpoint.
    report: Callable[..., None] = lambda metrics, checkpoint_step=None: None
    registers_checkpoints: bool = False  # report() registers committed checkpoints (Ray Train)
    broadcast: Callable[[Any], Any] = lambda obj: obj  # rank 0's object to every rank
    gather: Callable[[Any], list[Any]] = lambda obj: gather_objects(obj)  # every rank's object, in rank order
    agree: Callable[[bool], bool] = all_ranks_agree  # True everywhere only if True on every rank
    announce: Callable[[dict], None] = lambda record: None  # rank 0's records to the driver's live view
    nodes: list[str] = field(default_factory=list)  # every rank's node (rank order), to name suspects
    notice: Callable[[], str | None] = lambda: None  # why this rank was told to stop (SIGTERM, preemption), if it was
    pause_request: Callable[[], str | None] = lambda: None  # rank 0: why the driver asked the run to pause (Ctrl-C)
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)  # fault-injection hooks (tests)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        env: WorkerEnv,
        engine: StepEngine,
        feed_factory: Callable[[dict | None], Any],
        checkpoints: CheckpointManager,
        guardian: Guardian,
        injector: Any = None,
        watchdog: Any = None,
        recorder: Any = None,
        validation: Any = None,
    ):
        self.cfg = cfg
        self.env = env
        self.engine = engine
        self.feed_factory = feed_factory
        self.checkpoints = checkpoints
        self.guardian = guardian
        self.injector = injector
        self.watchdog = watchdog
        self.recorder = recorder if recorder is not None and env.rank == 0 else NullRecorder()
        self.validation = validation  # raytrainer.data.validation.ValidationBatches, when eval is on
        self.feed: Any = None
        self.history: list[dict] = []  # one record per step on this rank, for tests and reports
        self.evals: list[dict] = []  # one record per evaluation
        self.last_checkpoint_time = time.monotonic()
        self.throughput = Throughput(cfg, env.world_size)
        self.start_step = 0
        self._last_step_end: float | None = None
        self._recent_rates: list[float] = []
        self._pin: int | None = None  # the guardian's current rollback target (rank 0)
        self._last_entry: dict = {}  # the last step's metrics (a checkpoint keeps them)
        self.tokens_seen = 0  # tokens of the updates in the model now (a rollback takes them back)
        self._decode: Any = None  # the dataset tokenizer's decode, loaded on the first blame (False: cannot)
        self._told = False  # this rank's stop notice is in the log
        self._pause: str | None = None  # rank 0: the driver's request to pause, once seen
        self.paused: str | None = None  # the run checkpointed and ended at the driver's request (every rank)
        self._committed: set[int] = set()  # checkpoints rank 0 has seen committed by every rank

    # ------------------------------------------------------------------ the algorithm

    def fit(self) -> dict:
        try:
            result = self._fit()
        except BaseException as e:
            step = self.history[-1]["step"] + 1 if self.history else self.start_step
            first_line = (str(e).splitlines() or [""])[0][:500]
            if isinstance(e, GuardianAbort):
                self.note("abort", step=step, reason=first_line)
            else:
                self.note("stopped", step=step, reason=f"{type(e).__name__}: {first_line}")
            self.recorder.close(timeout_s=10.0)
            raise
        self.recorder.close()
        return result

    def _fit(self) -> dict:
        step = self.start_step = self.restore()
        if step >= self.cfg.train.steps and step > 0:
            if self.env.rank == 0:
                log.warning("run %s already finished at step %d (%s): nothing to do; raise train.steps to train "
                         "further, or pick a new run.name for a new run", self.cfg.run.name, step,
                         self.checkpoints.store.step_url(step))
            self.checkpoints.finish()
            return {"step": step, "history": self.history, "already_finished": True}
        while step < self.cfg.train.steps and self.paused is None:
            step = self.train_step(step)
        if self.paused is None:
            self.save(step, final=True)
        self.checkpoints.settle()
        self.keep_books()
        self.checkpoints.finish()
        if self.paused is None:
            self.note("finish", step=step, tokens_seen=self.tokens_seen)
        if self.env.registers_checkpoints:
            # Every rank reports, as at every log step; Ray registers the checkpoint only once all of them
            # are here, so after each rank has committed its part. A checkpoint whose commit was seen after the
            # last log step (a slow upload) is registered first, so Ray Train's list misses none.
            final = self.history[-1] if self.history else {"step": step}
            late = self.env.broadcast(self.checkpoints.unregistered() if self.env.rank == 0 else None)
            for earlier in late:
                self.env.report(final, earlier if self.env.rank == 0 else None)
            self.env.report(final, step if self.env.rank == 0 else None)
        return {"step": step, "history": self.history, **({"paused": self.paused} if self.paused else {})}

    def train_step(self, step: int) -> int:
        """Run global step `step`; return the next step to run (smaller after a rollback)."""
        with self._watch(step):
            t0 = time.perf_counter()
            micro_batches = self.feed.next_step()
            data_wait = time.perf_counter() - t0
            if self.injector is not None:
                micro_batches = self.injector.before_forward(step, micro_batches)
            stopping = self.note_pause_request() | (self.cfg.checkpoint.on_preemption and self.note_stop_notice())
            stats = self.engine.forward_backward(micro_batches, step, data_wait_s=data_wait, stopping=stopping)
            told = [r for r, flag in enumerate(stats.metrics.get("rank_stopping", [])) if flag]
            decision = self.decide(step, stats)
            if decision.action == "settle":
                decision = self.settle_then_decide(step, stats)
            if decision.action == "rerun":
                stats, decision = self.rerun(step, micro_batches, stats, data_wait, blame=decision.blame)

        if decision.action == "abort":
            raise GuardianAbort(decision.reason)
        if decision.action == "rollback":
            return self.rollback(step, decision)
        applied = self.engine.apply(skip=decision.action == "skip", lr_factor=decision.lr_factor)
        self.record(step, stats, decision, applied)
        if decision.stragglers and self.env.rank == 0:
            self.note_stragglers(step, stats, decision)
        step += 1
        if self.eval_due(step):
            self.evaluate(step)
        saved = self.checkpoint_due(step)
        if saved:
            self.save(step)
            self._last_step_end = None  # a save's stall is measured by the checkpoint bench, not as a slow step
        self.keep_books(decision.pin)
        if decision.exclude_nodes:
            self.leave(step, decision.exclude_nodes, saved)
        if told:
            self.stop_for_notice(step, told, saved)
        return step

    def note_stop_notice(self) -> bool:
        """Whether this rank was told to stop; said once in the log (by this rank: it may be the only one)."""
        reason = self.env.notice()
        if reason is not None and not self._told:
            self._told = True
            log.warning("rank %d was told to stop (%s): every rank checkpoints at the end of this step, then the "
                        "group stops and restarts from that checkpoint", self.env.rank, reason)
        return reason is not None

    def note_pause_request(self) -> bool:
        """Rank 0: whether the driver asked the run to pause (it travels to the other ranks with the step's
        stop flags)."""
        if self.env.rank == 0 and self._pause is None:
            self._pause = self.env.pause_request()
        return self._pause is not None

    def stop_for_notice(self, step: int, ranks: list[int], saved: bool) -> None:
        """Some ranks were told to stop: checkpoint the whole group now, wait until it is committed, and end the
        group, so the next one starts from this step instead of from the last scheduled checkpoint. When the
        driver asked for it (a pause), the run ends there instead of restarting; submitted again, it resumes."""
        if step >= self.cfg.train.steps:
            return  # the run's final checkpoint comes next anyway
        t0 = time.perf_counter()
        if not saved:
            self.save(step)
        # Rank 0 sees the commit once every rank's record is listed; the group ends only after that (or a minute).
        self.checkpoints.settle(STOP_COMMIT_WAIT_S)
        self.keep_books()
        if not self.env.broadcast(step in self._committed if self.env.rank == 0 else None) and self.env.rank == 0:
            log.warning("step %d: the stop checkpoint was not seen committed by every rank within %.0f s; the next "
                        "group starts from the newest complete one", step, STOP_COMMIT_WAIT_S)
        pause = self.env.broadcast(self._pause if self.env.rank == 0 else None)
        if pause is not None:
            self.paused = pause
            self.note("paused", step=step, checkpoint=self.checkpoints.store.step_url(step),
                      save_s=time.perf_counter() - t0, reason=pause)
            return
        nodes = sorted({self.env.nodes[r] for r in ranks if r < len(self.env.nodes)})
        self.note("preempted", step=step, ranks=ranks, nodes=nodes, checkpoint=self.checkpoints.store.step_url(step),
                  save_s=time.perf_counter() - t0, reason=self.env.notice() or "told to stop")
        raise Preempted(f"step {step}: rank(s) {', '.join(map(str, ranks))}"
                        f"{' on node(s) ' + ', '.join(nodes) if nodes else ''} were told to stop (a SIGTERM or a "
                        f"preemption notice); checkpoint {step} is committed, and the next worker group starts there")

    def leave(self, step: int, nodes: list[str], saved: bool) -> None:
        """Checkpoint now (every rank), wait until it is committed, then end this worker group so the next one
        is placed without `nodes`: nothing trained on them so far is lost."""
        if not saved and step < self.cfg.train.steps:
            self.save(step)
        self.checkpoints.settle()
        self.keep_books()
        raise NodesExcluded(f"step {step}: the guardian excluded node(s) {', '.join(nodes)} after repeated "
                            f"transient faults (guardian.suspect_node_limit={self.cfg.guardian.suspect_node_limit}); "
                            f"checkpoint {step} is committed and the workers restart without them")

    # ------------------------------------------------------------------ pieces

    def decide(self, step: int, stats: StepStats, rerun: StepStats | None = None,
               documents: list[DocumentLoss] | None = None, settled: bool = False) -> Decision:
        if getattr(stats, "overflow", False) and rerun is None:
            # Routine fp16 loss-scale overflow: the scaler already halved the scale; not an anomaly.
            return Decision("skip", f"fp16 gradient overflow at loss scale {stats.metrics.get('loss_scale')}")
        # One guardian round trip per step, from rank 0; every rank acts on the same decision.
        decision = None
        if self.env.rank == 0:
            decision = self.guardian.decide(step, stats, self.feed.cursor(), lr=self.engine.current_lr,
                                            batch=self.feed.batch_index, rerun=rerun,
                                            nodes=self.env.nodes or None, documents=documents, settled=settled)
        decision = self.env.broadcast(decision)
        if decision.action != "continue" and self.env.rank == 0:  # the driver's view prints it
            log.info("step %d: guardian says %s (%s)", step, decision.action, decision.reason)
        return decision

    def note_stragglers(self, step: int, stats: StepStats, decision: Decision) -> None:
        """Rank 0: a rank the guardian has just named slow goes on record and to the driver, once."""
        own = stats.metrics.get("rank_own_s", [])
        for rank in decision.stragglers:
            node = self.env.nodes[rank] if rank < len(self.env.nodes) else None
            self.note("straggler", step=step, rank=rank, node=node, own_s=own[rank] if rank < len(own) else None,
                      exclude=decision.exclude_nodes)
            log.warning("step %d: rank %d%s is a straggler: its data wait + forwards took %.3g s a step for "
                        "guardian.straggler_steps=%d steps, over guardian.straggler_factor=%g x the others'; see "
                        "the run's guardian/events.jsonl", step, rank, f" on node {node}" if node else "",
                        own[rank] if rank < len(own) else float("nan"), self.cfg.guardian.straggler_steps,
                        self.cfg.guardian.straggler_factor)

    def settle_then_decide(self, step: int, stats: StepStats) -> Decision:
        """The step looks anomalous while a checkpoint is being committed (guardian.rerun=false, or a divergence):
        every rank's uploads are committed and the guardian told before it judges, so a rollback can reach the
        checkpoint saved just before the trouble even while a slow rank is still uploading its part."""
        self.checkpoints.settle()
        self.keep_books()
        decision = self.decide(step, stats, settled=True)
        if decision.action == "settle":  # a guardian that asks twice would loop: judge it as a skip
            decision = Decision("skip", f"step {step}: the guardian asked to settle twice; update skipped")
        return decision

    def rerun(self, step: int, micro_batches: list[dict], stats: StepStats, data_wait: float, blame: bool = False
              ) -> tuple[StepStats, Decision]:
        """The guardian found the step suspicious: compute it again from the same parameters, RNG state
        and micro-batches, and let it judge both (with the rerun's loss by document, when it asks to `blame`).
        Returns the rerun's stats (its gradients are held now)."""
        if self.injector is not None:
            self.injector.before_rerun(step)
        # The judgement may be a rollback (guardian.skips_before_rollback=0, a divergence): every rank's uploads
        # are committed and the guardian told first, so the checkpoint saved just before this step is a target
        # even while a slow rank is still uploading its part
        self.checkpoints.settle()
        self.keep_books()
        again = self.engine.recompute(micro_batches, step, data_wait_s=data_wait, token_losses=blame)
        documents = self.documents(again, micro_batches) if blame else None
        decision = self.decide(step, stats, rerun=again, documents=documents)
        if decision.action == "rerun":  # a guardian that asks twice would loop: take the first answer as final
            decision = Decision("skip", f"step {step}: the guardian asked for a second rerun; update skipped")
        if decision.rerun == "transient":
            self.note("suspect_hardware", step=step, ranks=decision.suspects,
                      nodes=[self.env.nodes[r] for r in decision.suspects if r < len(self.env.nodes)],
                      loss=[stats.loss, again.loss], grad_norm=[stats.grad_norm, again.grad_norm],
                      exclude=decision.exclude_nodes)
        if decision.blacklist:
            self.feed.blacklist_documents(decision.blacklist)  # every rank: from the next step on
            self.note("blame", step=step, documents=[d.to_dict() for d in documents or []
                                                      if d.doc in set(decision.blacklist)])
        return again, decision

    def documents(self, stats: StepStats, micro_batches: list[dict]) -> list[DocumentLoss] | None:
        """Every rank: its rows' token losses by document. Rank 0 gets every rank's, united, the likely culprits
        named by their first characters; the others get None."""
        mine: list[DocumentLoss] = []
        # the ranks of a replica hold the same rows: the one that computed their losses speaks for them
        speaks = self.engine.strategy.dims.holds_losses(self.env.rank)
        first, end = self.feed.last_rows if stats.token_ce and speaks else (0, 0)
        n = end - first
        if n > 0:
            def rows(key: str):
                return torch.cat([mb[key] for mb in micro_batches])[:n].numpy()

            mine = document_losses(torch.cat(stats.token_ce)[:n].numpy(), rows("labels"), rows("doc_ids"),
                                   rows("input_ids"), self.feed.last_plan.segments, first, self.feed.shard_paths)
        everyone = self.env.gather(mine)
        if self.env.rank != 0:
            return None
        documents = merge(everyone)
        decode = self._decoder()
        if decode is not None:
            name_documents([d for d in documents if d.mean > stats.loss], decode)
        return documents

    def _decoder(self) -> Callable[[list[int]], str] | None:
        if self._decode is None:
            try:
                self._decode = load_tokenizer(self.cfg.data.tokenizer).decode
            except Exception as e:  # naming the documents is a courtesy: their ids and places still go on record
                log.warning("cannot load tokenizer %r to show blamed documents' text (%s); their ids, shards and "
                            "rows are still recorded", self.cfg.data.tokenizer, e)
                self._decode = False
        return self._decode or None

    def note(self, kind: str, **fields) -> None:
        """Rank 0: a metrics record, on record and on its way to the driver's live view."""
        if self.env.rank == 0:
            self.env.announce(self.recorder.log(kind, **fields))

    def keep_books(self, pin: int | None = None) -> None:
        """Rank 0: checkpoints every rank has committed become rollback targets; retention then keeps the
        guardian's target (`pin`) and deletes, in the background, what the guardian has just forgotten."""
        if self.env.rank != 0:
            return
        self._pin = pin if pin is not None else self._pin
        committed = self.checkpoints.committed()
        for step in committed:
            self.guardian.on_checkpoint(step)
            self.note("checkpoint", step=step, url=self.checkpoints.store.step_url(step))
            self._committed.add(step)
        if committed:  # a newer checkpoint may now be the target: ask, so retention can let the old pin go
            self._pin = self.guardian.rollback_target()
        if committed or self._pin is not None:
            if self.checkpoints.retain(self._pin):
                self.guardian.checkpoints_exist(self.checkpoints.complete_steps())

    def rollback(self, step: int, decision: Decision) -> int:
        target = decision.rollback_to
        if self.env.rank == 0:
            log.info("step %d: rolling back in place to checkpoint step %s, skipping global batches %s",
                        step, target, decision.skip_range)
        self.engine.zero_grad()
        self.checkpoints.wait()  # this rank's uploads are done: nothing is written behind the load
        # The target first: only once it is loaded is the abandoned branch deleted. If every rank cannot read
        # it, the next older healthy checkpoint is used, and the guardian is told.
        candidates = [target, *decision.fallbacks]
        state = self.checkpoints.load_first_good(candidates, self.engine, f"rollback at step {step}")
        if state is None:
            raise GuardianAbort(f"step {step}: the guardian rolled back, but none of the checkpoints {candidates} "
                                f"could be loaded (see the warnings above); inspect them with `raytrainer inspect "
                                f"--run {self.cfg.run.name}`")
        if state.step != target and self.env.rank == 0:
            self.guardian.rollback_fell_back(target, state.step, f"checkpoint {target} could not be loaded")
        # Checkpoints after the one loaded belong to the abandoned branch: a later crash must not resume there.
        self.checkpoints.discard_after(state.step)
        self.feed = self.feed_factory(state.cursor)
        self.tokens_seen = int(state.metrics.get("tokens_seen", 0))
        self.note("rollback", step=step, to=state.step, abandoned=[state.step, step],
                  skip=decision.skip_range, reason=decision.reason, intended=target)
        # The checkpoint's cursor predates ranges the guardian added since, so apply all of them.
        for start, end in decision.skip_ranges or ([decision.skip_range] if decision.skip_range else []):
            self.feed.skip_batches(start, end)
        self.blacklist_blamed()
        # The guardian's own state stays the live one (it knows about this rollback); only the
        # model, optimizer, schedule and data position go back.
        self.history.append({"step": step, "action": "rollback", "to": state.step, "skip": decision.skip_range})
        return state.step

    def restore(self) -> int:
        state = self.checkpoints.load_latest(self.engine)
        branched_from = None
        if state is None and self.cfg.model.init_state == "full":
            state, branched_from = self.branch()
        if state is None:
            self.feed = self.feed_factory(None)
            step = 0
        else:
            if branched_from is None:  # a branch's guardian starts fresh: its run's curve is another one
                self.guardian.load_state_dict(state.guardian)
                if self.env.rank == 0:  # retention of an earlier attempt may have deleted checkpoints it knew
                    self.guardian.checkpoints_exist(self.checkpoints.complete_steps())
            self.feed = self.feed_factory(state.cursor)
            step = state.step
            self.tokens_seen = int(state.metrics.get("tokens_seen", 0))
        resumed = state is not None and branched_from is None
        self.note("resume" if resumed else "start", step=step, world_size=self.env.world_size,
                  steps=self.cfg.train.steps, checkpoint=self.checkpoints.store.step_url(step) if resumed else None,
                  **({"branched_from": branched_from} if branched_from else {}))
        # The live guardian may know of skipped windows newer than the checkpoint (a rollback, then a
        # crash before the next save): every rank applies them, so no restart replays a skipped window.
        ranges = self.env.broadcast(self.guardian.skipped_ranges() if self.env.rank == 0 else None)
        for start, end in ranges or []:
            self.feed.skip_batches(start, end)
        self.blacklist_blamed()
        how = "resumed" if resumed else f"branched from {branched_from}" if branched_from else "starting fresh"
        log.info("rank %d: %s at step %d", self.env.rank, how, step)
        return step

    def branch(self) -> tuple[TrainerState, str]:
        """model.init_state=full: another run's checkpoint, whole, is this run's starting point (its data
        position only when the data is the same; see raytrainer.warm_start)."""
        from raytrainer.warm_start import branch_point, same_data

        store, step, source_cfg = branch_point(self.cfg)
        step = self.env.broadcast(step)  # the source may still be writing: every rank takes rank 0's newest
        state = self.checkpoints.load(step, self.engine, store=store)
        if not same_data(source_cfg, self.cfg):
            state.cursor = None
        if self.env.rank == 0:
            log.info("branched from %s at step %d: model, optimizer and step%s; the schedule goes on under this "
                     "run's settings (model.init_state=full)", store.step_url(step), step,
                     ", data position" if state.cursor is not None else
                     "; the data section differs from the source's, so the data starts at its beginning")
        return state, store.step_url(step)

    def blacklist_blamed(self) -> None:
        """Every rank, on a rebuilt feed: the checkpoint's cursor may predate documents blamed since."""
        blamed = self.env.broadcast(self.guardian.blacklisted_documents() if self.env.rank == 0 else None)
        if blamed:
            self.feed.blacklist_documents(blamed)

    def eval_due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return self.validation is not None and every is not None and (
            step % every == 0 or step == self.cfg.train.steps)

    def evaluate(self, step: int) -> dict:
        """Validation loss of the model after `step` steps, on the same tokens at every evaluation."""
        t0 = time.perf_counter()
        loss, tokens = self.engine.evaluate(self.validation.batches)
        record = {"step": step, "val_loss": loss, "val_perplexity": perplexity(loss), "tokens": tokens,
                  "time_s": time.perf_counter() - t0}
        self.note("eval", **record)
        self.evals.append(record)
        self._last_step_end = None  # an evaluation is not part of the next step's time
        return record

    def checkpoint_due(self, step: int) -> bool:
        ck = self.cfg.checkpoint
        if step >= self.cfg.train.steps:
            return False  # the final checkpoint is written by fit()
        by_steps = ck.every_steps is not None and step % ck.every_steps == 0
        by_time = False
        if ck.every_minutes is not None and self.env.rank == 0:
            by_time = time.monotonic() - self.last_checkpoint_time >= ck.every_minutes * 60
        if ck.every_minutes is not None:
            by_time = bool(self.env.broadcast(by_time))  # every rank must agree to enter the save
        return by_steps or by_time

    def save(self, step: int, final: bool = False) -> None:
        if self.env.rank == 0:
            self.guardian.on_checkpoint_staged(step)
            # The metrics of every step before a checkpoint are on storage before it can be resumed from, so a
            # crash loses only steps that will be trained again. Bounded: a sick store costs a warning, not
            # a stalled run.
            self.recorder.flush(timeout_s=METRICS_FLUSH_AT_SAVE_S)
        state = TrainerState(
            step=step,
            cursor=self.feed.cursor(),
            guardian=self.guardian.state_dict() if self.env.rank == 0 else {},
            metrics=self._last_entry,
        )
        self.checkpoints.save(state, self.engine, final=final)
        self.last_checkpoint_time = time.monotonic()

    def record(self, step: int, stats: StepStats, decision: Decision, applied: bool) -> None:
        # Wall time between steps: data, guardian round trip and optimizer step included, not just the math.
        now = time.perf_counter()
        wall = now - self._last_step_end if self._last_step_end is not None else stats.time_s
        self._last_step_end = now
        rate = self.throughput.update(stats.tokens, wall, seq_len=stats.seq_len, attended_pairs=stats.attended_pairs)
        self._recent_rates = (self._recent_rates + [rate.get("tokens_per_s", 0.0)])[-20:]
        rate["median_tokens_per_s"] = sorted(self._recent_rates)[len(self._recent_rates) // 2]
        if applied:
            self.tokens_seen += stats.tokens
        busy = stats.metrics.get("rank_busy_s") or [stats.time_s]
        waits = stats.metrics.get("rank_data_wait_s") or [0.0]
        entry = {
            "step": step,
            "loss": stats.loss,
            "perplexity": perplexity(stats.loss),
            "grad_norm": stats.grad_norm,
            "lr": self.engine.current_lr,
            "tokens": stats.tokens,
            "tokens_seen": self.tokens_seen,
            "seq_len": stats.seq_len,
            "batch": self.feed.batch_index,  # the global batch this step trained on (skips shift it)
            "action": decision.action,
            "reason": decision.reason if decision.action != "continue" else None,
            "rerun": decision.rerun,
            "applied": applied,
            "start_step": self.start_step,  # where this attempt began: shows resumes in reports
            "data_wait_s": waits[self.env.rank] if self.env.rank < len(waits) else waits[0],
            "data_wait_max_s": max(waits),
            # Every rank's data wait + forward + backward: the spread is how long the fastest waited.
            "step_time_spread_s": max(busy) - min(busy),
            "slowest_rank": max(range(len(busy)), key=busy.__getitem__),
            "flops": self.throughput.step_flops(stats.tokens, stats.seq_len, stats.attended_pairs),
            **{k: v for k, v in stats.metrics.items() if k.startswith("moe_")},  # routing of a mixture of experts
            **rate,
        }
        self._last_entry = entry
        self.history.append(entry)
        self.note("step", **entry)
        if step % self.cfg.train.log_every == 0 or decision.action != "continue" or step == self.cfg.train.steps - 1:
            if self.env.rank == 0:
                log.info(
                    "step %5d/%d  loss %.4f  ppl %.1f  gnorm %.3f  lr %.2e  tok/s %.0f  mfu %.1f%%%s",
                    step, self.cfg.train.steps, stats.loss, entry["perplexity"], stats.grad_norm,
                    entry["lr"], rate.get("tokens_per_s", 0.0), 100 * rate.get("mfu", 0.0),
                    "" if decision.action == "continue" else f"  [{decision.action}: {decision.reason}]",
                )
            registered = None
            if self.env.registers_checkpoints and self.env.rank == 0:
                registered = self.checkpoints.next_to_register()
            self.env.report(entry, registered)

    def _watch(self, step: int):
        if self.watchdog is None:
            return _nullcontext()
        return self.watchdog.step(step)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def set_worker_threads(cfg: Config, local_world_size: int) -> None:
    """Each worker gets its share of the cores, or 2 workers on 2 cores fight over 4 threads."""
    import os

    threads = cfg.train.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(threads)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
