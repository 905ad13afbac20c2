"""The whole training state in one checkpoint and back, and rank 0's keeping of the run's checkpoints.

    step_XXXXXXXX/
        model/                      model + optimizer (+ EMA) shards: DCP for ddp/fsdp, DeepSpeed's format
        trainer_state.json          rank 0: step, data cursor, guardian state, engine state, config, metrics
        rng/rank-XXXXX.json         every rank's RNG states
        _commit/rank-XXXXX.json     written by the store after each rank's upload (sizes, sha256)

Every rank stages its own files locally and hands them to the CheckpointStore, which uploads and commits
them. With checkpoint.async_upload the step waits only for a host-memory copy of the model and optimizer
state; the upload thread writes it to disk, then uploads it.

Rank 0 keeps the books, never blocking a step: `committed()` names the steps every rank has committed (only
those may become rollback targets), `retain(pin)` applies retention after each commit (the newest
`keep_last`, multiples of `keep_every`, and `pin`, the guardian's rollback target), and deletions run in
the background. Loading tries candidates newest first and takes the first that every rank could read; a
checkpoint found damaged is marked so and named in the log.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytrainer.checkpoint.housekeeping import Housekeeper
from raytrainer.checkpoint.records import CheckpointCorrupt, CheckpointError
from raytrainer.checkpoint.retention import kept
from raytrainer.checkpoint.rng import rng_state, set_rng_state
from raytrainer.checkpoint.store import CheckpointStore
from raytrainer.config import Config, to_dict

log = logging.getLogger("raytrainer.checkpoint")

STATE_FILE = "trainer_state.json"
MODEL_DIR = "model"


@dataclass
class TrainerState:
    step: int
    cursor: dict
    guardian: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    world_size: int = 1
    strategy: str = "ddp"
    config: dict = field(default_factory=dict)


def run_store(cfg: Config) -> CheckpointStore:
    """The run's CheckpointStore as the trainer writes it: checkpoint.storage/<run name>, plus the mirror."""
    ck = cfg.checkpoint
    return CheckpointStore(ck.storage, cfg.run.name, ck.s3, mirror=ck.mirror, upload_retry_s=ck.upload_retry_s)


def default_staging_dir(run_name: str, rank: int) -> Path:
    return Path(tempfile.gettempdir()) / "raytrainer" / run_name / f"rank-{rank:05d}"


