"""The window plan's specification in the plainest code: every document's columns in memory, each epoch's whole
order written out, no windows read ahead, no positions to find. raytrainer.data.plan must give the same
global batches."""

from __future__ import annotations

import numpy as np

from raytrainer.config import Config
from raytrainer.data.manifest import DataError
from raytrainer.data.objectives import Objective
from raytrainer.data.order import shard_order, window_order
from raytrainer.data.packing import Piece, fill_rows
from raytrainer.data.plan import PlannedBatch, phase_index, stream_tokens, stream_weights
from raytrainer.data.shard_table import ColumnSource, ShardTable


class ReferencePlanner:
    def __init__(self, table: ShardTable, columns: ColumnSource, cfg: Config, objective: Objective):
        self.table, self.cfg, self.objective, self.seed = table, cfg, objective, cfg.train.seed
        n = table.num_documents
        self.length = np.ones(n, dtype=np.int64)
        self.quality = np.full(n, np.nan)
        self.readable = np.ones(n, dtype=bool)
        for s in range(len(table)):
            ids = table.first_doc[s] + np.arange(table.num_docs[s])
            got = columns.read(s) if table.num_docs[s] else None
            if got is None:
                self.readable[ids] = False
            else:
                self.length[ids], self.quality[ids] = got.length, got.quality
        self.shard_of = np.repeat(np.arange(len(table)), table.num_docs)
        self.position = {k: [0, 0, 0] for k in range(len(table.streams))}  # epoch, pos, consumed
        self.batch = self.step = self.phase = 0
        self.skips: list[tuple[int, int]] = []
        self.blacklist: set[int] = set()
        self.carry = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def epoch_docs(self, stream: int, epoch: int) -> np.ndarray:
        if (stream, epoch) not in self._orders:
            self._orders[(stream, epoch)] = self._epoch_docs(stream, epoch)
        return self._orders[(stream, epoch)]

    def _epoch_docs(self, stream: int, epoch: int) -> np.ndarray:
        shards = shard_order(self.table, stream, self.seed, epoch)
        w_size = self.cfg.data.shuffle_window_shards
        parts = []
        for w in range(0, len(shards), w_size):
            ids = np.concatenate([self.table.first_doc[s] + np.arange(self.table.num_docs[s])
                                  for s in shards[w: w + w_size]])
            parts.append(ids[window_order(self.table, stream, self.seed, epoch, w // w_size, len(ids))])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def may_draw(self, doc: int) -> bool:
        phase = self.cfg.data.phases[self.phase]
        if not self.readable[doc] or doc in self.blacklist:
            return False
        if phase.max_doc_tokens is not None and self.length[doc] > phase.max_doc_tokens:
            return False
        return not (phase.min_quality is not None and self.quality[doc] < phase.min_quality)

    def has_drawable(self, stream: int) -> bool:
        return any(self.may_draw(int(d)) for d in self.epoch_docs(stream, 0))

    def next_piece(self) -> Piece:
        phase = self.cfg.data.phases[self.phase]
        weights = stream_weights(phase, self.table.streams, stream_tokens(self.table, phase),
                                 [b.name for b in self.table.buckets], where="reference")
        candidates = [k for k in range(len(weights)) if weights[k] > 0 and self.has_drawable(k)]
        if not candidates:
            raise DataError("no stream has a drawable document")
        stream = min(candidates, key=lambda k: (self.position[k][2] / weights[k], k))
        p = self.position[stream]
        while True:
            docs = self.epoch_docs(stream, p[0])
            while p[1] < len(docs):
                doc = int(docs[p[1]])
                p[1] += 1
                if self.may_draw(doc):
                    length = int(self.length[doc]) + self.objective.extra_tokens(doc)
                    p[2] += length
                    shard = int(self.shard_of[doc])
                    return Piece(doc, shard, doc - int(self.table.first_doc[shard]), length)
            p[0], p[1] = p[0] + 1, 0

    def next_batch(self) -> PlannedBatch:
        while True:
            batch = self.batch
            phase = phase_index(self.cfg, batch)
            if phase != self.phase:
                for p in self.position.values():
                    p[2] = 0
                self.phase = phase
            seq_len, n_rows = self.cfg.seq_len_at(batch), self.cfg.rows_per_global_batch(batch)
            segments, self.carry = fill_rows(n_rows, seq_len, self.next_piece, self.carry)
            self.batch += 1
            if not any(a <= batch < b for a, b in self.skips):
                self.step += 1
                return PlannedBatch(batch=batch, step=self.step - 1, phase=phase, seq_len=seq_len, n_rows=n_rows,
                                    segments=segments)

    def skip_batches(self, start: int, end: int) -> None:
        self.skips.append((start, end))

    def blacklist_documents(self, doc_ids: list[int]) -> None:
        self.blacklist |= set(doc_ids)
        if self.carry is not None and self.carry[0].doc in self.blacklist:
            self.carry = None

    def epochs(self) -> dict[str, float]:
        sizes = self.table.stream_docs
        out: dict[str, float] = {}
        for k, (source, _) in enumerate(self.table.streams):
            done = self.position[k][0] + (self.position[k][1] / sizes[k] if sizes[k] else 0.0)
            out[source] = max(out.get(source, 0.0), done)
        return out


def same_batches(a: list[PlannedBatch], b: list[PlannedBatch]) -> bool:
    return all(x.batch == y.batch and x.step == y.step and x.phase == y.phase and x.seq_len == y.seq_len
               and np.array_equal(x.segments, y.segments) for x, y in zip(a, b, strict=True))
