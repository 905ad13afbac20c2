"""The data feed of one training rank: its micro-batches of every global batch, resumable from a cursor.

    feed = DataFeed(cfg, cfg.data.path, rank, world_size, cursor=state.cursor)
    micro_batches = feed.next_step()     # Config.accumulation_steps dicts of int64 [B, T] CPU tensors
    feed.cursor()                        # JSON position after the last step taken (goes into checkpoints)
    feed.skip_batches(a, b)              # global batches [a, b) are never served
    feed.blacklist_documents([17, 42])   # never drawn again (the rest of a cut document is dropped too)

The rows of a global batch are split contiguously over ranks (ceil division) and cut into micro-batches of
at most train.micro_batch_size rows; a rank with fewer rows gets all-ignored padding micro-batches, so
every rank runs the same number of micro-steps and any world size trains on identical global batches.
With Ray initialised, batches are made ahead by the Ray Data pipeline (raytrainer.data.pipeline);
otherwise (or with use_ray=False) in this process. Both give identical tensors.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable, Iterable

import numpy as np
import torch

from raytrainer.config import Config
from raytrainer.data.cursor import Cursor
from raytrainer.data.fs import open_storage
from raytrainer.data.manifest import MANIFEST_NAME, Manifest
from raytrainer.data.objectives import IGNORE, Objective
from raytrainer.data.packing import ARRAY_KEYS, micro_batch_sizes
from raytrainer.data.pipeline import (
    DEFAULT_CACHE_BYTES,
    RayStepStream,
    ReadSpec,
    StepData,
    materialise,
    step_work,
)
from raytrainer.data.plan import PlannedBatch, Planner
from raytrainer.data.shard_table import ParquetColumns, ShardTable

log = logging.getLogger(__name__)


class DataFeed:
    def __init__(self, cfg: Config, manifest_dir: str, rank: int = 0, world_size: int = 1,
                 cursor: dict | None = None, *, use_ray: bool | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, share: Callable[[StepData | None], StepData] | None = None,
                 reads: bool = True):
        """`share`: this rank is one of a group that trains on the same rows (tensor parallel); `share` is the group's
        broadcast from the one rank that reads for them all (`reads`): given its step there and None elsewhere, it
        returns that step everywhere. Without it every rank reads its own."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.share = share
        self.reads = reads or share is None
        manifest = Manifest.load(manifest_dir, cfg.data.s3)
        storage = open_storage(manifest_dir, cfg.data.s3)
        self.table = ShardTable.from_manifest(manifest)
        self.columns = ParquetColumns(storage, manifest, cfg.data.on_bad_shard)
        self.objective = Objective.from_config(cfg.data, cfg.train.seed, manifest.tokenizer,
                                               where=f"{storage.url}/{MANIFEST_NAME}")
        self.spec = ReadSpec(dataset=storage.url, s3=cfg.data.s3,
                             shard_paths=tuple(s.path for s in manifest.shards), objective=self.objective,
                             vocab_size=manifest.vocab_size, cache_bytes=cache_bytes)
        if use_ray is None:
            import ray

            use_ray = ray.is_initialized()
        self.use_ray = use_ray
        start = Cursor.from_dict(cursor, where="data cursor") if cursor is not None else None
        self._planner: Planner | None = self._new_planner(start)
        self._served = self._planner.cursor.to_dict()  # the position after the last step taken
        self._stream: RayStepStream | None = None
        self._closer = weakref.finalize(self, _close_stream, [None])
        self._last: StepData | None = None

    # ---- the stream

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch."""
        item = self._next_item()
        self._last = item
        self._served = item.cursor
        return self._micro_batches(item)

    def _next_item(self) -> StepData:
        if self.share is None:
            return self._read_item()
        return self.share(self._read_item() if self.reads else None)

    def _read_item(self) -> StepData:
        if not self.use_ray:
            planner = self._local_planner()
            planned = planner.next_batch()
            work = step_work(planned, self.rank, self.world_size)
            arrays = materialise(self.spec, work) if work is not None else None
            rows = (work.row_start, work.row_start + work.n_rows) if work is not None else (0, 0)
            return StepData(planned, rows, arrays, planner.cursor.to_dict())
        if self._stream is None:
            planner = self._planner or self._new_planner(Cursor.from_dict(self._served))
            self._planner = None  # the stream's thread owns it now
            self._stream = RayStepStream(planner, self.spec, self.rank, self.world_size,
                                         self.cfg.data.prefetch_batches, concurrency=self.cfg.data.read_tasks)
            self._closer.detach()
            self._closer = weakref.finalize(self, _close_stream, [self._stream])
        return self._stream.next()

    def _local_planner(self) -> Planner:
        if self._planner is None:
            self._planner = self._new_planner(Cursor.from_dict(self._served))
        return self._planner

    def _new_planner(self, cursor: Cursor | None) -> Planner:
        return Planner(self.table, self.columns, self.cfg, self.objective, cursor, warn_epochs=self.rank == 0)

    def _micro_batches(self, item: StepData) -> list[dict[str, torch.Tensor]]:
        planned = item.planned
        rows_per_rank = math.ceil(planned.n_rows / self.world_size)
        accumulation = math.ceil(rows_per_rank / self.cfg.train.micro_batch_size)
        n_rows = item.rows[1] - item.rows[0]
        sizes = micro_batch_sizes(n_rows, self.cfg.train.micro_batch_size, accumulation)
        real = [size for size in sizes if size > 0]
        pieces = {}
        if item.arrays is not None:  # one split per key: views, not a slice per micro-batch
            pieces = {k: torch.from_numpy(np.asarray(item.arrays[k], dtype=np.int64)).split(real) for k in ARRAY_KEYS}
        out = [{k: v[i] for k, v in pieces.items()} for i in range(len(real))]
        out += [padding_micro_batch(planned.seq_len, self.objective.pad_id) for _ in sizes[len(real):]]
        return out

    # ---- position and control

    def cursor(self) -> dict:
        """The position after the last step taken (JSON-serialisable)."""
        return copy.deepcopy(self._served)

    @property
    def batch_index(self) -> int | None:
        """Global batch index of the last step taken (differs from the step once batches were skipped)."""
        return None if self._last is None else self._last.planned.batch

    @property
    def last_plan(self) -> PlannedBatch | None:
        """The whole global batch of the last step taken (every rank's rows, as segments)."""
        return None if self._last is None else self._last.planned

    @property
    def last_rows(self) -> tuple[int, int]:
        """This rank's rows [a, b) of the last global batch taken (its micro-batches hold them in order)."""
        return (0, 0) if self._last is None else self._last.rows

    @property
    def shard_paths(self) -> tuple[str, ...]:
        """The dataset's shards, in the order packing segments number them."""
        return self.spec.shard_paths

    def last_documents(self) -> list[int]:
        """Ids of the documents in the last global batch taken (all ranks), e.g. to blacklist them."""
        return [] if self._last is None else self._last.planned.documents

    def epochs(self) -> dict[str, float]:
        """Passes made over each source so far (by its most-read length bucket)."""
        return self._new_planner(Cursor.from_dict(self._served)).epochs()

    def skip_batches(self, start: int, end: int) -> None:
        """Never serve global batches [start, end); they are still planned, so later batches are unchanged.
        Ranges before the current position change nothing but are kept in the cursor."""
        self._change(lambda planner: planner.skip_batches(start, end))

    def blacklist_documents(self, doc_ids: Iterable[int]) -> None:
        """Never draw these documents again (from the next step on)."""
        ids = [int(d) for d in doc_ids]
        self._change(lambda planner: planner.blacklist_documents(ids))

    def _change(self, apply) -> None:
        # Steps made ahead no longer hold: restart planning from the last step taken.
        self.close()
        planner = self._local_planner()
        apply(planner)
        self._served = planner.cursor.to_dict()

    def close(self) -> None:
        """Stop planning ahead (a later next_step starts again from the cursor)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            self._closer.detach()
            self._closer = weakref.finalize(self, _close_stream, [None])

    @property
    def dropped_shards(self) -> tuple[str, ...]:
        """Shards left out as unreadable so far (data.on_bad_shard=skip; found as the plan reaches them)."""
        return tuple(sorted(self.columns.dropped))


def padding_micro_batch(seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A one-row micro-batch that contributes nothing: pad ids, every label ignored."""
    return {
        "input_ids": torch.full((1, seq_len), pad_id, dtype=torch.int64),
        "labels": torch.full((1, seq_len), IGNORE, dtype=torch.int64),
        "position_ids": torch.arange(seq_len, dtype=torch.int64).unsqueeze(0),
        "doc_ids": torch.zeros((1, seq_len), dtype=torch.int64),
    }


def _close_stream(box: list) -> None:
    stream = box[0]
    if stream is not None:
        stream.close()

