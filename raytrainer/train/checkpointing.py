"""The whole training state in one checkpoint, and back.

    step_XXXXXXXX/
        model/                      model + optimizer (+ EMA) shards: DCP for ddp/fsdp, DeepSpeed's format
        trainer_state.json          rank 0: step, data cursor, guardian state, engine state, config, metrics
        rng/rank-XXXXX.json         every rank's RNG states
        _commit/rank-XXXXX.json     written by the store after each rank's upload (sizes, sha256)

Every rank stages its own files locally and hands them to the CheckpointStore, which uploads them and
commits them. With checkpoint.async_upload the step waits only for a host-memory copy of the model and
optimizer state; the upload thread writes it to disk, then uploads it. Nothing here unpickles: JSON for
state, DCP/DeepSpeed files for tensors.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    return obj


def _tuplify(obj: Any) -> Any:
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, list) else obj


def run_store(cfg: Config) -> Any:
    """The run's CheckpointStore as the trainer writes it: checkpoint.storage/<run name>, plus the mirror."""
    from raytrainer.fault.checkpoint_store import CheckpointStore

    ck = cfg.checkpoint
    return CheckpointStore(ck.storage, cfg.run.name, ck.s3, mirror=ck.mirror)


class CheckpointManager:
    """Saves and restores TrainerState + engine through the run's CheckpointStore."""

    def __init__(self, cfg: Config, env: Any, store: Any = None, staging_root: str | Path | None = None):
        from raytrainer.train.loop import default_staging_dir

        self.cfg = cfg
        self.env = env
        self.store = store or run_store(cfg)
        self.staging = Path(staging_root) / f"rank-{env.rank:05d}" if staging_root else default_staging_dir(
            cfg.run.name, env.rank
        )
        self._unregistered: list[int] = []  # rank 0: saved steps not yet registered with Ray Train

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
        if self.env.rank == 0:
            state.engine = engine.state_dict()
            state.world_size = self.env.world_size
            state.strategy = self.cfg.parallel.strategy
            state.config = to_dict(self.cfg)
            (local / STATE_FILE).write_text(json.dumps(asdict(state), default=_json_default))
        save_id = self.env.broadcast(uuid.uuid4().hex if self.env.rank == 0 else None)
        args = (state.step, local, self.env.rank, self.env.world_size, {"final": final}, save_id, True)
        if in_background:
            self.store.save_rank_async(*args, write_first=write)
        else:
            self.store.save_rank(*args)
        if self.env.rank == 0:
            log.info("checkpoint step %d staged (%s upload)", state.step, "async" if in_background else "sync")
            if not final:  # the final one is registered by the loop once every rank has finished
                self._unregistered.append(state.step)

    def next_to_register(self) -> int | None:
        """Rank 0: the oldest saved step that every rank has now committed and that Ray Train has not been
        told of (then it is forgotten here), or None. One listing of the store per call with work pending."""
        if not self._unregistered:
            return None
        step = self._unregistered[0]
        try:
            complete = self.store.is_complete(step)
        except Exception as e:  # registration is bookkeeping: retried at the next report
            log.warning("could not check checkpoint step %d before registering it with Ray Train: %s", step, e)
            return None
        if complete:
            self._unregistered.pop(0)
            return step
        return None

    def wait(self) -> None:
        self.store.wait()
        if self.env.rank == 0:
            self.prune()

    def prune(self) -> None:
        ck = self.cfg.checkpoint
        try:
            self.store.prune(keep_last=ck.keep_last, keep_every=ck.keep_every)
        except Exception as e:  # pruning is housekeeping: never fail a run over it
            log.warning("checkpoint pruning failed (will retry at the next checkpoint): %s", e)

    def discard_after(self, step: int) -> None:
        """Rank 0 deletes checkpoints newer than `step` (an abandoned branch after a rollback)."""
        if self.env.rank == 0:
            self._unregistered = [s for s in self._unregistered if s <= step]
            for newer in [s for s in self.store.steps() if s > step]:
                self.store.delete(newer)
                log.info("deleted checkpoint step %d: it belongs to the branch the guardian rolled back", newer)
        self.env.broadcast(None)  # nobody loads until the branch is gone

    # ------------------------------------------------------------------ load

    def load_latest(self, engine: Any) -> TrainerState | None:
        step = self.store.latest_complete()
        if step is None:
            return None
        return self.load(step, engine)

    def load(self, step: int, engine: Any) -> TrainerState:
        local = self.staging / f"load-{step:08d}-{uuid.uuid4().hex[:8]}"
        try:
            loaded = self.store.download(step, local)
            state = TrainerState(**json.loads((loaded.local_dir / STATE_FILE).read_text()))
            engine.load_checkpoint(loaded.local_dir / MODEL_DIR, saved_world_size=loaded.world_size)
            engine.load_state_dict(state.engine)
            rng_file = loaded.local_dir / "rng" / f"rank-{self.env.rank:05d}.json"
            if rng_file.exists() and loaded.world_size == self.env.world_size:
                set_rng_state(json.loads(rng_file.read_text()))
            else:  # a different world size: no RNG stream maps one to one, so derive a fresh one
                torch.manual_seed(self.cfg.train.seed + 1_000_003 * step + self.env.rank)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if self.env.rank == 0:
            log.info("loaded checkpoint step %d (saved on %d ranks, now %d) from %s",
                     step, loaded.world_size, self.env.world_size, loaded.location)
        return state


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer | np.floating):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable in a checkpoint's trainer state")