class CheckpointManager:
    """Saves and restores TrainerState + engine through the run's CheckpointStore; rank 0 keeps the books.

    `env` needs rank, world_size, broadcast (rank 0's object to every rank) and agree (True on every rank
    only if it is True on every rank)."""

    def __init__(self, cfg: Config, env: Any, store: CheckpointStore | None = None,
                 staging_root: str | Path | None = None):
        self.cfg = cfg
        self.env = env
        self.store = store or run_store(cfg)
        self.staging = (Path(staging_root) / f"rank-{env.rank:05d}" if staging_root
                        else default_staging_dir(cfg.run.name, env.rank))
        self.rank0 = env.rank == 0
        self.housekeeper = Housekeeper(self.store) if self.rank0 else None
        # Rank 0's books: complete steps in storage, pinned ones, committed steps not yet handed out.
        self._complete: set[int] = set()
        self._pinned: set[int] = set()
        self._ready: list[int] = []
        self._final: set[int] = set()
        self._passed_over: set[int] = set()  # newer steps a resume could not use, kept until saved again
        self._unregistered: list[int] = []  # committed, not yet registered with Ray Train

    # ------------------------------------------------------------------ save

    def save(self, state: TrainerState, engine: Any, final: bool = False) -> None:
        local = self.staging / f"save-{state.step:08d}-{uuid.uuid4().hex[:8]}"
        local.mkdir(parents=True)
        in_background = self.cfg.checkpoint.async_upload and not final
        # Asynchronous: the step waits only for a host-memory copy of the state; the upload thread writes
        # it to local disk and then uploads it (strategies that cannot stage write it here and now).
        write = engine.stage_checkpoint(local / MODEL_DIR) if in_background else None
        if write is None:
            engine.save_checkpoint(local / MODEL_DIR)
        (local / "rng").mkdir()
        (local / "rng" / f"rank-{self.env.rank:05d}.json").write_text(json.dumps(rng_state()))
        if self.rank0:
            state.engine = engine.state_dict()
            state.world_size = self.env.world_size
            state.strategy = self.cfg.parallel.strategy
            state.config = to_dict(self.cfg)
            (local / STATE_FILE).write_text(json.dumps(asdict(state), default=_json_default))
        if self.rank0 and state.step in self._passed_over:
            # The damaged leftover of this step must not mix with the new save; the other ranks upload only
            # after the broadcast below. (No listing here: a storage outage must fail the upload, not the step.)
            self._passed_over.discard(state.step)
            self.store.delete(state.step)
        save_id = self.env.broadcast(uuid.uuid4().hex if self.rank0 else None)
        args = (state.step, local, self.env.rank, self.env.world_size, {"final": final}, save_id, True)
        if final:
            self._final.add(state.step)
        if in_background:
            self.store.save_rank_async(*args, write_first=write)
            if self.rank0:
                self.housekeeper.watch(state.step)
        else:
            self.store.save_rank(*args)
            self.env.broadcast(None)  # every rank has committed its part
            if self.rank0 and self.store.is_complete(state.step):
                self._ready.append(state.step)
        if self.rank0:
            log.info("checkpoint step %d staged (%s upload)", state.step, "async" if in_background else "sync")

    def wait(self) -> None:
        """Block until this rank's uploads are done; raise the first failure."""
        self.store.wait()

    # ------------------------------------------------------------------ rank 0's books

    def committed(self) -> list[int]:
        """Rank 0: steps every rank has committed since the last call, oldest first ([] elsewhere)."""
        if not self.rank0:
            return []
        for step in self.housekeeper.torn():
            log.warning("checkpoint step %d never became complete (a rank's upload failed) and a newer one "
                        "did; deleting its leftovers", step)
            self.housekeeper.delete(step)
        steps, self._ready = sorted(set(self._ready + self.housekeeper.committed())), []
        for step in steps:
            self._complete.add(step)
            if step not in self._final:
                self._unregistered.append(step)
        return steps

    def complete_steps(self) -> list[int]:
        """Rank 0: the complete checkpoints in storage, as far as this run knows."""
        return sorted(self._complete)

    def retain(self, pin: int | None) -> list[int]:
        """Rank 0: pin `pin` (the guardian's rollback target; the previous pin is released) and apply
        retention to the complete checkpoints. Returns the steps it deletes, in the background: the guardian
        must forget them before its next decision."""
        if not self.rank0:
            return []
        if pin is not None and pin in self._complete and self._pinned != {pin}:
            self.housekeeper.pin(pin, "the guardian's last healthy checkpoint (rollback target)")
            for old in self._pinned - {pin}:
                self.housekeeper.unpin(old)
            self._pinned = {pin}
        ck = self.cfg.checkpoint
        gone = sorted(self._complete - kept(self._complete, ck.keep_last, ck.keep_every, self._pinned))
        for step in gone:
            self._complete.discard(step)
            self.housekeeper.delete(step)
        if gone:
            log.info("retention: deleting checkpoints %s (keeping %s; pinned %s)", gone, sorted(self._complete),
                     sorted(self._pinned) or "none")
        return gone

    def next_to_register(self) -> int | None:
        """Rank 0: the oldest committed step Ray Train has not been told of (then forgotten here), or None."""
        self._unregistered = [s for s in self._unregistered if s in self._complete]
        return self._unregistered.pop(0) if self._unregistered else None

    def unregistered(self) -> list[int]:
        """Rank 0: every committed step Ray Train has not been told of yet (then forgotten here), oldest first."""
        steps = [s for s in self._unregistered if s in self._complete]
        self._unregistered = []
        return steps

    def discard_after(self, step: int) -> None:
        """Every rank: checkpoints newer than `step` belong to a branch the guardian abandoned; rank 0 deletes
        them (complete or not) before anyone goes on, so no later crash resumes there."""
        if self.rank0:
            newer = [s for s in self.store.step_numbers() if s > step]
            for s in newer:
                self.housekeeper.delete(s)
            self.housekeeper.flush(include_watches=False)
            self.committed()
            self._complete = {s for s in self._complete if s <= step}
            self._unregistered = [s for s in self._unregistered if s <= step]
            if newer:
                log.info("deleted checkpoints %s: they belong to the branch the guardian rolled back", newer)
        self.env.broadcast(None)

    def settle(self, timeout_s: float | None = 300.0) -> None:
        """Block until this rank's uploads are done and rank 0 has seen which of its saves every rank
        committed (the next committed() returns them), or `timeout_s` has passed (said in the log)."""
        self.wait()
        if self.rank0 and not self.housekeeper.flush(timeout_s):
            log.warning("checkpoint bookkeeping: some saves were still not committed by every rank after %s s",
                        timeout_s)

    def finish(self, timeout_s: float = 300.0) -> None:
        """At the end of a run: this rank's uploads, then rank 0's pending deletions and pins, are done."""
        self.wait()
        if self.rank0:
            self.housekeeper.flush(timeout_s)
            self.housekeeper.close()

    # ------------------------------------------------------------------ load

    def load_latest(self, engine: Any) -> TrainerState | None:
        """Restore the newest checkpoint every rank can read (None: start fresh). Rank 0 names, in one
        warning, every newer checkpoint it passed over and why; torn leftovers are deleted in the background."""
        candidates = None
        if self.rank0:
            latest, passed = self.store.find_latest()
            complete = self.store.steps() if latest is not None else []
            self._complete = set(complete)
            self._pinned = set(self.store.pinned()) & self._complete
            candidates = sorted(complete, reverse=True)
            if passed and latest is not None:
                log.warning("checkpoints passed over on resume: %s; resuming from step %d instead",
                            " | ".join(p.describe() for p in passed), latest)
            # Passed-over steps stay for the person to look at (marked, so `inspect` says why) until training
            # saves that step again; torn leftovers older than the newest complete one are just deleted.
            for p in passed:
                self.store.mark_damaged(p.step, "passed over on resume: " + "; ".join(p.problems[:3]))
                self._passed_over.add(p.step)
            for leftover in [s for s in self.store.step_numbers()
                             if latest is not None and s < latest and s not in complete]:
                self.housekeeper.delete(leftover)
        candidates = self.env.broadcast(candidates)
        if not candidates:
            return None
        return self.load_first_good(candidates, engine, "resume")

    def load_first_good(self, candidates: list[int], engine: Any, why: str) -> TrainerState | None:
        """Load the first of `candidates` that every rank can read; None when none can."""
        for i, step in enumerate(candidates):
            error: CheckpointError | None = None
            try:
                state = self.load(step, engine)
            except CheckpointError as e:
                error = e
                if isinstance(e, CheckpointCorrupt):
                    self.store.mark_damaged(step, str(e)[:500])
            if self.env.agree(error is None):
                return state
            if self.rank0 or error is not None:
                following = candidates[i + 1] if i + 1 < len(candidates) else None
                log.warning("%s: checkpoint step %d cannot be loaded%s; %s", why, step,
                            f" ({error})" if error is not None else " on some rank",
                            f"trying step {following} instead" if following is not None else "no older one is left")
            if self.rank0:
                self._complete.discard(step)
        return None

    def load(self, step: int, engine: Any, store: CheckpointStore | None = None) -> TrainerState:
        """This rank's part of checkpoint `step` into `engine`; raises CheckpointError when it cannot. `store`:
        another run's (a branch, model.init_state=full) instead of this run's.

        A rank downloads the trainer state, its RNG file and the model files its engine says its load reads
        (an engine that cannot say gets every file): at the same world size that is the metadata and its
        own shards, so N ranks together pull about one copy of the checkpoint rather than N."""
        store = store or self.store
        local = self.staging / f"load-{step:08d}-{uuid.uuid4().hex[:8]}"
        rng_name = f"rng/rank-{self.env.rank:05d}.json"
        choose = getattr(engine, "checkpoint_files", None)
        try:
            if choose is None:
                loaded = store.download(step, local)
                fetched = len(loaded.files)
            else:
                # First what says which model files this rank needs (DCP's metadata), then those files.
                first = {STATE_FILE, rng_name} | {f"{MODEL_DIR}/{n}" for n in engine.checkpoint_index_files}
                loaded = store.download(step, local, select=first.__contains__)
                committed = {rel for record in loaded.records.values() for rel in record.files}
                names = sorted(rel[len(MODEL_DIR) + 1:] for rel in committed if rel.startswith(MODEL_DIR + "/"))
                needed = {f"{MODEL_DIR}/{n}" for n in choose(local / MODEL_DIR, names, loaded.world_size)}
                if needed - committed:
                    raise CheckpointCorrupt(
                        f"checkpoint step {step} at {store.step_url(step)}: rank {self.env.rank}'s load "
                        f"reads {sorted(needed - committed)[:5]}, which no rank committed")
                rest = needed - set(loaded.files)
                if rest:
                    store.download(step, local, select=rest.__contains__)
                fetched = len(set(loaded.files) | needed)
            state = TrainerState(**json.loads((loaded.local_dir / STATE_FILE).read_text()))
            engine.load_checkpoint(loaded.local_dir / MODEL_DIR, saved_world_size=loaded.world_size)
            engine.load_state_dict(state.engine)
            rng_file = loaded.local_dir / rng_name
            if rng_file.exists() and loaded.world_size == self.env.world_size:
                set_rng_state(json.loads(rng_file.read_text()))
            else:  # a different world size: no RNG stream maps one to one, so derive a fresh one
                torch.manual_seed(self.cfg.train.seed + 1_000_003 * step + self.env.rank)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if self.rank0:
            total = len({rel for record in loaded.records.values() for rel in record.files})
            log.info("loaded checkpoint step %d (saved on %d ranks, now %d) from %s; rank 0 fetched %d of "
                     "its %d files", step, loaded.world_size, self.env.world_size, loaded.location, fetched, total)
        return state


def all_ranks_agree(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank of the default process group (or there is none)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable in a checkpoint's trainer state")


__all__ = ["CheckpointManager", "TrainerState", "all_ranks_agree", "default_staging_dir", "run_store"]
